"""Merging expert backbones into one backbone per group.

Legend:
  E       experts: rows of `stack`, a backbone pytree whose leaves have a leading axis E
  x0      pretrained backbone (same tree, no E axis); x_i the backbone of expert i
  tau_i   task vector x_i - x0
  G, M    groups and members per group; `groups` [G, M] int indexes rows of the stack
  w       member weights [G, M] (`weights`)
  L       leaves of the backbone pytree (one "layer" for layer-wise methods)
  lam     task-vector scale; k TIES keep fraction; p DARE drop rate; t interpolation factor
  N       samples per expert for data-dependent merges; C logits (max_classes)

Every merge acts on BACKBONES only and returns a backbone stack with leaves [G, ...]; heads are
never merged (the caller pairs merged backbone g with each member's own head).

Every merge is pure, jitted, `jax.vmap`-ed over groups and mapped over chunks of `chunk_size`
groups (`jax.lax.map(..., batch_size=chunk_size)`; None = all groups in one vmap), so memory is
O(chunk_size * M * |backbone|) however many groups there are (default `CHUNK` = 64, or None for
the linear merges and DARE on a linear base, which materialise nothing beyond their output).
Inputs are validated on the host before any compute; a bad input raises a one-line ValueError
naming the field.

API (every merge: `f(x0, stack, groups, ..., chunk_size=, tasks=)` -> backbone stack [G, ...]):
  average, weighted_average, uniform_soup, task_arithmetic       linear
  ties, dare (base = average | task_arithmetic | ties)            sparsifying
  fisher (+ diag_fisher), regmean (+ gram_matrices)               statistics-weighted
  adamerging (+ adamerging_coefficients), greedy_soup             data-driven, need a `Model`
  slerp (M = 2), model_stock                                      geometric
  ensemble        the non-merged reference: logits [G, M, N, C], not parameters
  diagnostics     task-vector norms, cosines, sign conflicts, realised TIES/DARE sparsity
  ALGORITHMS, get(name), merge(name, x0, stack, groups, **hparams)   registry
  merge_batch_stats   BatchNorm statistics of merged backbones: average | frozen | recompute
`groups` must be concrete (it is validated on the host); `tasks` [E] (optional) gives each
expert's task, and a group holding one task twice is an error. Data for data-dependent merges
is per expert: x [E, N, H, W, C], y [E, N], mask [E, N] (1 = real row), num_classes [E], heads
[E, ...] (each expert's own head).

Throughput: outputs are fresh buffers; on Linux with THP in `madvise` mode, XLA's large CPU
allocations fault in 4 kB pages, which can cost more than the merge itself (167 MB: ~100 ms).
Start the process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to get huge pages
(benchmarks/merge_bench.py).

RNG (DARE, AdaMerging): group g's randomness is keyed by fold_in(key, id_g), where id_g =
group_ids[g] (default: g, the group's row). DARE's keep masks are Bernoulli(1 - p) per entry of
[M, D] (D the backbone flattened in tree order, row m = member m) from a counter-based hash of
per-member jax.random seeds (`_dare_masks`). So results do not depend on chunk_size, and a
stability twin group given its original group's id gets the same masks (and AdaMerging the same
minibatches).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stability.models import masked_logits, per_sample_loss
from stability.sharding import on_one_device

Params = Any
Array = jax.Array

# Default groups per chunk for merges whose per-group intermediates are [M, ...] slabs of
# member parameters (so memory is O(CHUNK * M * |backbone|)). Linear merges default to all
# groups at once: XLA fuses their gathers into the output, so nothing larger is materialised.
CHUNK = 64


# ---------------------------------------------------------------------------------------------
# Validation (host side, before any compute).

def _check_trees(x0: Params, stack: Params) -> int:
  """Checks that stack == x0 with a leading axis E on every leaf; returns E."""
  s0, ss = jax.tree.structure(x0), jax.tree.structure(stack)
  if s0 != ss:
    raise ValueError(f"stack: tree structure {ss} differs from x0's {s0}")
  paths = jax.tree_util.tree_flatten_with_path(x0)[0]
  leaves_s = jax.tree.leaves(stack)
  if not leaves_s:
    raise ValueError("stack: the backbone tree has no leaves")
  Es = set()
  for (path, a0), s in zip(paths, leaves_s):
    name = jax.tree_util.keystr(path)
    if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
      raise ValueError(f"stack: leaf {name} has dtype {jnp.result_type(s)}, expected floating")
    if np.ndim(s) != np.ndim(a0) + 1 or tuple(np.shape(s)[1:]) != tuple(np.shape(a0)):
      raise ValueError(f"stack: leaf {name} has shape {tuple(np.shape(s))}, expected "
                       f"(E,) + x0 shape {tuple(np.shape(a0))}")
    Es.add(np.shape(s)[0])
  if len(Es) != 1:
    raise ValueError(f"stack: leaves disagree on the expert axis E: {sorted(Es)}")
  return Es.pop()


def _check_like_stack(name: str, tree: Params, stack: Params) -> None:
  """Checks that a statistics stack (e.g. Fisher) has the stack's structure and shapes."""
  if jax.tree.structure(tree) != jax.tree.structure(stack):
    raise ValueError(f"{name}: tree structure differs from the stack's")
  for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(stack)):
    if tuple(np.shape(a)) != tuple(np.shape(s)):
      raise ValueError(f"{name}: leaf shape {tuple(np.shape(a))} differs from the stack's "
                       f"{tuple(np.shape(s))}")


def _check_groups(groups: Any, E: int, tasks: Any = None) -> np.ndarray:
  g = np.asarray(groups)
  if g.ndim != 2 or not np.issubdtype(g.dtype, np.integer):
    raise ValueError(f"groups: must be a 2-D integer array [G, M], got shape {g.shape} "
                     f"dtype {g.dtype}")
  if g.shape[0] == 0:
    raise ValueError("groups: no groups (G=0)")
  if g.shape[1] == 0:
    raise ValueError("groups: empty group (M=0); every group needs at least one expert")
  if g.min() < 0 or g.max() >= E:
    raise ValueError(f"groups: indices must lie in [0, E={E}), got min {g.min()} max {g.max()}")
  if tasks is not None:
    t = np.asarray(tasks)
    if t.shape != (E,) or not np.issubdtype(t.dtype, np.integer):
      raise ValueError(f"tasks: must be an int array of shape [E]=({E},), got shape {t.shape} "
                       f"dtype {t.dtype}")
    tg = np.sort(t[g], axis=1)
    dup = np.nonzero(np.any(tg[:, 1:] == tg[:, :-1], axis=1))[0]
    if dup.size:
      r = int(dup[0])
      raise ValueError(f"groups: group {r} repeats a task (experts {g[r].tolist()} have tasks "
                       f"{t[g[r]].tolist()}); each group must hold distinct tasks")
  return g.astype(np.int32)


