"""Geometric merges of task vectors, per leaf ("layer"): SLERP of a pair (M = 2) and Model
Stock (interpolation toward x0 set by the angle between the task vectors)."""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stability.merging.base import (CHUNK, Params, check_scalar, finish, flatten_stack,
                                    map_rows, prepare, task_vectors)
from stability.sharding import on_one_device


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _slerp(x0, stack, groups, t, dot_threshold, eps, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    out = []
    for v in task_vectors(leaves0, leaves_s, idx_M):
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
    return finish(leaves0, leaves_s, treedef, out, 1.0)

  return map_rows(one, (groups,), chunk_size)


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
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if g.shape[1] != 2:
    raise ValueError(f"groups: slerp merges pairs (M=2), got M={g.shape[1]}")
  t = check_scalar("t", t, 0.0, 1.0)
  dot_threshold = check_scalar("dot_threshold", dot_threshold, 0.0, 1.0)
  eps = check_scalar("eps", eps, 0.0, math.inf, what=" (finite)")
  return _slerp(x0, stack, jnp.asarray(g), jnp.float32(t), jnp.float32(dot_threshold),
                jnp.float32(eps), chunk_size)


_STOCK_EPS = 1e-8  # FusionBench model_stock EPS, in both the cosine and the ratio


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _model_stock(x0, stack, groups, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]
  iu = np.triu_indices(M, 1)

  def one(idx_M):
    out = []
    for a0, t in zip(leaves0, task_vectors(leaves0, leaves_s, idx_M)):
      tf = t.reshape(M, -1)
      gram = tf @ tf.T
      nrm = jnp.diag(gram)
      cos = gram / (jnp.sqrt(nrm[:, None] * nrm[None, :]) + _STOCK_EPS)
      theta = jnp.mean(jnp.arccos(jnp.clip(cos[iu], -1.0, 1.0)))      # mean pairwise angle
      c = jnp.cos(theta)
      ratio = M * c / ((M - 1) * c + 1.0 + _STOCK_EPS)
      out.append(ratio * jnp.mean(t, axis=0))
    return finish(leaves0, leaves_s, treedef, out, 1.0)

  return map_rows(one, (groups,), chunk_size)


def model_stock(x0: Params, stack: Params, groups: Any, *, chunk_size: int | None = CHUNK,
                tasks: Any = None) -> Params:
  """Model Stock (Jang et al., ECCV 2024), per leaf ("layer"):

    t = M cos(theta) / (1 + (M - 1) cos(theta)),  x = t * avg_m x_m + (1 - t) * x0,

  theta the angle between task vectors (for M > 2 the mean pairwise angle, as FusionBench
  `model_stock`; eps 1e-8 in the cosine and the ratio as there). Needs M >= 2. The formula
  assumes cos(theta) > 0; a negative cosine gives t < 0.
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if g.shape[1] < 2:
    raise ValueError(f"groups: model_stock needs M >= 2 members, got M={g.shape[1]}")
  return _model_stock(x0, stack, jnp.asarray(g), chunk_size)
