"""Estimators of the constants in the bounds, for ONE model; `jax.vmap` them over an expert axis.

  L       top Hessian eigenvalue of the (masked) mean loss by power iteration on Hessian-vector
          products (jvp of grad); the Rayleigh quotient gives the sign, |lam| the smoothness.
          Along a trajectory this is a local estimate of L, not the global constant.
  G       per-sample gradient norms ||grad f(params; x_i, y_i)||: max and quantiles.
  sigma2  (1/N) sum_i ||g_i - g_bar||^2, g_bar the mean gradient (two passes, no cancellation).
  zeta2   sum_m w_m ||g_m - sum_m' w_m' g_m'||^2 over task mean gradients g_m.

`loss_fn(params, x, y) -> scalar` is the loss of one sample; params is any pytree; x [N, ...],
y [N]; mask [N] (1 = real sample, 0 = padding) so padded batches give the unpadded answer
(padding rows must still give a finite loss, e.g. zeros).
Per-sample gradients are computed `chunk` samples at a time (lax.map), so memory is
O(chunk * #params), never O(N * #params).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
PyTree = Any


def _mask(mask: jax.Array | None, y: jax.Array) -> jax.Array:
  n = y.shape[0]
  return jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)


def mean_loss(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
              mask: jax.Array | None = None) -> jax.Array:
  """Masked mean of loss_fn over the batch."""
  m = _mask(mask, y)
  per = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, x, y)
  return jnp.sum(jnp.where(m > 0, m * per, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def mean_gradient(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                  mask: jax.Array | None = None) -> PyTree:
  """Gradient of the masked mean loss (= masked mean of per-sample gradients)."""
  return jax.grad(mean_loss, argnums=1)(loss_fn, params, x, y, mask)


def top_hessian_eigenvalue(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                           key: jax.Array, mask: jax.Array | None = None,
                           num_iters: int = 100) -> dict[str, jax.Array]:
  """Power iteration v <- Hv/||Hv|| from a normal start drawn with `key`.

  Returns lam (signed Rayleigh quotient v.Hv, the eigenvalue of largest magnitude), L = |lam|
  and residual ||Hv - lam v|| (large means not converged, e.g. +-lam pairs or a small gap).
  """
  flat, unravel = ravel_pytree(params)
  f = lambda v: mean_loss(loss_fn, unravel(v), x, y, mask)
  hvp = lambda v: jax.jvp(jax.grad(f), (flat,), (v,))[1]

  def normalise(v):
    nv = jnp.linalg.norm(v)
    return v / jnp.where(nv > 0, nv, 1.0)

  v = normalise(jax.random.normal(key, flat.shape, flat.dtype))
  v = jax.lax.fori_loop(0, num_iters, lambda _, v: normalise(hvp(v)), v)
  hv = hvp(v)
  lam = jnp.vdot(v, hv)
  return dict(lam=lam, L=jnp.abs(lam), residual=jnp.linalg.norm(hv - lam * v))


def _tree_sq_dist(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.sum((u - v)**2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gradient_stats(loss_fn: LossFn, params: PyTree, x: jax.Array, y: jax.Array,
                   mask: jax.Array | None = None,
                   quantiles: Sequence[float] = (0.5, 0.9, 0.99),
                   chunk: int = 64) -> dict[str, jax.Array]:
  """Per-sample gradient norms and variance.

  Returns norms [N] (nan at padding), G_max = max_i ||g_i||, G_q [len(quantiles)] (linear
  interpolation, as numpy.quantile), sigma2 = (1/N) sum_i ||g_i - g_bar||^2, grad_norm = ||g_bar||.
  """
  m = _mask(mask, y)
  g_bar = mean_gradient(loss_fn, params, x, y, mask)
  zero = jax.tree.map(jnp.zeros_like, g_bar)

  def one(xy):
    g = jax.grad(loss_fn)(params, *xy)
    return _tree_sq_dist(g, zero), _tree_sq_dist(g, g_bar)

  sq, dev = jax.lax.map(one, (x, y), batch_size=min(chunk, y.shape[0]))
  valid = m > 0
  norms = jnp.where(valid, jnp.sqrt(sq), jnp.nan)
  N = jnp.maximum(jnp.sum(m), 1.0)
  return dict(
      norms=norms,
      G_max=jnp.max(jnp.where(valid, jnp.sqrt(sq), 0.0)),
      G_q=jnp.nanquantile(norms, jnp.asarray(quantiles)),
      sigma2=jnp.sum(jnp.where(valid, dev, 0.0)) / N,
      grad_norm=jnp.sqrt(_tree_sq_dist(g_bar, zero)),
  )


def gradient_dispersion(grads: PyTree, w: jax.Array | None = None) -> jax.Array:
  """zeta2 = sum_m w_m ||g_m - g_bar||^2, g_bar = sum_m w_m g_m; grads has a leading task axis M."""
  flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)  # [M, P]
  M = flat.shape[0]
  w = jnp.full((M,), 1.0 / M, flat.dtype) if w is None else jnp.asarray(w, flat.dtype)
  g_bar = w @ flat
  return jnp.sum(w * jnp.sum((flat - g_bar[None, :])**2, axis=-1))


def task_dispersion(loss_fn: LossFn, params: PyTree, xs: jax.Array, ys: jax.Array,
                    masks: jax.Array | None = None, w: jax.Array | None = None) -> jax.Array:
  """zeta2 of the task mean gradients at shared params; xs [M, N, ...], ys [M, N], masks [M, N].

  For task-specific loss functions or heads, compute each task's `mean_gradient` with respect to
  the shared parameters, stack them, and call `gradient_dispersion`.
  """
  if masks is None:
    masks = jnp.ones(ys.shape[:2], jnp.float32)
  grads = jax.vmap(lambda x, y, m: mean_gradient(loss_fn, params, x, y, m))(xs, ys, masks)
  return gradient_dispersion(grads, w)
