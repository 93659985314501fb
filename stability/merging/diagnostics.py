"""Task-vector diagnostics per group: norms, pairwise cosines, sign conflicts, and the
sparsity TIES and DARE realise (with the same trim, merge and masks as `sparse`)."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from stability.merging.base import (CHUNK, Array, Params, check_group_ids, check_key,
                                    check_scalar, flatten_stack, map_rows, prepare,
                                    task_vectors)
from stability.merging.sparse import dare_masks, ties_merge, trim
from stability.sharding import on_one_device


@functools.partial(jax.jit, static_argnames=("k", "with_dare", "chunk_size"))
def _diagnostics(x0, stack, groups, gidx, key, p, k, with_dare, chunk_size):
  leaves0, leaves_s, _ = flatten_stack(x0, stack)
  M = groups.shape[1]
  D = sum(a.size for a in leaves0)
  shapes = [a.shape for a in leaves0]

  def conflict(taus):
    """Fraction of coordinates where the nonzero entries disagree in sign."""
    pos = sum(jnp.sum(jnp.any(t > 0, 0) & jnp.any(t < 0, 0)) for t in taus)
    return pos / D

  def one(gi, idx_M):
    taus = task_vectors(leaves0, leaves_s, idx_M)
    flat = jnp.concatenate([t.reshape(M, -1) for t in taus], axis=1)  # [M, D]
    gram = flat @ flat.T
    norm = jnp.sqrt(jnp.diag(gram))
    trimmed = jax.vmap(trim, (0, None))(taus, k)
    merged = ties_merge(trimmed)
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
      masks = dare_masks(key, gi, M, shapes, p)
      out["dare_sparsity"] = 1.0 - sum(jnp.sum(mk, axis=tuple(range(1, mk.ndim)))
                                       for mk in masks) / D
    return out

  return map_rows(one, (gidx, groups), chunk_size)


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
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  k = check_scalar("k", k, 0.0, 1.0, lo_open=True, what=" (fraction of entries kept)")
  p = check_scalar("p", p, 0.0, 1.0, hi_open=True, what=" (drop rate)")
  with_dare = key is not None
  key = check_key(key) if with_dare else jax.random.key(0)
  return _diagnostics(x0, stack, jnp.asarray(g), check_group_ids(group_ids, g), key,
                      jnp.float32(p), k, with_dare, chunk_size)
