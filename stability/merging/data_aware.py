"""Statistics-weighted merges: Fisher merging (+ `diag_fisher`, the per-expert diagonal
Fisher), RegMean (+ `gram_matrices`, the per-expert Gram matrices of every Dense layer's
inputs, and `solve`, the pivoted Gauss-Jordan solve it uses) and RegMean++ (the Grams taken
under the merged model's own earlier layers: it needs the model and each expert's samples).

Both take per-expert statistics stacked like the experts (leaves [E, ...]), computed once per
expert on its own labelled data (`jax.vmap` / `stability.merging.inputs.per_row` over experts);
the merge itself needs no data and no model.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stability.merging.base import (CHUNK, Array, Params, bcast, check_like_stack,
                                    check_scalar, check_weights, flatten_stack, map_rows,
                                    prepare)
from stability.models import per_sample_loss
from stability.sharding import on_one_device


# ---------------------------------------------------------------------------------------------
# Fisher merging.

@functools.partial(jax.jit, static_argnames=("normalize", "chunk_size"))
def _fisher(x0, stack, fishers, groups, w_GxM, eps, normalize, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  leaves_f = treedef.flatten_up_to(fishers)
  if normalize:
    norm_E = jnp.sqrt(sum(jnp.sum(jnp.square(f.astype(jnp.float32)).reshape(f.shape[0], -1),
                                  axis=1) for f in leaves_f))

  def one(idx_M, w_M):
    c_M = w_M / (norm_E[idx_M] + eps) if normalize else w_M
    out = []
    for s, f in zip(leaves_s, leaves_f):
      cf = bcast(c_M, s[idx_M]) * (f[idx_M].astype(jnp.float32) + eps)
      out.append((jnp.sum(cf * s[idx_M].astype(jnp.float32), 0) / jnp.sum(cf, 0))
                 .astype(s.dtype))
    return treedef.unflatten(out)

  return map_rows(one, (groups, w_GxM), chunk_size)


def fisher(x0: Params, stack: Params, groups: Any, weights: Any = None, *, fishers: Params,
           eps: float = 1e-6, normalize: bool = True, chunk_size: int | None = CHUNK,
           tasks: Any = None) -> Params:
  """Fisher merging (Matena & Raffel, NeurIPS 2022) with diagonal Fisher F_i:

    x = sum_m c_m (F_m + eps) x_m / sum_m c_m (F_m + eps),  c_m = w_m / (||F_m|| + eps)

  coordinate-wise; ||F_m|| is the L2 norm of expert m's whole Fisher (normalize=False: c = w).
  `fishers` is a stack like `stack` (e.g. `jax.vmap(diag_fisher, ...)`). Defaults eps = 1e-6
  and normalize = True follow FusionBench `fisher_merging` (minimal_fisher_weight,
  normalize_fisher_weight).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  check_like_stack("fishers", fishers, stack)
  fishers = on_one_device(fishers)
  for f in jax.tree.leaves(fishers):
    if not bool(jnp.all(jnp.isfinite(f)) & jnp.all(f >= 0)):
      raise ValueError("fishers: must be finite and >= 0")
  eps = check_scalar("eps", eps, 0.0, math.inf, lo_open=True, what=" (finite)")
  w = check_weights(weights, g.shape, average=True)
  return _fisher(x0, stack, fishers, jnp.asarray(g), jnp.asarray(w), jnp.float32(eps),
                 bool(normalize), chunk_size)


