"""Spectral merges of 2-D layers: TSV-M (task singular vectors), Iso-C and Iso-CTS (isotropic
spectrum in the common, and in the common and task-specific subspaces).

Both act per leaf of rank 2 (a Dense kernel [d_in, d_out]); every other leaf (biases, conv
kernels, norms) is merged by its task-arithmetic rule stated in each function. Per group, the
SVDs run under `jax.vmap`, in chunks of `chunk_size` groups. Neither is linear in the task
vectors (SVD truncation and the spectrum change with them): both are outside the linear-merge
stability theorem (docs/merging.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from stability.merging.base import (CHUNK, Params, check_scalar, finish, flatten_stack,
                                    map_rows, prepare, task_vectors)
from stability.sharding import on_one_device


def _polar(A: jax.Array) -> jax.Array:
  """The nearest matrix with orthonormal columns (rows if wide) to A: P Q^T of A = P S Q^T."""
  P, _, Qt = jnp.linalg.svd(A, full_matrices=False)
  return P @ Qt


def tsv_rank(shape: tuple, M: int, fraction: float | None) -> int:
  """Singular vectors kept per task in a [m, n] layer: max(1, floor(fraction * min(m, n))),
  fraction default 1/M (TSV-M's choice: M tasks share the layer's rank)."""
  f = 1.0 / M if fraction is None else fraction
  return max(1, int(math.floor(f * min(shape) + 1e-9)))


def _tsv_layer(t_M: jax.Array, r: int) -> jax.Array:
  U, S, Vt = jnp.linalg.svd(t_M, full_matrices=False)             # [M, m, q], [M, q], [M, q, n]
  M = t_M.shape[0]
  U = jnp.moveaxis(U[:, :, :r], 0, 1).reshape(t_M.shape[1], M * r)  # [m, M r]
  V = jnp.moveaxis(Vt[:, :r, :], 0, 2).reshape(t_M.shape[2], M * r)  # [n, M r]
  return (_polar(U) * S[:, :r].reshape(1, -1)) @ _polar(V).T


@functools.partial(jax.jit, static_argnames=("fraction", "chunk_size"))
def _tsv_m(x0, stack, groups, alpha, fraction, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]

  def one(idx_M):
    delta = [_tsv_layer(t, tsv_rank(t.shape[1:], M, fraction)) if t.ndim == 3 else t.mean(0)
             for t in task_vectors(leaves0, leaves_s, idx_M)]
    return finish(leaves0, leaves_s, treedef, delta, alpha)

  return map_rows(one, (groups,), chunk_size)


def tsv_m(x0: Params, stack: Params, groups: Any, *, alpha: float = 1.0,
          fraction: float | None = None, chunk_size: int | None = CHUNK,
          tasks: Any = None) -> Params:
  """TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors"), per 2-D leaf:

  tau_m = U_m S_m V_m^T; keep each task's top r = max(1, floor(fraction * min(m, n))) singular
  triplets (fraction default 1/M); U = [U_1,r ... U_M,r], V likewise, S = diag(S_1,r ... S_M,r);
  orthogonalise U and V (Procrustes: U_perp = P Q^T for U = P Sigma Q^T); delta = U_perp S
  V_perp^T. Other leaves: delta = mean_m tau_m. fraction <= 1/M, so the M r columns fit the
  layer's rank; a layer with min(m, n) < M still keeps r = 1 per task, and there the polar
  factor of the rank-deficient U depends on the SVD's sign convention (documented, not tested). x = x0 + alpha * delta (alpha default 1.0, the
  paper's setting).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  alpha = check_scalar("tsv_m: alpha", alpha, 0.0, math.inf, what=" (finite)")
  if fraction is not None:
    fraction = check_scalar("tsv_m: fraction", fraction, 0.0, 1.0, lo_open=True,
                            what=" (share of each layer's rank kept per task)")
    if fraction * g.shape[1] > 1.0 + 1e-9:
      raise ValueError(f"tsv_m: fraction must be <= 1/M = 1/{g.shape[1]} (the M tasks' "
                       f"singular vectors must fit the layer's rank), got {fraction}")
  return _tsv_m(x0, stack, jnp.asarray(g), jnp.float32(alpha), fraction, chunk_size)


