"""Averaging along ONE expert's trajectory: tail averaging and an EMA over its K snapshots.

Not a merge of groups: these act on a stack of snapshots of the same run, leaves [K, ...] (or
[K, E, ...] for every expert at once: the snapshot axis is the leading one), in the order they
were taken. `snapshot_average(snaps, tail=)` is the mean of the last `tail` snapshots (Polyak /
stochastic weight averaging on the milestones); `snapshot_ema(snaps, decay=)` is
e_1 = x_1, e_k = decay e_(k-1) + (1 - decay) x_k, returning e_K. Both are linear in the
snapshots with fixed coefficients, so for a stability twin pair (same run but one replaced
sample) ||avg - avg'|| <= sum_k c_k ||x_k - x_k'||: the linear theorem applies to them with the
snapshot distances (docs/merging.md says how a study wires it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stability.merging.base import Params, check_scalar


def _snapshots(snaps: Params) -> int:
  Ks = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(snaps)}
  if not Ks or None in Ks or len(Ks) != 1:
    raise ValueError(f"snaps: every leaf needs the same leading snapshot axis K, got {Ks}")
  K = Ks.pop()
  if K < 1:
    raise ValueError("snaps: no snapshots (K=0)")
  return K


def trajectory_coefficients(K: int, *, tail: int | None = None,
                            decay: float | None = None) -> np.ndarray:
  """The fixed coefficients c [K] (sum 1) of the tail average or of the EMA."""
  if (tail is None) == (decay is None):
    raise ValueError("trajectory: give exactly one of tail= or decay=")
  if tail is not None:
    c = np.zeros(K)
    c[K - tail:] = 1.0 / tail
    return c
  c = np.array([(1 - decay) * decay ** (K - 1 - k) for k in range(K)])
  c[0] = decay ** (K - 1)
  return c


@jax.jit
def _combine(snaps, c):
  return jax.tree.map(lambda a: jnp.tensordot(c, a.astype(jnp.float32), axes=1).astype(a.dtype),
                      snaps)


def snapshot_average(snaps: Params, *, tail: int | None = None) -> Params:
  """Mean of the last `tail` snapshots (default all K): leaves [K, ...] -> [...]."""
  K = _snapshots(snaps)
  tail = K if tail is None else tail
  if isinstance(tail, bool) or not isinstance(tail, (int, np.integer)) or not 1 <= tail <= K:
    raise ValueError(f"snapshot_average: tail must be an int in [1, K={K}], got {tail!r}")
  return _combine(snaps, jnp.asarray(trajectory_coefficients(K, tail=int(tail)), jnp.float32))


def snapshot_ema(snaps: Params, *, decay: float = 0.9) -> Params:
  """EMA over the snapshots in order: e_1 = x_1, e_k = decay e_(k-1) + (1 - decay) x_k."""
  K = _snapshots(snaps)
  decay = check_scalar("snapshot_ema: decay", decay, 0.0, 1.0, hi_open=True)
  return _combine(snaps, jnp.asarray(trajectory_coefficients(K, decay=decay), jnp.float32))