def diag_fisher(model: Any, params: Params, x: Array, y: Array, num_classes: Array,
                mask: Array | None = None) -> Params:
  """Diagonal empirical Fisher of ONE expert's backbone: F = mean_n (d loss_n / d backbone)^2.

  loss_n is `per_sample_loss` (cross-entropy with the expert's own head and masked logits) on
  labelled samples x [N, H, W, C], y [N]; mask [N] (1 = real, 0 = padding). Per-example
  gradients are vmapped (memory O(N * |backbone|)). Pure: `jax.vmap` it over experts.
  """
  def loss_one(backbone, xi, yi):
    l, _ = per_sample_loss(model, {"backbone": backbone, "head": params["head"]}, xi[None],
                           yi[None], num_classes)
    return l[0]

  grads = jax.vmap(jax.grad(loss_one), (None, 0, 0))(params["backbone"], x, y)
  m = jnp.ones(y.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  denom = jnp.maximum(jnp.sum(m), 1.0)
  return jax.tree.map(lambda gr: jnp.tensordot(m, jnp.square(gr), axes=1) / denom, grads)


# ---------------------------------------------------------------------------------------------
# RegMean.

def gram_matrices(model: Any, backbone: Params, x: Array, mask: Array | None = None) -> dict:
  """Gram matrices G = X^T X / n of the inputs X of every Dense layer of ONE backbone.

  Captures each `nn.Dense` call's input with `flax.linen.intercept_methods` while running
  `model.features(backbone, x)`; inputs with extra axes are flattened to rows [n, in]; mask
  [N] (1 = real, 0 = padding) weights each sample's rows; n is the weighted row count (the
  mean, as in RegMean's code). Returns a dict mirroring the module paths, e.g.
  {'Dense_0': G [in, in]}. Pure: `jax.vmap` it over experts to get the `grams` stack.
  """
  sums: dict = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      h = args[0]
      X = h.reshape(h.shape[0], -1, h.shape[-1]).astype(jnp.float32)  # [N, T, in]
      m = (jnp.ones(h.shape[:1], jnp.float32) if mask is None
           else jnp.asarray(mask, jnp.float32))
      Xw = X * m.reshape(-1, 1, 1)
      G = jnp.einsum("nti,ntj->ij", Xw, X)
      cnt = jnp.sum(m) * X.shape[1]
      path = tuple(context.module.path)
      G0, c0 = sums.get(path, (0.0, 0.0))
      sums[path] = (G0 + G, c0 + cnt)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.features(backbone, x)
  out: dict = {}
  for path, (G, cnt) in sums.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = G / jnp.maximum(cnt, 1.0)
  return out


def _leaf_paths(tree: Params) -> list[tuple]:
  """Each leaf's key path as a tuple of names, in tree order."""
  return [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _regmean_layout(x0: Params, grams: Params, E: int) -> dict[int, int]:
  """Maps kernel leaf index (in x0's flattening) -> gram leaf index; validates shapes."""
  x_paths = _leaf_paths(x0)
  x_shapes = [np.shape(a) for a in jax.tree.leaves(x0)]
  layout = {}
  for j, (path, G) in enumerate(jax.tree_util.tree_flatten_with_path(grams)[0]):
    mp = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    name = "/".join(map(str, mp))
    if mp + ("kernel",) not in x_paths:
      raise ValueError(f"grams: {name} names no Dense kernel in the backbone")
    i = x_paths.index(mp + ("kernel",))
    if len(x_shapes[i]) != 2:
      raise ValueError(f"grams: {name}/kernel has shape {x_shapes[i]}, expected [in, out]")
    d = x_shapes[i][0]
    if tuple(np.shape(G)) != (E, d, d):
      raise ValueError(f"grams: {name} has shape {tuple(np.shape(G))}, expected [E, in, in]="
                       f"{(E, d, d)}")
    layout[i] = j
  if not layout:
    raise ValueError("grams: no Gram matrices given")
  return layout


def solve(A: Array, B: Array) -> Array:
  """A^{-1} B for A [d, d], B [d, k] (vmap it for batches): Gauss-Jordan elimination with
  partial pivoting, written in jnp (a `fori_loop` over the d pivots).

  Why not `jnp.linalg.solve`: on CPU, jaxlib 0.10's LAPACK kernels split a batched call over
  XLA's intra-op thread pool and block that pool thread until the pieces finish; when as many
  batched solves run at once as the pool has threads (RegMean solves one system per layer, and
  XLA runs independent layers concurrently), every thread waits and the process deadlocks
  (reproduced here: two vmapped 196x196 solves in one jit hang within a few dozen calls on 2
  cores). This has no custom call, so it cannot. Same pivoting as LAPACK's getrf; d^2 (d + k)
  multiply-adds, memory-bound, fine for the Dense layers RegMean solves (d <= a few thousand).
  """
  d = A.shape[0]
  rows = jnp.arange(d)
  M = jnp.concatenate([A, B], axis=1)

  def pivot(j, M):
    p = jnp.argmax(jnp.where(rows >= j, jnp.abs(M[:, j]), -1.0))
    rj, rp = M[j], M[p]
    M = M.at[p].set(rj).at[j].set(rp)                  # swap rows j and p
    f = jnp.where(rows == j, 0.0, M[:, j] / rp[j])     # eliminate column j from every other row
    return M - f[:, None] * rp[None, :]

  M = jax.lax.fori_loop(0, d, pivot, M)
  return M[:, d:] / jnp.diagonal(M[:, :d])[:, None]


def regmean_layer(G: Array, X: Array, w_M: Array, avg: Array, alpha, ridge) -> Array:
  """RegMean's solve for one Dense kernel: Grams G [M, in, in], kernels X [M, in, out]."""
  d = G.shape[-1]
  eye = jnp.eye(d, dtype=jnp.float32)
  Gt = G * (alpha + (1.0 - alpha) * eye)[None]                     # off-diagonals * alpha
  A = jnp.sum(bcast(w_M, Gt) * Gt, axis=0)
  B = jnp.einsum("m,mij,mjo->io", w_M, Gt, X)
  # Ridge toward the average: rows of A that are all zero (inputs dead for every member) would
  # make A singular; there W* falls back to the average. ridge = 0 is RegMean.
  r = ridge * jnp.trace(A) / d + jnp.finfo(jnp.float32).tiny
  return solve(A + r * eye, B + r * avg)


@functools.partial(jax.jit, static_argnames=("layout", "chunk_size"))
def _regmean(x0, stack, grams, groups, w_GxM, alpha, ridge, layout, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  leaves_g = jax.tree.leaves(grams)
  layout = dict(layout)

  def one(idx_M, w_M):
    out = []
    for i, s in enumerate(leaves_s):
      X = s[idx_M].astype(jnp.float32)                             # [M, ...]
      avg = jnp.sum(bcast(w_M, X) * X, axis=0)
      if i not in layout:
        out.append(avg.astype(s.dtype))
        continue
      G = leaves_g[layout[i]][idx_M].astype(jnp.float32)           # [M, in, in]
      out.append(regmean_layer(G, X, w_M, avg, alpha, ridge).astype(s.dtype))
    return treedef.unflatten(out)

  return map_rows(one, (groups, w_GxM), chunk_size)


def regmean(x0: Params, stack: Params, groups: Any, weights: Any = None, *, grams: Params,
            alpha: float = 0.6, ridge: float = 1e-6, chunk_size: int | None = CHUNK,
            tasks: Any = None) -> Params:
  """RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights").

  Per Dense kernel W [in, out]: W* = (sum_m w_m G~_m + r I)^{-1} (sum_m w_m G~_m W_m + r W_avg)
  with G~ = G with off-diagonal entries scaled by alpha, G_m the Gram of that layer's inputs
  for expert m (`grams` = `jax.vmap(gram_matrices, ...)`, leaves [E, in, in]) and
  r = ridge * tr(A)/in a numerical safeguard (not in the paper; 0 disables it). Biases, Conv
  and every other leaf: the (weighted) average. alpha = 0.6 is FusionBench's
  `reduce_non_diagonal_ratio` for vision (CLIP) models; the RegMean authors' released configs
  use 0.1 (emotion) or no reduction (alpha = 1, GLUE).
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  grams = on_one_device(grams)
  layout = _regmean_layout(x0, grams, E)
  alpha = check_scalar("alpha", alpha, 0.0, 1.0)
  ridge = check_scalar("ridge", ridge, 0.0, math.inf, what=" (finite)")
  w = check_weights(weights, g.shape, average=True)
  return _regmean(x0, stack, grams, jnp.asarray(g), jnp.asarray(w), jnp.float32(alpha),
                  jnp.float32(ridge), tuple(sorted(layout.items())), chunk_size)


# ---------------------------------------------------------------------------------------------
# RegMean++: the Grams of each layer's inputs under the merged model's own earlier layers.

def dense_order(model: Any, x0: Params, x_shape: tuple) -> tuple[tuple[int, tuple], ...]:
  """(leaf index in x0's flattening, module path) of each Dense kernel, in the order the forward
  pass calls them (so layer l's inputs depend only on the layers before it)."""
  paths: list = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      paths.append(tuple(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda b: model.features(b, jnp.zeros((1,) + tuple(x_shape))), x0)
  x_paths = _leaf_paths(x0)
  return tuple((x_paths.index(p + ("kernel",)), p) for p in dict.fromkeys(paths)
               if p + ("kernel",) in x_paths)


def _gram_of(model, backbone, x, mask, path):
  g = gram_matrices(model, backbone, x, mask)
  for p in path:
    g = g[p]
  return g


@functools.partial(jax.jit, static_argnames=("model", "order", "paths", "chunk_size"))
def _regmean_pp(x0, stack, groups, w_GxM, x, mask, alpha, ridge, model, order, paths,
                chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M, w_M):
    members = [s[idx_M].astype(jnp.float32) for s in leaves_s]
    merged = [jnp.sum(bcast(w_M, X) * X, axis=0) for X in members]  # the average to start
    for i, path in zip(order, paths):
      bb = treedef.unflatten(merged)
      G = jax.vmap(lambda xm, mm: _gram_of(model, bb, xm, mm, path))(x[idx_M], mask[idx_M])
      merged[i] = regmean_layer(G, members[i], w_M, merged[i], alpha, ridge)
    return treedef.unflatten([m.astype(s.dtype) for m, s in zip(merged, leaves_s)])

  return map_rows(one, (groups, w_GxM), chunk_size)


def regmean_plusplus(x0: Params, stack: Params, groups: Any, weights: Any = None, *,
                     model: Any, x: Any, mask: Any = None, alpha: float = 0.6,
                     ridge: float = 1e-6, chunk_size: int | None = CHUNK,
                     tasks: Any = None) -> Params:
  """RegMean++ (Nguyen et al., 2025): RegMean with each layer's Grams taken from the MERGED
  model. The Dense kernels are merged in forward order; layer l's Gram for member m is
  computed on m's own samples x[m] (mask[m]) passed through the merged layers before l (the
  later ones do not affect l's inputs), then the RegMean solve (`regmean_layer`, same alpha and
  ridge). Other leaves: the (weighted) average, which is also the starting point.
  x [E, N, ...] are each expert's own training inputs (the samples RegMean's Grams use).
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  x = jnp.asarray(x)
  if x.ndim < 3 or x.shape[0] != E:
    raise ValueError(f"regmean_plusplus: x must be per-expert inputs [E={E}, N, ...], got "
                     f"shape {x.shape}")
  m = np.ones(x.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
  if m.shape != x.shape[:2] or np.any(m.sum(1) <= 0):
    raise ValueError(f"regmean_plusplus: mask must be [E, N]={x.shape[:2]} with a real sample "
                     f"per expert, got shape {m.shape}")
  alpha = check_scalar("regmean_plusplus: alpha", alpha, 0.0, 1.0)
  ridge = check_scalar("regmean_plusplus: ridge", ridge, 0.0, math.inf, what=" (finite)")
  w = check_weights(weights, g.shape, average=True)
  layers = dense_order(model, x0, x.shape[2:])
  if not layers:
    raise ValueError("regmean_plusplus: the backbone has no Dense layer")
  order, paths = tuple(i for i, _ in layers), tuple(p for _, p in layers)
  return _regmean_pp(x0, stack, jnp.asarray(g), jnp.asarray(w), x, jnp.asarray(m),
                     jnp.float32(alpha), jnp.float32(ridge), model, order, paths, chunk_size)
