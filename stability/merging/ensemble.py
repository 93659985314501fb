"""The logit ensemble: the non-merged reference of the merge comparison.

It returns PREDICTIONS (logits [G, M, N, C]), not parameters: every member backbone of a group
runs with each member task's head on that task's inputs and the logits are averaged. So it is
not a merge and is not in the registry (`registry.compare_names` lists it as the reference).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from stability.merging.base import (CHUNK, Array, Params, bcast, check_data, check_weights,
                                    gather_tree, map_rows, member_logits, prepare)
from stability.sharding import on_one_device


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _ensemble(stack, groups, w_GxM, heads, x, nc, model, chunk_size):
  def one(idx_M, w_M):
    X = gather_tree(stack, idx_M)
    heads_M, x_M, nc_M = gather_tree(heads, idx_M), x[idx_M], nc[idx_M]
    per_backbone = jax.vmap(lambda bb: member_logits(model, bb, heads_M, x_M, nc_M))(X)
    return jnp.sum(bcast(w_M, per_backbone) * per_backbone, axis=0)  # [M, N, C]

  return map_rows(one, (groups, w_GxM), chunk_size)


def ensemble(x0: Params, stack: Params, groups: Any, weights: Any = None, *, model: Any,
             heads: Params, x: Any, num_classes: Any, chunk_size: int | None = CHUNK,
             tasks: Any = None) -> Array:
  """Logit ensemble, the non-merged reference: PREDICTIONS, not parameters.

  Returns logits [G, M, N, C]: for member task t of group g, sum_j w_j head_t(features(x_j,
  x_t)) over the members j (w normalised, default 1/M), masked to task t's classes. x0 is
  unused (kept for a uniform signature). x [E, N, H, W, C], heads [E, ...], num_classes [E].
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  x, nc, _, _ = check_data(E, x, num_classes, None, heads)
  heads = on_one_device(heads)
  w = check_weights(weights, g.shape, average=True)
  return _ensemble(stack, jnp.asarray(g), jnp.asarray(w), heads, x, nc, model, chunk_size)


