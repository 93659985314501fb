"""BatchNorm running statistics of merged backbones: average | frozen | recompute."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stability.merging.base import CHUNK, Params, bcast, map_rows, prepare
from stability.merging.linear import average
from stability.sharding import on_one_device

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
    return jax.tree.map(lambda s: jnp.sum(jnp.where(bcast(counts > 0, s), s, 0.0)
                                          * bcast(w, s), axis=0), stats)

  return map_rows(one, (merged, groups), chunk_size)


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
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
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