def _check_weights(weights: Any, shape: tuple[int, int], *, average: bool) -> np.ndarray:
  """Returns float32 weights [G, M] (ones if None); averaging ones are normalised to sum 1."""
  if weights is None:
    w = np.ones(shape, np.float32)
  else:
    w = np.asarray(weights, np.float32)
    if w.shape != shape:
      raise ValueError(f"weights: must have shape [G, M]={shape}, got {w.shape}")
    if not np.all(np.isfinite(w)):
      raise ValueError("weights: must be finite")
  if average:
    if np.any(w < 0) or np.any(w.sum(1) <= 0):
      raise ValueError("weights: an average needs weights >= 0 with a positive sum per group")
    w = w / w.sum(1, keepdims=True)
  return w


def _check_scalar(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False,
                  hi_open: bool = False, what: str = "") -> float:
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: must be a number, got {v!r}") from None
  ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
  if not ok:
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{name}: must be in {rng}{what}, got {v!r}")
  return f


def _check_chunk(chunk_size: Any) -> int | None:
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
  return int(chunk_size)


def _group_ids(group_ids: Any, g: np.ndarray) -> Array:
  """RNG ids [G] of the groups (default: their rows); a twin group passes its original's id."""
  if group_ids is None:
    return jnp.arange(g.shape[0], dtype=jnp.int32)
  ids = np.asarray(group_ids)
  if ids.shape != (g.shape[0],) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
    raise ValueError(f"group_ids: must be non-negative ints of shape [G]=({g.shape[0]},), got "
                     f"shape {ids.shape} dtype {ids.dtype}")
  return jnp.asarray(ids, jnp.int32)


def _prepare(x0, stack, groups, tasks, chunk_size):
  E = _check_trees(x0, stack)
  g = _check_groups(groups, E, tasks)
  return E, g, _check_chunk(chunk_size)


# ---------------------------------------------------------------------------------------------
# Mapping over groups, gathering members.

def _map_rows(fn: Callable, xs: tuple, chunk_size: int | None):
  """fn(*row) over the leading axis of every array in xs: vmapped, in chunks of chunk_size."""
  n = jax.tree.leaves(xs)[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda row: fn(*row), xs, batch_size=chunk_size)


def _flat(x0: Params, stack: Params):
  leaves0, treedef = jax.tree.flatten(x0)
  return leaves0, treedef.flatten_up_to(stack), treedef


def _members(leaves_s: list, idx_M: Array) -> list:
  """Member parameters, leaves [M, ...] in float32."""
  return [s[idx_M].astype(jnp.float32) for s in leaves_s]


def _taus(leaves0: list, leaves_s: list, idx_M: Array) -> list:
  """Member task vectors tau_m = x_m - x0, leaves [M, ...] in float32."""
  return [s[idx_M].astype(jnp.float32) - a0.astype(jnp.float32)[None]
          for a0, s in zip(leaves0, leaves_s)]


def _bcast(v: Array, like: Array) -> Array:
  """v [M] -> [M, 1, ..., 1] matching like [M, ...] (explicit, rank-promotion clean)."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _finish(leaves0: list, leaves_s: list, treedef, delta: list, scale) -> Params:
  """x0 + scale * delta, cast back to the stack dtype."""
  return treedef.unflatten([(a0.astype(jnp.float32) + scale * d).astype(s.dtype)
                            for a0, s, d in zip(leaves0, leaves_s, delta)])


# ---------------------------------------------------------------------------------------------
# Linear merges: x = c0 * x0 + sum_m c_m x_m, coefficients per leaf.

@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _linear(x0: Params, stack: Params, groups: Array, coef_GxMxL: Array, coef0_GxL: Array,
            chunk_size: int | None) -> Params:
  leaves0, leaves_s, treedef = _flat(x0, stack)
  M = groups.shape[1]

  def one(idx_M, c_MxL, c0_L):
    out = []
    for l, (a0, s) in enumerate(zip(leaves0, leaves_s)):
      # One fused multiply-add per member: XLA reads each gathered row once and never
      # materialises the [M, ...] slab of member parameters.
      acc = c0_L[l] * a0.astype(jnp.float32)
      for m in range(M):
        acc = acc + c_MxL[m, l] * s[idx_M[m]].astype(jnp.float32)
      out.append(acc.astype(s.dtype))
    return treedef.unflatten(out)

  return _map_rows(one, (groups, coef_GxMxL, coef0_GxL), chunk_size)


def _num_leaves(x0: Params) -> int:
  return len(jax.tree.leaves(x0))


def _run_linear(x0, stack, g, c_GxM, c0_G, chunk_size):
  L = _num_leaves(x0)
  G, M = g.shape
  c = jnp.broadcast_to(jnp.asarray(c_GxM, jnp.float32).reshape(G, M, 1), (G, M, L))
  c0 = jnp.broadcast_to(jnp.asarray(c0_G, jnp.float32).reshape(G, 1), (G, L))
  return _linear(x0, stack, jnp.asarray(g), c, c0, chunk_size)


def average(x0: Params, stack: Params, groups: Any, weights: Any = None, *,
            chunk_size: int | None = None, tasks: Any = None) -> Params:
  """Simple (or weighted) average of member backbones: x = sum_m w_m x_m, sum_m w_m = 1.

  Equals x0 + (1/M) sum_m tau_m (PAPER.md "average"; FusionBench `simple_average`). `weights`
  [G, M] >= 0 are normalised per group. Returns leaves [G, ...].
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  w = _check_weights(weights, g.shape, average=True)
  return _run_linear(x0, stack, g, w, np.zeros(g.shape[0], np.float32), chunk_size)


def weighted_average(x0: Params, stack: Params, groups: Any, weights: Any, *,
                     chunk_size: int | None = None, tasks: Any = None) -> Params:
  """x = x0 + sum_m w_m tau_m with w [G, M] >= 0 normalised to sum 1 (PAPER.md "weighted")."""
  if weights is None:
    raise ValueError("weights: weighted_average needs weights [G, M]")
  return average(x0, stack, groups, weights, chunk_size=chunk_size, tasks=tasks)


def uniform_soup(x0: Params, stack: Params, groups: Any, *, chunk_size: int | None = None,
                 tasks: Any = None) -> Params:
  """Uniform model soup (Wortsman et al., ICML 2022): the plain average of the members.

  Soups assume the ingredients are fine-tuned on the SAME task and share a head; here each
  member keeps its own head, so this is `average` under the soup name.
  """
  return average(x0, stack, groups, chunk_size=chunk_size, tasks=tasks)


