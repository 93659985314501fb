"""Magnitude-selection merges: Model Breadcrumbs (trim both tails per layer), MagMax (per-
parameter max-magnitude selection across task vectors), DELLA (magnitude-ranked drop
probabilities, then TIES's elect and disjoint mean) and EMR-Merging (elect a unified task
vector, per-task masks and rescalers: per-member backbones).

Their masks depend on the task vectors (DELLA's also on a key; none on data): `masked`, not
`linear`, so outside the linear-merge stability theorem (docs/merging.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from stability.merging import sparse
from stability.merging.base import (CHUNK, Params, bcast, check_group_ids, check_key,
                                    check_scalar, finish, flatten_stack, map_rows, prepare,
                                    task_vectors)
from stability.sharding import on_one_device


def _breadcrumbs_keep(t: jax.Array, top: float, bottom: float) -> jax.Array:
  """Keep mask of one task vector's leaf t: drop its floor(bottom * n) smallest and
  floor(top * n) largest magnitudes (entries equal to a cut-off value are dropped with it)."""
  a = jnp.abs(t).reshape(-1)
  n = a.shape[0]
  v = jnp.sort(a)
  n_bot, n_top = int(math.floor(bottom * n + 1e-9)), int(math.floor(top * n + 1e-9))
  keep = jnp.ones(t.shape, bool)
  if n_bot > 0:
    keep &= jnp.abs(t) > v[n_bot - 1]
  if n_top > 0:
    keep &= jnp.abs(t) < v[n - n_top]
  return keep


@functools.partial(jax.jit, static_argnames=("top", "bottom", "chunk_size"))
def _breadcrumbs(x0, stack, groups, lam, top, bottom, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    delta = []
    for t in task_vectors(leaves0, leaves_s, idx_M):
      keep = jax.vmap(lambda r: _breadcrumbs_keep(r, top, bottom))(t)
      delta.append(jnp.where(keep, t, 0.0).sum(0))
    return finish(leaves0, leaves_s, treedef, delta, lam)

  return map_rows(one, (groups,), chunk_size)


def breadcrumbs(x0: Params, stack: Params, groups: Any, *, top: float = 0.01,
                bottom: float = 0.85, lam: float = 0.3, chunk_size: int | None = CHUNK,
                tasks: Any = None) -> Params:
  """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per task vector and per leaf, drop the
  `top` fraction of largest and the `bottom` fraction of smallest magnitudes (the outliers and
  the noise), then task arithmetic: x = x0 + lam * sum_m masked tau_m. Defaults: top = 0.01,
  bottom = 0.85, lam = 0.3 (FusionBench `model_breadcrumbs`-like settings; top + bottom < 1).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  top = check_scalar("breadcrumbs: top", top, 0.0, 1.0, hi_open=True, what=" (fraction)")
  bottom = check_scalar("breadcrumbs: bottom", bottom, 0.0, 1.0, hi_open=True,
                        what=" (fraction)")
  if top + bottom >= 1.0:
    raise ValueError(f"breadcrumbs: top + bottom must be < 1 (something must be kept), got "
                     f"{top} + {bottom}")
  lam = check_scalar("breadcrumbs: lam", lam, 0.0, math.inf, what=" (finite)")
  return _breadcrumbs(x0, stack, jnp.asarray(g), jnp.float32(lam), top, bottom, chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _magmax(x0, stack, groups, lam, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    delta = []
    for t in task_vectors(leaves0, leaves_s, idx_M):
      i = jnp.argmax(jnp.abs(t), axis=0)
      delta.append(jnp.take_along_axis(t, i[None], axis=0)[0])
    return finish(leaves0, leaves_s, treedef, delta, lam)

  return map_rows(one, (groups,), chunk_size)


def magmax(x0: Params, stack: Params, groups: Any, *, lam: float = 1.0,
           chunk_size: int | None = CHUNK, tasks: Any = None) -> Params:
  """MagMax (Marczak et al., ECCV 2024): per parameter, the task-vector entry of largest
  magnitude across members (the first member on a tie), x = x0 + lam * tau_MM (lam default
  1.0)."""
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  lam = check_scalar("magmax: lam", lam, 0.0, math.inf, what=" (finite)")
  return _magmax(x0, stack, jnp.asarray(g), jnp.float32(lam), chunk_size)


def della_drop_probs(t: jax.Array, p, eps) -> jax.Array:
  """DELLA's MagPrune drop probabilities of one leaf t: p_i = p - eps/2 + eps r_i / n, r_i the
  rank of |t_i| in descending order (0 = largest; ties by position), clipped to [0, 1)."""
  a = jnp.abs(t).reshape(-1)
  r = jnp.argsort(jnp.argsort(-a, stable=True), stable=True).astype(jnp.float32)
  return jnp.clip(p - eps / 2 + eps * r / a.shape[0], 0.0, 1.0 - 2.0**-24).reshape(t.shape)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _della(x0, stack, groups, gidx, key, p, eps, lam, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]

  def one(gi, idx_M):
    seeds, pruned, offset = sparse.dare_seeds(key, gi, M), [], 0
    for t in task_vectors(leaves0, leaves_s, idx_M):
      pi = jax.vmap(lambda r: della_drop_probs(r, p, eps))(t)
      keep = jax.vmap(lambda sd, q: sparse.dare_keep(sd, offset, t.shape[1:], q))(seeds, pi)
      pruned.append(jnp.where(keep, t / (1.0 - pi), 0.0))
      offset += math.prod(t.shape[1:])
    return finish(leaves0, leaves_s, treedef, sparse.ties_merge(pruned), lam)

  return map_rows(one, (gidx, groups), chunk_size)


def della(x0: Params, stack: Params, groups: Any, *, key: Any, p: float = 0.5,
          eps: float = 0.1, lam: float = 1.0, chunk_size: int | None = CHUNK,
          tasks: Any = None, group_ids: Any = None) -> Params:
  """DELLA (Deep et al., 2024): MagPrune, then TIES's elect and disjoint mean.

  Per task vector and leaf, entry i is dropped with probability p_i = p - eps/2 + eps r_i / n
  (r_i its magnitude rank, 0 = largest: large entries are dropped least; `della_drop_probs`)
  and kept ones are rescaled by 1 / (1 - p_i); then the elected sign (sign of the sum, zeros
  -> majority) and the mean of the agreeing entries, x = x0 + lam * tau*. The draws are DARE's
  counter-based hash masks (`sparse.dare_masks`: u >= p_i, keyed by fold_in(key, group id) and
  member), so a twin group given its original's id shares them. p in [0, 1), eps in [0, 2 min(p,
  1 - p)] so every p_i lies in [0, 1).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  p = check_scalar("della: p", p, 0.0, 1.0, hi_open=True, what=" (mean drop rate)")
  eps = check_scalar("della: eps", eps, 0.0, 2 * min(p, 1.0 - p),
                     what=f" (drop-rate spread; 2 min(p, 1 - p) = {2 * min(p, 1 - p):g} at p={p})")
  lam = check_scalar("della: lam", lam, 0.0, math.inf, what=" (finite)")
  key = check_key(key)
  return _della(x0, stack, jnp.asarray(g), check_group_ids(group_ids, g), key, jnp.float32(p),
                jnp.float32(eps), jnp.float32(lam), chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _emr(x0, stack, groups, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    taus = task_vectors(leaves0, leaves_s, idx_M)
    uni, masks = [], []
    for t in taus:
      gamma = jnp.sign(t.sum(0))
      agree = t * gamma[None] > 0
      eps_ = jnp.max(jnp.where(agree, jnp.abs(t), 0.0), axis=0)
      uni.append(gamma * eps_)
      masks.append(agree)
    num = sum(jnp.sum(jnp.abs(t).reshape(t.shape[0], -1), axis=1) for t in taus)
    den = sum(jnp.sum(jnp.abs(jnp.where(mk, u[None], 0.0)).reshape(mk.shape[0], -1), axis=1)
              for mk, u in zip(masks, uni))
    scale = num / jnp.where(den > 0, den, 1.0)                                    # [M]
    out = [(a0.astype(jnp.float32)[None] + bcast(scale, mk) * jnp.where(mk, u[None], 0.0))
           .astype(s.dtype) for a0, s, mk, u in zip(leaves0, leaves_s, masks, uni)]
    return treedef.unflatten(out)

  return map_rows(one, (groups,), chunk_size)


def emr(x0: Params, stack: Params, groups: Any, *, chunk_size: int | None = CHUNK,
        tasks: Any = None) -> Params:
  """EMR-Merging (Huang et al., NeurIPS 2024): elect, mask, rescale. Returns PER-MEMBER backbones
  with leaves [G, M, ...]: row m is the model of member m's task (x0 + lambda_m M_m * tau_uni),
  to be paired with member m's own head.

  tau_uni = gamma * eps with gamma = sign(sum_m tau_m) and eps the largest |tau_m| among members
  whose sign agrees with gamma (0 if none); M_m = [tau_m * tau_uni > 0]; lambda_m = sum |tau_m|
  / sum |M_m * tau_uni| (sums over every parameter; 1 where the denominator is 0). Tuning-free.
  Not a "merged backbone per group" like the others: the registry excludes it from the studies
  (docs/merging.md: how a study evaluates it).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  return _emr(x0, stack, jnp.asarray(g), chunk_size)