def iso_cts_sizes(shape: tuple, M: int, common: float) -> tuple[int, int]:
  """(k, s): the common subspace's size k and each task's s, with k + M s = min(m, n): k =
  floor(common * min(m, n)), then the task-specific total rounded to a multiple of M (as the
  authors' code); s = 0 (Iso-C on the common subspace) when min(m, n) - k < M / 2."""
  q = min(shape)
  k = int(math.floor(common * q + 1e-9))
  s = int(round((q - k) / M))
  return q - M * s, s


def _iso_cts_layer(t_M: jax.Array, common: float) -> jax.Array:
  M = t_M.shape[0]
  k, s = iso_cts_sizes(t_M.shape[1:], M, common)
  U, S, Vt = jnp.linalg.svd(t_M.sum(0), full_matrices=False)
  Uc, Sc, Vc = U[:, :k], S[:k], Vt[:k].T
  if s == 0:
    return Sc.mean() * (Uc @ Vc.T)
  ts = t_M - jnp.einsum("ik,jk,mjn->min", Uc, Uc, t_M)         # task parts outside the common
  Ut, St, Vtt = jnp.linalg.svd(ts, full_matrices=False)
  Uall = jnp.concatenate([Uc] + [Ut[m, :, :s] for m in range(M)], axis=1)
  Vall = jnp.concatenate([Vc] + [Vtt[m, :s].T for m in range(M)], axis=1)
  sig = jnp.concatenate([Sc, St[:, :s].reshape(-1)]).mean()
  return sig * (_polar(Uall) @ _polar(Vall).T)


@functools.partial(jax.jit, static_argnames=("common", "chunk_size"))
def _iso_cts(x0, stack, groups, alpha, common, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    delta = [_iso_cts_layer(t, common) if t.ndim == 3 else t.mean(0)
             for t in task_vectors(leaves0, leaves_s, idx_M)]
    return finish(leaves0, leaves_s, treedef, delta, alpha)

  return map_rows(one, (groups,), chunk_size)


def iso_cts(x0: Params, stack: Params, groups: Any, *, alpha: float = 1.0,
            common: float = 0.8, chunk_size: int | None = CHUNK, tasks: Any = None) -> Params:
  """Iso-CTS (Marczak et al., ICML 2025), per 2-D leaf: the top k singular vectors of Delta =
  sum_m tau_m (the common subspace, k from `iso_cts_sizes`, fraction `common` default 0.8 as
  the paper), then for each task the top s singular vectors of its part outside the common
  subspace, tau_m - U_k U_k^T tau_m; U = [U_k, U_1,s ... U_M,s] and V likewise orthogonalised
  (Procrustes), Delta_iso = sigma_bar U_perp V_perp^T with sigma_bar the mean of the k + M s
  kept singular values. Other leaves: mean_m tau_m. x = x0 + alpha * Delta.
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  alpha = check_scalar("iso_cts: alpha", alpha, 0.0, math.inf, what=" (finite)")
  common = check_scalar("iso_cts: common", common, 0.0, 1.0, lo_open=True,
                        what=" (share of each layer's rank in the common subspace)")
  return _iso_cts(x0, stack, jnp.asarray(g), jnp.float32(alpha), common, chunk_size)


def _iso_layer(delta: jax.Array) -> jax.Array:
  U, S, Vt = jnp.linalg.svd(delta, full_matrices=False)
  return S.mean() * (U @ Vt)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _iso_c(x0, stack, groups, alpha, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M):
    delta = [_iso_layer(t.sum(0)) if t.ndim == 3 else t.mean(0)
             for t in task_vectors(leaves0, leaves_s, idx_M)]
    return finish(leaves0, leaves_s, treedef, delta, alpha)

  return map_rows(one, (groups,), chunk_size)


def iso_c(x0: Params, stack: Params, groups: Any, *, alpha: float = 1.0,
          chunk_size: int | None = CHUNK, tasks: Any = None) -> Params:
  """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind"), per 2-D leaf:

  Delta = sum_m tau_m = U S V^T; Delta_iso = sigma_bar U V^T with sigma_bar = mean of the
  min(m, n) singular values (trace S / min(m, n)): the spectrum flattened to its mean. Other
  leaves: Delta = mean_m tau_m (as FusionBench `iso_c` and the authors' code). x = x0 + alpha *
  Delta (alpha default 1.0; the paper tunes it on validation data).
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  alpha = check_scalar("iso_c: alpha", alpha, 0.0, math.inf, what=" (finite)")
  return _iso_c(x0, stack, jnp.asarray(g), jnp.float32(alpha), chunk_size)