def task_arithmetic(x0: Params, stack: Params, groups: Any, weights: Any = None, *,
                    lam: float = 0.3, chunk_size: int | None = None,
                    tasks: Any = None) -> Params:
  """Task arithmetic (Ilharco et al., ICLR 2023): x = x0 + lam * sum_m w_m tau_m.

  lam >= 0 defaults to 0.3 (FusionBench `task_arithmetic` scaling_factor); weights default to 1
  and are NOT normalised, so lam = 1/M with unit weights is the simple average.
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  lam = _check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
  w = _check_weights(weights, g.shape, average=False)
  c = lam * w
  return _run_linear(x0, stack, g, c, 1.0 - c.sum(1), chunk_size)


# ---------------------------------------------------------------------------------------------
# TIES and DARE.

def _n_keep(k: float, D: int) -> int:
  """ceil(k * D), robust to float error (k = 0.2, D = 100 keeps 20), at least 1."""
  return int(min(D, max(1, math.ceil(round(k * D, 6)))))


def _kth_largest(a: Array, n: int) -> Array:
  """The n-th largest entry of a flat array a >= 0, exactly, by bisection on its float bits.

  Non-negative floats order like their int32 bit patterns, so 32 halvings of [0, +inf] find
  the largest t with #{a >= t} >= n. Each step is one vectorised count: much faster on CPU
  than `lax.top_k` or a sort (8 s vs 0.7 s for 1000 x 42k).
  """
  b = jax.lax.bitcast_convert_type(a, jnp.int32)

  def halve(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(b >= mid) >= n
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800000)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _trim(tau_leaves: list, k: float) -> list:
  """TIES trim of ONE task vector: keep entries with |tau| >= its ceil(k*D)-th largest |tau|.

  The magnitude ranking is global over all leaves (as in the TIES reference code, which
  flattens the state dict); ties at the threshold are kept.
  """
  flat = jnp.concatenate([jnp.abs(t).reshape(-1) for t in tau_leaves])
  n = _n_keep(k, flat.shape[0])
  if n >= flat.shape[0]:
    return list(tau_leaves)
  thr = _kth_largest(flat, n)
  return [jnp.where(jnp.abs(t) >= thr, t, 0.0) for t in tau_leaves]


def _elect(tau_leaves_M: list) -> list:
  """TIES elected sign per coordinate: sign of the summed trimmed values (the total mass).

  Coordinates whose sum is exactly 0 take the majority of the elected signs over the whole
  vector (`resolve_zero_signs(..., "majority")` in the TIES reference code).
  """
  signs = [jnp.sign(t.sum(0)) for t in tau_leaves_M]
  majority = jnp.sign(sum(jnp.sum(s) for s in signs))
  return [jnp.where(s == 0, majority, s) for s in signs]


def _disjoint_mean(tau_leaves_M: list, signs: list) -> list:
  """Mean over members of the entries whose sign agrees with the elected sign (0 if none)."""
  out = []
  for t, s in zip(tau_leaves_M, signs):
    agree = jnp.where(s[None] > 0, t > 0, t < 0)
    num = jnp.sum(jnp.where(agree, t, 0.0), axis=0)
    out.append(num / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(jnp.float32))
  return out


def _ties_merge(tau_leaves_M: list) -> list:
  return _disjoint_mean(tau_leaves_M, _elect(tau_leaves_M))


_TRIM_CHUNK = 16


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _ties(x0, stack, uniq_U, inv_GxM, lam, k, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  # Trimming is per task vector, so it is done once per distinct expert, not once per member,
  # _TRIM_CHUNK experts at a time so the 32 counting passes stay in cache.
  trim_one = lambda u: _trim([s[u].astype(jnp.float32) - a0.astype(jnp.float32)
                              for a0, s in zip(leaves0, leaves_s)], k)
  trimmed = _map_rows(trim_one, (uniq_U,), min(_TRIM_CHUNK, chunk_size or _TRIM_CHUNK))

  def one(idx_M):
    return _finish(leaves0, leaves_s, treedef, _ties_merge([t[idx_M] for t in trimmed]), lam)

  return _map_rows(one, (inv_GxM,), chunk_size)


def _unique(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  uniq, inv = np.unique(g, return_inverse=True)
  return uniq.astype(np.int32), inv.reshape(g.shape).astype(np.int32)


def ties(x0: Params, stack: Params, groups: Any, *, k: float = 0.2, lam: float = 1.0,
         chunk_size: int | None = CHUNK, tasks: Any = None) -> Params:
  """TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

  tau^_m = tau_m with all but its top-k fraction of magnitudes zeroed (global over the
  backbone); gamma = sign(sum_m tau^_m) (total mass); tau* = mean over {m : sign(tau^_m) =
  gamma} of tau^_m, coordinate-wise (0 where none agree); x = x0 + lam * tau*. Defaults k = 0.2
  (top-20%) and lam = 1.0 are the paper's defaults without a validation set.
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  k = _check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  lam = _check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
  uniq, inv = _unique(g)
  return _ties(x0, stack, jnp.asarray(uniq), jnp.asarray(inv), jnp.float32(lam), k, chunk_size)


def _check_key(key: Any) -> Array:
  if key is None:
    raise ValueError("key: this merge draws random masks; pass an explicit jax.random key")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key: must be a single key, got a key array of shape {key.shape}")
    return key
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(f"key: must be a jax.random key, got dtype {key.dtype} shape {key.shape}")
  return jax.random.wrap_key_data(key)


def _mix32(x: Array) -> Array:
  """lowbias32 (C. Wellons' 32-bit integer hash: full avalanche, bias ~1.7e-4) on uint32."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _dare_seeds(key: Array, gi: Array, M: int) -> Array:
  """[M, 2] uint32: member m's seeds in group gi, random.bits(fold_in(fold_in(key, gi), m))."""
  kg = jax.random.fold_in(key, gi)
  return jax.vmap(lambda m: jax.random.bits(jax.random.fold_in(kg, m), (2,), jnp.uint32))(
      jnp.arange(M))


def _dare_keep(seed: Array, offset: int, shape: tuple, p: Array) -> Array:
  """One member's keep mask for one leaf (its coordinates start at `offset` in the flattened
  backbone): entry j is kept iff u >= p, u = (h >> 8) 2^-24, h = mix(mix(j ^ s0) + s1)."""
  j = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + jnp.uint32(offset)
  u = (_mix32(_mix32(j ^ seed[0]) + seed[1]) >> 8).astype(jnp.float32) * (2.0 ** -24)
  return u >= p


def _dare_masks(key: Array, gi: Array, M: int, shapes: list, p: Array) -> list:
  """Keep masks, leaves [M, ...], of group gi: Bernoulli(1 - p) per entry, entry j of member m
  (the backbone flattened in tree order, D coordinates) from a counter-based hash of j keyed by
  jax.random seeds per (group, member) (`_dare_seeds`, `_dare_keep`).

  The hash (two rounds of `_mix32`) costs ~0.5 ns per entry on CPU against ~13 for drawing
  [M, D] threefry bits, which dominated DARE's time, and it fuses into the masking.
  """
  seeds = _dare_seeds(key, gi, M)
  offsets = np.cumsum([0] + [math.prod(s) for s in shapes]).tolist()
  return [jax.vmap(lambda sd: _dare_keep(sd, off, tuple(s), p))(seeds)
          for off, s in zip(offsets, shapes)]


