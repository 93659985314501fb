"""Sparsifying merges: TIES (trim, elect sign, disjoint mean) and DARE (random drop and
rescale, then a base merge), with the hash masks DARE draws.

DARE masks: group g's masks are keyed by fold_in(key, id_g), id_g = group_ids[g] (default: g,
the group's row). Member m keeps entry j of the backbone flattened in tree order (D
coordinates) iff u >= p, u = (h >> 8) 2^-24, h = mix(mix(j ^ s0) + s1), (s0, s1) =
random.bits(fold_in(fold_in(key, id_g), m)) and mix the lowbias32 hash (`dare_masks`). So
masks do not depend on chunk_size, and a stability twin group given its original group's id
gets the same masks. `trim`, `ties_merge` and `dare_masks` are shared with `diagnostics`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stability.merging.base import (CHUNK, Array, Params, check_group_ids, check_key,
                                    check_scalar, check_weights, finish, flatten_stack,
                                    map_rows, prepare, task_vectors)
from stability.merging.select import kth_largest
from stability.sharding import on_one_device


def n_keep(k: float, D: int) -> int:
  """ceil(k * D), robust to float error (k = 0.2, D = 100 keeps 20), at least 1."""
  return int(min(D, max(1, math.ceil(round(k * D, 6)))))


def trim(tau_leaves: list, k: float) -> list:
  """TIES trim of ONE task vector: keep entries with |tau| >= its ceil(k*D)-th largest |tau|.

  The magnitude ranking is global over all leaves (as in the TIES reference code, which
  flattens the state dict); ties at the threshold are kept. The threshold is exact and found
  without sorting (`select.kth_largest`).
  """
  flat = jnp.concatenate([jnp.abs(t).reshape(-1) for t in tau_leaves])
  n = n_keep(k, flat.shape[0])
  if n >= flat.shape[0]:
    return list(tau_leaves)
  thr = kth_largest(flat, n)
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


def ties_merge(tau_leaves_M: list) -> list:
  """TIES merged update tau* of trimmed task vectors (leaves [M, ...]): elect, disjoint mean."""
  return _disjoint_mean(tau_leaves_M, _elect(tau_leaves_M))


_TRIM_CHUNK = 16


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _ties(x0, stack, uniq_U, inv_GxM, lam, k, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  # Trimming is per task vector, so it is done once per distinct expert, not once per member,
  # _TRIM_CHUNK experts at a time so the selection's counting passes stay in cache.
  trim_one = lambda u: trim([s[u].astype(jnp.float32) - a0.astype(jnp.float32)
                             for a0, s in zip(leaves0, leaves_s)], k)
  trimmed = map_rows(trim_one, (uniq_U,), min(_TRIM_CHUNK, chunk_size or _TRIM_CHUNK))

  def one(idx_M):
    return finish(leaves0, leaves_s, treedef, ties_merge([t[idx_M] for t in trimmed]), lam)

  return map_rows(one, (inv_GxM,), chunk_size)


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
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  k = check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  lam = check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
  uniq, inv = _unique(g)
  return _ties(x0, stack, jnp.asarray(uniq), jnp.asarray(inv), jnp.float32(lam), k, chunk_size)


def _mix32(x: Array) -> Array:
  """lowbias32 (C. Wellons' 32-bit integer hash: full avalanche, bias ~1.7e-4) on uint32."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dare_seeds(key: Array, gi: Array, M: int) -> Array:
  """[M, 2] uint32: member m's seeds in group gi, random.bits(fold_in(fold_in(key, gi), m))."""
  kg = jax.random.fold_in(key, gi)
  return jax.vmap(lambda m: jax.random.bits(jax.random.fold_in(kg, m), (2,), jnp.uint32))(
      jnp.arange(M))


def dare_keep(seed: Array, offset: int, shape: tuple, p: Array) -> Array:
  """One member's keep mask for one leaf (its coordinates start at `offset` in the flattened
  backbone): entry j is kept iff u >= p, u = (h >> 8) 2^-24, h = mix(mix(j ^ s0) + s1). p is a
  scalar, or per-entry thresholds of the leaf's shape (DELLA's magnitude-ranked drop rates)."""
  j = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + jnp.uint32(offset)
  u = (_mix32(_mix32(j ^ seed[0]) + seed[1]) >> 8).astype(jnp.float32) * (2.0 ** -24)
  return u >= p


def dare_masks(key: Array, gi: Array, M: int, shapes: list, p: Array) -> list:
  """Keep masks, leaves [M, ...], of group gi: Bernoulli(1 - p) per entry, entry j of member m
  (the backbone flattened in tree order, D coordinates) from a counter-based hash of j keyed by
  jax.random seeds per (group, member) (`dare_seeds`, `dare_keep`).

  The hash (two rounds of `_mix32`) costs ~0.5 ns per entry on CPU against ~13 for drawing
  [M, D] threefry bits, which dominated DARE's time, and it fuses into the masking.
  """
  seeds = dare_seeds(key, gi, M)
  offsets = np.cumsum([0] + [math.prod(s) for s in shapes]).tolist()
  return [jax.vmap(lambda sd: dare_keep(sd, off, tuple(s), p))(seeds)
          for off, s in zip(offsets, shapes)]


_DARE_BASES = ("average", "task_arithmetic", "ties")


@functools.partial(jax.jit, static_argnames=("base", "rescale", "k", "chunk_size"))
def _dare(x0, stack, groups, gidx, w_GxM, key, p, lam, base, rescale, k, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]
  shapes = [a0.shape for a0 in leaves0]
  scale = 1.0 / (1.0 - p) if rescale else jnp.float32(1.0)

  def one(gi, idx_M, w_M):
    if base == "ties":
      masks = dare_masks(key, gi, M, shapes, p)
      taus = [jnp.where(mk, t * scale, 0.0)
              for mk, t in zip(masks, task_vectors(leaves0, leaves_s, idx_M))]
      return finish(leaves0, leaves_s, treedef, ties_merge(jax.vmap(trim, (0, None))(
          taus, k)), lam)
    # Linear bases: one fused pass per member and leaf (mask, rescale, weight, accumulate), as
    # `base.linear_combination`, so no [M, ...] slab of masks or task vectors is materialised
    # (5x faster).
    seeds, delta, offset = dare_seeds(key, gi, M), [], 0
    for a0, s in zip(leaves0, leaves_s):
      a0f, acc = a0.astype(jnp.float32), jnp.zeros(a0.shape, jnp.float32)
      for m in range(M):
        tau = (s[idx_M[m]].astype(jnp.float32) - a0f) * scale
        acc = acc + w_M[m] * jnp.where(dare_keep(seeds[m], offset, a0.shape, p), tau, 0.0)
      delta.append(acc)
      offset += a0.size
    return finish(leaves0, leaves_s, treedef, delta, lam)

  return map_rows(one, (gidx, groups, w_GxM), chunk_size)


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
  Defaults p = 0.5, rescale = True follow FusionBench `dare/*`. Masks: see this module's
  docstring (keyed by the group's row). p = 0 reproduces `base` exactly. chunk_size 'auto':
  all groups at once for the linear bases (fused like the linear merges, nothing materialised
  beyond the output), `CHUNK` for 'ties' (which holds [M, ...] slabs per group).
  """
  if isinstance(chunk_size, str) and chunk_size == "auto":
    chunk_size = CHUNK if base == "ties" else None
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if base not in _DARE_BASES:
    raise ValueError(f"base: unknown DARE base merge {base!r}; allowed: {', '.join(_DARE_BASES)}")
  p = check_scalar("p", p, 0.0, 1.0, hi_open=True, what=" (drop rate)")
  k = check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  key = check_key(key)
  if base == "average":
    w, lam = check_weights(weights, g.shape, average=True), 1.0
  else:
    if base == "ties" and weights is not None:
      raise ValueError("weights: not supported by base='ties'")
    lam = {"task_arithmetic": 0.3, "ties": 1.0}[base] if lam is None else lam
    lam = check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
    w = check_weights(weights, g.shape, average=False)
  return _dare(x0, stack, jnp.asarray(g), check_group_ids(group_ids, g), jnp.asarray(w), key,
               jnp.float32(p), jnp.float32(lam), base, bool(rescale),
               k if base == "ties" else 1.0, chunk_size)