_DARE_BASES = ("average", "task_arithmetic", "ties")


@functools.partial(jax.jit, static_argnames=("base", "rescale", "k", "chunk_size"))
def _dare(x0, stack, groups, gidx, w_GxM, key, p, lam, base, rescale, k, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  M = groups.shape[1]
  shapes = [a0.shape for a0 in leaves0]
  scale = 1.0 / (1.0 - p) if rescale else jnp.float32(1.0)

  def one(gi, idx_M, w_M):
    if base == "ties":
      masks = _dare_masks(key, gi, M, shapes, p)
      taus = [jnp.where(mk, t * scale, 0.0)
              for mk, t in zip(masks, _taus(leaves0, leaves_s, idx_M))]
      return _finish(leaves0, leaves_s, treedef, _ties_merge(jax.vmap(_trim, (0, None))(
          taus, k)), lam)
    # Linear bases: one fused pass per member and leaf (mask, rescale, weight, accumulate), as
    # `_linear`, so no [M, ...] slab of masks or task vectors is materialised (5x faster).
    seeds, delta, offset = _dare_seeds(key, gi, M), [], 0
    for a0, s in zip(leaves0, leaves_s):
      a0f, acc = a0.astype(jnp.float32), jnp.zeros(a0.shape, jnp.float32)
      for m in range(M):
        tau = (s[idx_M[m]].astype(jnp.float32) - a0f) * scale
        acc = acc + w_M[m] * jnp.where(_dare_keep(seeds[m], offset, a0.shape, p), tau, 0.0)
      delta.append(acc)
      offset += a0.size
    return _finish(leaves0, leaves_s, treedef, delta, lam)

  return _map_rows(one, (gidx, groups, w_GxM), chunk_size)


def dare(x0: Params, stack: Params, groups: Any, weights: Any = None, *, key: Any,
         p: float = 0.5, rescale: bool = True, base: str = "task_arithmetic",
         lam: float | None = None, k: float = 0.2, chunk_size: int | None | str = "auto",
         tasks: Any = None, group_ids: Any = None) -> Params:
  """DARE (Yu et al., ICML 2024, "Language Models are Super Mario"), then a base merge.

  tau~_m = m_m * tau_m / (1 - p) with m_m ~ Bernoulli(1 - p) i.i.d. per entry (no 1/(1-p) if
  rescale=False), then `base`:
    'average'          x0 + sum_m w_m tau~_m, w normalised (lam ignored);
    'task_arithmetic'  x0 + lam * sum_m w_m tau~_m (lam default 0.3);
    'ties'             TIES on tau~ (trim k, elect, disjoint mean), x0 + lam * tau* (lam
                       default 1.0; weights not allowed).
  Defaults p = 0.5, rescale = True follow FusionBench `dare/*`. Masks: see the module
  docstring (keyed by the group's row). p = 0 reproduces `base` exactly. chunk_size 'auto':
  all groups at once for the linear bases (fused like the linear merges, nothing materialised
  beyond the output), `CHUNK` for 'ties' (which holds [M, ...] slabs per group).
  """
  if isinstance(chunk_size, str) and chunk_size == "auto":
    chunk_size = CHUNK if base == "ties" else None
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if base not in _DARE_BASES:
    raise ValueError(f"base: unknown DARE base merge {base!r}; allowed: {', '.join(_DARE_BASES)}")
  p = _check_scalar("p", p, 0.0, 1.0, hi_open=True, what=" (drop rate)")
  k = _check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  key = _check_key(key)
  if base == "average":
    w, lam = _check_weights(weights, g.shape, average=True), 1.0
  else:
    if base == "ties" and weights is not None:
      raise ValueError("weights: not supported by base='ties'")
    lam = {"task_arithmetic": 0.3, "ties": 1.0}[base] if lam is None else lam
    lam = _check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
    w = _check_weights(weights, g.shape, average=False)
  return _dare(x0, stack, jnp.asarray(g), _group_ids(group_ids, g), jnp.asarray(w), key,
               jnp.float32(p),
               jnp.float32(lam), base, bool(rescale), k if base == "ties" else 1.0, chunk_size)


# ---------------------------------------------------------------------------------------------
# Fisher merging.

@functools.partial(jax.jit, static_argnames=("normalize", "chunk_size"))
def _fisher(x0, stack, fishers, groups, w_GxM, eps, normalize, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  leaves_f = treedef.flatten_up_to(fishers)
  if normalize:
    norm_E = jnp.sqrt(sum(jnp.sum(jnp.square(f.astype(jnp.float32)).reshape(f.shape[0], -1),
                                  axis=1) for f in leaves_f))

  def one(idx_M, w_M):
    c_M = w_M / (norm_E[idx_M] + eps) if normalize else w_M
    out = []
    for s, f in zip(leaves_s, leaves_f):
      cf = _bcast(c_M, s[idx_M]) * (f[idx_M].astype(jnp.float32) + eps)
      out.append((jnp.sum(cf * s[idx_M].astype(jnp.float32), 0) / jnp.sum(cf, 0))
                 .astype(s.dtype))
    return treedef.unflatten(out)

  return _map_rows(one, (groups, w_GxM), chunk_size)


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
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  _check_like_stack("fishers", fishers, stack)
  fishers = on_one_device(fishers)
  for f in jax.tree.leaves(fishers):
    if not bool(jnp.all(jnp.isfinite(f)) & jnp.all(f >= 0)):
      raise ValueError("fishers: must be finite and >= 0")
  eps = _check_scalar("eps", eps, 0.0, math.inf, lo_open=True, what=" (finite)")
  w = _check_weights(weights, g.shape, average=True)
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


def _regmean_layout(x0: Params, grams: Params, E: int) -> dict[int, int]:
  """Maps kernel leaf index (in x0's flattening) -> gram leaf index; validates shapes."""
  x_paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(x0)[0]]
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


@functools.partial(jax.jit, static_argnames=("layout", "chunk_size"))
def _regmean(x0, stack, grams, groups, w_GxM, alpha, ridge, layout, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  leaves_g = jax.tree.leaves(grams)
  layout = dict(layout)

  def one(idx_M, w_M):
    out = []
    for i, s in enumerate(leaves_s):
      X = s[idx_M].astype(jnp.float32)                             # [M, ...]
      avg = jnp.sum(_bcast(w_M, X) * X, axis=0)
      if i not in layout:
        out.append(avg.astype(s.dtype))
        continue
      G = leaves_g[layout[i]][idx_M].astype(jnp.float32)           # [M, in, in]
      d = G.shape[-1]
      eye = jnp.eye(d, dtype=jnp.float32)
      Gt = G * (alpha + (1.0 - alpha) * eye)[None]                 # off-diagonals * alpha
      A = jnp.sum(_bcast(w_M, Gt) * Gt, axis=0)
      B = jnp.einsum("m,mij,mjo->io", w_M, Gt, X)
      # Ridge toward the average: rows of A that are all zero (inputs dead for every member)
      # would make A singular; there W* falls back to the average. ridge = 0 is RegMean.
      r = ridge * jnp.trace(A) / d + jnp.finfo(jnp.float32).tiny
      W = solve(A + r * eye, B + r * avg)
      out.append(W.astype(s.dtype))
    return treedef.unflatten(out)

  return _map_rows(one, (groups, w_GxM), chunk_size)


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
  E, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  grams = on_one_device(grams)
  layout = _regmean_layout(x0, grams, E)
  alpha = _check_scalar("alpha", alpha, 0.0, 1.0)
  ridge = _check_scalar("ridge", ridge, 0.0, math.inf, what=" (finite)")
  w = _check_weights(weights, g.shape, average=True)
  return _regmean(x0, stack, grams, jnp.asarray(g), jnp.asarray(w), jnp.float32(alpha),
                  jnp.float32(ridge), tuple(sorted(layout.items())), chunk_size)


# ---------------------------------------------------------------------------------------------
# Data-dependent merges with a forward pass: AdaMerging, greedy soup, logit ensemble.

def _check_data(E: int, x: Any, num_classes: Any, mask: Any, heads: Params,
                y: Any = None) -> tuple:
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[0] != E:
    raise ValueError(f"x: must be per-expert inputs [E={E}, N, ...], got shape {x.shape}")
  N = x.shape[1]
  nc = np.asarray(num_classes)
  if nc.shape != (E,) or not np.issubdtype(nc.dtype, np.integer) or np.any(nc < 1):
    raise ValueError(f"num_classes: must be a positive int array [E]=({E},), got {nc.shape}")
  m = np.ones((E, N), np.float32) if mask is None else np.asarray(mask, np.float32)
  if m.shape != (E, N):
    raise ValueError(f"mask: must have shape [E, N]=({E}, {N}), got {m.shape}")
  if np.any(m.sum(1) <= 0):
    raise ValueError("mask: every expert needs at least one real sample")
  for h in jax.tree.leaves(heads):
    if np.shape(h)[:1] != (E,):
      raise ValueError(f"heads: leaves must have a leading expert axis E={E}, got "
                       f"{np.shape(h)}")
  if y is not None:
    y = np.asarray(y)
    if y.shape != (E, N) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"y: must be int labels [E, N]=({E}, {N}), got {y.shape} {y.dtype}")
    y = jnp.asarray(y)
  return x, jnp.asarray(nc, jnp.int32), jnp.asarray(m), y


def _member_logits(model, backbone, heads_M, x_MxN, nc_M):
  """Masked logits [M, N, C] of one backbone with each member's head on its own inputs."""
  M, N = x_MxN.shape[:2]
  h = model.features(backbone, x_MxN.reshape((M * N,) + x_MxN.shape[2:]))
  h = h.reshape((M, N) + h.shape[1:])
  logits = jax.vmap(lambda hd, hm: model.head.apply({"params": hd}, hm))(heads_M, h)
  return jax.vmap(masked_logits)(logits, nc_M)


def _gather_tree(tree, idx):
  return jax.tree.map(lambda a: a[idx], tree)


_GRANULARITIES = ("task", "layer")


@functools.partial(jax.jit, static_argnames=("model", "granularity", "steps", "batch_size",
                                             "chunk_size"))
def _adamerging(x0, stack, groups, gidx, heads, x, nc, mask, key, lr, init, model, granularity,
                steps, batch_size, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  L, M = len(leaves0), groups.shape[1]
  N = x.shape[1]

  def one(gi, idx_M):
    taus = _taus(leaves0, leaves_s, idx_M)
    heads_M, x_M, nc_M, p_M = (_gather_tree(heads, idx_M), x[idx_M], nc[idx_M],
                               mask[idx_M] / jnp.sum(mask[idx_M], 1, keepdims=True))
    kg = jax.random.fold_in(key, gi)

    def entropy(lam, kb):
      lam_MxL = jnp.broadcast_to(lam.reshape(M, -1), (M, L))
      merged = treedef.unflatten([
          a0.astype(jnp.float32) + jnp.sum(_bcast(lam_MxL[:, l], t) * t, axis=0)
          for l, (a0, t) in enumerate(zip(leaves0, taus))])
      rows = jax.vmap(lambda kk, pm: jax.random.choice(kk, N, (batch_size,), p=pm))(
          jax.random.split(kb, M), p_M)
      xb = jax.vmap(lambda xm, r: xm[r])(x_M, rows)
      logp = jax.nn.log_softmax(_member_logits(model, merged, heads_M, xb, nc_M))
      ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)                  # [M, B]
      return jnp.sum(jnp.mean(ent, axis=1))                          # sum over member tasks

    opt = optax.adam(lr)
    lam0 = jnp.full((M,) if granularity == "task" else (M, L), init, jnp.float32)

    def step(carry, i):
      lam, state = carry
      grad = jax.grad(entropy)(lam, jax.random.fold_in(kg, i))
      upd, state = opt.update(grad, state, lam)
      return (jnp.clip(optax.apply_updates(lam, upd), 0.0, 1.0), state), None

    (lam, _), _ = jax.lax.scan(step, (lam0, opt.init(lam0)), jnp.arange(steps))
    return lam

  return _map_rows(one, (gidx, groups), chunk_size)


def adamerging_coefficients(x0: Params, stack: Params, groups: Any, *, model: Any,
                            heads: Params, x: Any, num_classes: Any, key: Any,
                            mask: Any = None, granularity: str = "task", steps: int = 500,
                            lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
                            chunk_size: int | None = CHUNK, tasks: Any = None,
                            group_ids: Any = None) -> Array:
  """AdaMerging coefficients: lam [G, M] (task-wise) or [G, M, L] (layer-wise, one per leaf).

  Minimises sum over member tasks t of the mean prediction entropy of the merged model
  x0 + sum_m lam_m tau_m on unlabeled inputs of task t, where task t's logits use member t's
  own head and `masked_logits` with its num_classes. Adam (lr 1e-3), lam initialised at 0.3
  and projected onto [0, 1] after every step, `steps` = 500 steps of `batch_size` = 16 inputs
  per member drawn with replacement among real rows (Yang et al., ICLR 2024; FusionBench
  `adamerging`). heads: head stack [E, ...]; x: unlabeled inputs per expert [E, N, H, W, C]
  (e.g. its task's test images); mask [E, N] marks real rows; num_classes [E]. Batches of group
  g, step i use fold_in(fold_in(key, g), i).
  """
  E, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if granularity not in _GRANULARITIES:
    raise ValueError(f"granularity: unknown {granularity!r}; allowed: "
                     f"{', '.join(_GRANULARITIES)}")
  x, nc, m, _ = _check_data(E, x, num_classes, mask, heads)
  heads = on_one_device(heads)
  key = _check_key(key)
  for name, v in (("steps", steps), ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}: must be a positive int, got {v!r}")
  lr = _check_scalar("lr", lr, 0.0, math.inf, lo_open=True, what=" (finite)")
  init = _check_scalar("init", init, 0.0, 1.0)
  return _adamerging(x0, stack, jnp.asarray(g), _group_ids(group_ids, g), heads, x, nc, m, key,
                     jnp.float32(lr),
                     jnp.float32(init), model, granularity, int(steps), int(batch_size),
                     chunk_size)


def adamerging(x0: Params, stack: Params, groups: Any, *, model: Any, heads: Params, x: Any,
               num_classes: Any, key: Any, mask: Any = None, granularity: str = "task",
               steps: int = 500, lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
               chunk_size: int | None = CHUNK, tasks: Any = None,
               group_ids: Any = None) -> Params:
  """AdaMerging (Yang et al., ICLR 2024): x = x0 + sum_m lam_m tau_m with lam learned by
  `adamerging_coefficients` (task-wise, or layer-wise = one lam per member and leaf)."""
  lam = adamerging_coefficients(x0, stack, groups, model=model, heads=heads, x=x,
                                num_classes=num_classes, key=key, mask=mask,
                                granularity=granularity, steps=steps, lr=lr,
                                batch_size=batch_size, init=init, chunk_size=chunk_size,
                                tasks=tasks, group_ids=group_ids)
  g = np.asarray(groups, np.int32)
  x0, stack = on_one_device(x0), on_one_device(stack)
  L = _num_leaves(x0)
  lam = jnp.broadcast_to(lam.reshape(lam.shape[:2] + (-1,)), lam.shape[:2] + (L,))
  return _linear(x0, stack, jnp.asarray(g), lam, 1.0 - jnp.sum(lam, axis=1),
                 _check_chunk(chunk_size))


def _accuracy(model, backbone, heads_M, x_M, y_M, nc_M, mask_M):
  """Mean over member tasks of the masked accuracy of `backbone` with each member's head."""
  pred = jnp.argmax(_member_logits(model, backbone, heads_M, x_M, nc_M), axis=-1)
  acc_M = jnp.sum((pred == y_M) * mask_M, axis=1) / jnp.sum(mask_M, axis=1)
  return jnp.mean(acc_M)


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _greedy_soup(x0, stack, groups, heads, x, y, nc, mask, model, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  M = groups.shape[1]

  def one(idx_M):
    X = _members(leaves_s, idx_M)
    data = (_gather_tree(heads, idx_M), x[idx_M], y[idx_M], nc[idx_M], mask[idx_M])
    score = lambda leaves: _accuracy(model, treedef.unflatten(leaves), *data)
    member_acc = jax.vmap(score)(X)                                 # [M]
    order = jnp.argsort(-member_acc, stable=True)

    def add(carry, j):
      total, count, best, included = carry
      cand = [(t + xm[j]) / (count + 1.0) for t, xm in zip(total, X)]
      acc = score(cand)
      take = (count == 0) | (acc >= best)
      total = [jnp.where(take, t + xm[j], t) for t, xm in zip(total, X)]
      return (total, count + take, jnp.where(take, acc, best),
              included.at[j].set(take)), None

    init = ([jnp.zeros_like(a) for a in jax.tree.map(lambda v: v[0], X)], jnp.float32(0.0),
            jnp.float32(-1.0), jnp.zeros((M,), bool))
    (total, count, best, included), _ = jax.lax.scan(add, init, order)
    soup = treedef.unflatten([(t / count).astype(s.dtype) for t, s in zip(total, leaves_s)])
    return soup, {"included": included, "accuracy": best, "member_accuracy": member_acc}

  return _map_rows(one, (groups,), chunk_size)


def greedy_soup(x0: Params, stack: Params, groups: Any, *, model: Any, heads: Params, x: Any,
                y: Any, num_classes: Any, mask: Any = None, chunk_size: int | None = CHUNK,
                tasks: Any = None, return_info: bool = False):
  """Greedy soup (Wortsman et al., ICML 2022, Algorithm 1) on held-out data.

  Members are sorted by held-out accuracy (desc.); starting from the best, each next member is
  added to the soup (uniform average of the ingredients) if the soup's held-out accuracy does
  not drop (>=, as in the paper); otherwise it is skipped. So the soup is never worse than the
  best member. Held-out accuracy of a backbone = mean over member tasks t of its accuracy with
  member t's head on t's data: x [E, N, H, W, C], y [E, N], mask [E, N], num_classes [E],
  heads [E, ...]. Soups assume one task; here each member keeps its own head. return_info adds
  {'included' [G, M] (member order), 'accuracy' [G], 'member_accuracy' [G, M]}.
  """
  E, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  x, nc, m, y = _check_data(E, x, num_classes, mask, heads, y=y)
  heads = on_one_device(heads)
  soup, info = _greedy_soup(x0, stack, jnp.asarray(g), heads, x, y, nc, m, model, chunk_size)
  return (soup, info) if return_info else soup


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _ensemble(stack, groups, w_GxM, heads, x, nc, model, chunk_size):
  def one(idx_M, w_M):
    X = _gather_tree(stack, idx_M)
    heads_M, x_M, nc_M = _gather_tree(heads, idx_M), x[idx_M], nc[idx_M]
    per_backbone = jax.vmap(lambda bb: _member_logits(model, bb, heads_M, x_M, nc_M))(X)
    return jnp.sum(_bcast(w_M, per_backbone) * per_backbone, axis=0)  # [M, N, C]

  return _map_rows(one, (groups, w_GxM), chunk_size)


def ensemble(x0: Params, stack: Params, groups: Any, weights: Any = None, *, model: Any,
             heads: Params, x: Any, num_classes: Any, chunk_size: int | None = CHUNK,
             tasks: Any = None) -> Array:
  """Logit ensemble, the non-merged reference: PREDICTIONS, not parameters.

  Returns logits [G, M, N, C]: for member task t of group g, sum_j w_j head_t(features(x_j,
  x_t)) over the members j (w normalised, default 1/M), masked to task t's classes. x0 is
  unused (kept for a uniform signature). x [E, N, H, W, C], heads [E, ...], num_classes [E].
  """
  E, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  x, nc, _, _ = _check_data(E, x, num_classes, None, heads)
  heads = on_one_device(heads)
  w = _check_weights(weights, g.shape, average=True)
  return _ensemble(stack, jnp.asarray(g), jnp.asarray(w), heads, x, nc, model, chunk_size)


# ---------------------------------------------------------------------------------------------
# Geometric merges: SLERP, Model Stock.

@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _slerp(x0, stack, groups, t, dot_threshold, eps, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)

  def one(idx_M):
    out = []
    for v in _taus(leaves0, leaves_s, idx_M):
      v0, v1 = v[0], v[1]
      n0, n1 = jnp.sqrt(jnp.sum(v0 * v0)), jnp.sqrt(jnp.sum(v1 * v1))
      u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
      u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
      dot = jnp.sum(u0 * u1)
      lerp = (1.0 - t) * v0 + t * v1
      theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
      sin = jnp.sin(theta)
      safe = jnp.where(sin > 0, sin, 1.0)
      sl = (jnp.sin(theta - t * theta) / safe) * v0 + (jnp.sin(t * theta) / safe) * v1
      out.append(jnp.where(jnp.abs(dot) > dot_threshold, lerp, sl))
    return _finish(leaves0, leaves_s, treedef, out, 1.0)

  return _map_rows(one, (groups,), chunk_size)


def slerp(x0: Params, stack: Params, groups: Any, *, t: float = 0.5,
          dot_threshold: float = 0.9995, eps: float = 1e-8, chunk_size: int | None = CHUNK,
          tasks: Any = None) -> Params:
  """Spherical interpolation of the two task vectors of each pair (M = 2), per leaf.

  With u_i = tau_i/||tau_i|| (left unnormalised if ||tau_i|| <= eps), theta = arccos(u_0.u_1):
  tau = sin((1-t) theta)/sin(theta) tau_0 + sin(t theta)/sin(theta) tau_1, or the lerp
  (1-t) tau_0 + t tau_1 when |u_0.u_1| > dot_threshold (nearly parallel); x = x0 + tau.
  Defaults t = 0.5, dot_threshold = 0.9995, eps = 1e-8 follow FusionBench `slerp` (which
  applies it to the weights; here, as asked, to the task vectors).
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if g.shape[1] != 2:
    raise ValueError(f"groups: slerp merges pairs (M=2), got M={g.shape[1]}")
  t = _check_scalar("t", t, 0.0, 1.0)
  dot_threshold = _check_scalar("dot_threshold", dot_threshold, 0.0, 1.0)
  eps = _check_scalar("eps", eps, 0.0, math.inf, what=" (finite)")
  return _slerp(x0, stack, jnp.asarray(g), jnp.float32(t), jnp.float32(dot_threshold),
                jnp.float32(eps), chunk_size)


_STOCK_EPS = 1e-8  # FusionBench model_stock EPS, in both the cosine and the ratio


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _model_stock(x0, stack, groups, chunk_size):
  leaves0, leaves_s, treedef = _flat(x0, stack)
  M = groups.shape[1]
  iu = np.triu_indices(M, 1)

  def one(idx_M):
    out = []
    for a0, t in zip(leaves0, _taus(leaves0, leaves_s, idx_M)):
      tf = t.reshape(M, -1)
      gram = tf @ tf.T
      nrm = jnp.diag(gram)
      cos = gram / (jnp.sqrt(nrm[:, None] * nrm[None, :]) + _STOCK_EPS)
      theta = jnp.mean(jnp.arccos(jnp.clip(cos[iu], -1.0, 1.0)))      # mean pairwise angle
      c = jnp.cos(theta)
      ratio = M * c / ((M - 1) * c + 1.0 + _STOCK_EPS)
      out.append(ratio * jnp.mean(t, axis=0))
    return _finish(leaves0, leaves_s, treedef, out, 1.0)

  return _map_rows(one, (groups,), chunk_size)


def model_stock(x0: Params, stack: Params, groups: Any, *, chunk_size: int | None = CHUNK,
                tasks: Any = None) -> Params:
  """Model Stock (Jang et al., ECCV 2024), per leaf ("layer"):

    t = M cos(theta) / (1 + (M - 1) cos(theta)),  x = t * avg_m x_m + (1 - t) * x0,

  theta the angle between task vectors (for M > 2 the mean pairwise angle, as FusionBench
  `model_stock`; eps 1e-8 in the cosine and the ratio as there). Needs M >= 2. The formula
  assumes cos(theta) > 0; a negative cosine gives t < 0.
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if g.shape[1] < 2:
    raise ValueError(f"groups: model_stock needs M >= 2 members, got M={g.shape[1]}")
  return _model_stock(x0, stack, jnp.asarray(g), chunk_size)


# ---------------------------------------------------------------------------------------------
# Task-vector diagnostics.

@functools.partial(jax.jit, static_argnames=("k", "with_dare", "chunk_size"))
def _diagnostics(x0, stack, groups, gidx, key, p, k, with_dare, chunk_size):
  leaves0, leaves_s, _ = _flat(x0, stack)
  M = groups.shape[1]
  D = sum(a.size for a in leaves0)
  shapes = [a.shape for a in leaves0]

  def conflict(taus):
    """Fraction of coordinates where the nonzero entries disagree in sign."""
    pos = sum(jnp.sum(jnp.any(t > 0, 0) & jnp.any(t < 0, 0)) for t in taus)
    return pos / D

  def one(gi, idx_M):
    taus = _taus(leaves0, leaves_s, idx_M)
    flat = jnp.concatenate([t.reshape(M, -1) for t in taus], axis=1)  # [M, D]
    gram = flat @ flat.T
    norm = jnp.sqrt(jnp.diag(gram))
    trimmed = jax.vmap(_trim, (0, None))(taus, k)
    merged = _ties_merge(trimmed)
    out = {
        "tau_norm": norm,
        "cosine": gram / jnp.maximum(norm[:, None] * norm[None, :], 1e-30),
        "sign_conflict": conflict(taus),
        "ties_sign_conflict": conflict(trimmed),
        "ties_sparsity": 1.0 - sum(jnp.sum(t != 0, axis=tuple(range(1, t.ndim)))
                                   for t in trimmed) / D,
        "ties_merged_sparsity": 1.0 - sum(jnp.sum(d != 0) for d in merged) / D,
    }
    if with_dare:
      masks = _dare_masks(key, gi, M, shapes, p)
      out["dare_sparsity"] = 1.0 - sum(jnp.sum(mk, axis=tuple(range(1, mk.ndim)))
                                       for mk in masks) / D
    return out

  return _map_rows(one, (gidx, groups), chunk_size)


def diagnostics(x0: Params, stack: Params, groups: Any, *, k: float = 0.2, p: float = 0.5,
                key: Any = None, chunk_size: int | None = CHUNK,
                tasks: Any = None, group_ids: Any = None) -> dict[str, Array]:
  """Task-vector diagnostics per group (whole backbone flattened, D coordinates):

    tau_norm [G, M]            ||tau_m||
    cosine [G, M, M]           pairwise cosine similarity of the task vectors
    sign_conflict [G]          fraction of coordinates whose nonzero tau_m disagree in sign
    ties_sign_conflict [G]     the same after the TIES trim (top-k)
    ties_sparsity [G, M]       realised fraction of zeros of each trimmed tau_m (ties at the
                               threshold can keep more than k)
    ties_merged_sparsity [G]   fraction of zeros of the TIES merged update tau*
    dare_sparsity [G, M]       realised fraction dropped by the DARE masks that `dare(key=key,
                               p=p)` uses (only when key is given)
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  k = _check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  p = _check_scalar("p", p, 0.0, 1.0, hi_open=True, what=" (drop rate)")
  with_dare = key is not None
  key = _check_key(key) if with_dare else jax.random.key(0)
  return _diagnostics(x0, stack, jnp.asarray(g), _group_ids(group_ids, g), key,
                      jnp.float32(p), k, with_dare, chunk_size)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics.

BATCH_STATS_MODES = ("average", "frozen", "recompute")


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "chunk_size"))
def _recompute_stats(merged, stats0, groups, x, mask, model, batch_size, chunk_size):
  # Momentum 0: one training-mode pass sets the running statistics to the block's own.
  net = model.backbone.clone(bn_momentum=0.0)
  N = x.shape[1]

  def one(bb, idx_M):
    R = idx_M.shape[0] * N
    nb = -(-R // batch_size)
    xs = x[idx_M].reshape((R,) + x.shape[2:])
    xs = jnp.concatenate([xs, jnp.zeros((nb * batch_size - R,) + xs.shape[1:], xs.dtype)])
    ms = jnp.concatenate([mask[idx_M].reshape(R) > 0, jnp.zeros((nb * batch_size - R,), bool)])
    bb = {**bb, "batch_stats": stats0}  # finite start values whatever the merge produced

    def block(args):
      xb, mb = args
      _, new = net.apply(bb, xb, train=True, mask=mb, mutable=["batch_stats"])
      return new["batch_stats"], jnp.sum(mb)

    stats, counts = jax.lax.map(block, (xs.reshape((nb, batch_size) + xs.shape[1:]),
                                        ms.reshape(nb, batch_size)))
    w = counts / jnp.sum(counts)
    # A block with no real rows has NaN statistics and weight 0.
    return jax.tree.map(lambda s: jnp.sum(jnp.where(_bcast(counts > 0, s), s, 0.0)
                                          * _bcast(w, s), axis=0), stats)

  return _map_rows(one, (merged, groups), chunk_size)


def merge_batch_stats(merged: Params, x0: Params, stack: Params, groups: Any, *,
                      mode: str = "average", model: Any = None, x: Any = None, mask: Any = None,
                      batch_size: int = 256, chunk_size: int | None = CHUNK,
                      tasks: Any = None) -> Params:
  """Merged backbones [G, ...] whose BatchNorm running statistics ('batch_stats') are set by
  `mode`; parameters are left as merged.

    average    mean of the members' statistics: what averaging PyTorch state_dicts (buffers
               included) does, and what `average` already gives (the paper's setting)
    frozen     x0's statistics
    recompute  the merged backbone's own statistics on its members' data x [E, N, ...] (mask
               [E, N]): training-mode passes over blocks of `batch_size` rows, per-block batch
               statistics averaged by real-row count (torch.optim.swa_utils.update_bn, which
               uses momentum=None, weights batches equally); exact for one block. Needs a
               backbone with a `bn_momentum` field; under norm='frozen_batch' it returns x0's.
  Other merges treat the statistics as parameters (task arithmetic, TIES, ... of mean and var,
  which can leave a variance negative); set them with this afterwards.
  """
  _, g, chunk_size = _prepare(x0, stack, groups, tasks, chunk_size)
  if not isinstance(x0, dict) or "batch_stats" not in x0:
    raise ValueError("x0: has no 'batch_stats' collection; only backbones with BatchNorm "
                     "(Model.state) have statistics to merge")
  if mode not in BATCH_STATS_MODES:
    raise ValueError(f"mode: unknown {mode!r}; allowed: {', '.join(BATCH_STATS_MODES)}")
  G = g.shape[0]
  if jax.tree.structure(merged) != jax.tree.structure(x0) or any(
      np.shape(m) != (G,) + np.shape(a) for m, a in zip(jax.tree.leaves(merged),
                                                        jax.tree.leaves(x0))):
    raise ValueError(f"merged: must be x0's tree with a leading axis G={G}")
  x0, stack, merged = on_one_device(x0), on_one_device(stack), on_one_device(merged)
  if mode == "average":
    stats = average(x0["batch_stats"], stack["batch_stats"], g, chunk_size=chunk_size)
  elif mode == "frozen":
    stats = jax.tree.map(lambda a: jnp.broadcast_to(a, (G,) + a.shape), x0["batch_stats"])
  else:
    if model is None or "batch_stats" not in getattr(model, "state", ()) \
        or not hasattr(model.backbone, "bn_momentum"):
      raise ValueError("model: recompute needs the Model whose backbone has BatchNorm "
                       "(state ('batch_stats',) and a bn_momentum field)")
    E = jax.tree.leaves(stack)[0].shape[0]
    x = jnp.asarray(x) if x is not None else None
    if x is None or x.ndim < 3 or x.shape[0] != E:
      raise ValueError(f"x: recompute needs per-expert inputs [E={E}, N, ...], got "
                       f"{None if x is None else x.shape}")
    m = np.ones(x.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32)
    if m.shape != x.shape[:2]:
      raise ValueError(f"mask: must have shape [E, N]={x.shape[:2]}, got {m.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
        or batch_size < 1:
      raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    stats = _recompute_stats(merged, x0["batch_stats"], jnp.asarray(g), x, jnp.asarray(m),
                             model, int(batch_size), chunk_size)
  return {**merged, "batch_stats": stats}


# ---------------------------------------------------------------------------------------------
# Registry.

ALGORITHMS: dict[str, Callable[..., Params]] = {
    "average": average,
    "weighted_average": weighted_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_average": functools.partial(dare, base="average"),
    "dare_task_arithmetic": functools.partial(dare, base="task_arithmetic"),
    "dare_ties": functools.partial(dare, base="ties"),
    "fisher": fisher,
    "regmean": regmean,
    "adamerging": adamerging,
    "adamerging_task": functools.partial(adamerging, granularity="task"),
    "adamerging_layer": functools.partial(adamerging, granularity="layer"),
    "uniform_soup": uniform_soup,
    "greedy_soup": greedy_soup,
    "slerp": slerp,
    "model_stock": model_stock,
}


def get(name: str) -> Callable[..., Params]:
  """The merge function registered under `name` (`ensemble` is not a merge: call it directly)."""
  if name not in ALGORITHMS:
    raise ValueError(f"algorithm: unknown merge {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name]


def merge(name: str, x0: Params, stack: Params, groups: Any, **hparams) -> Params:
  """`get(name)(x0, stack, groups, **hparams)`: hparams are that function's keyword arguments
  (e.g. weights, lam, k, p, key, chunk_size); returns the merged backbones, leaves [G, ...]."""
  return get(name)(x0, stack, groups, **hparams)
