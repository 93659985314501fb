"""Coupled stability twins and the L2 on-average model stability estimator.

  eps^2 = E_j || A(S) - A(S^(j)) ||^2,   S^(j): training sample j replaced by an independent one
  (Lei & Ying, ICML 2020; arXiv 2601.21690, "Theory").

Neighbouring datasets. A twin of expert i is another row of the expert axis with the same task,
eta, b, K, n, seed, momentum and weight decay, whose training subset has position j swapped for
a row of the task's ghost pool (disjoint from its train and test pools). The trainer's batch
sequence and head init are pure functions of (seed, n, b), so the twin starts from exactly the
same x_0 and head and reads exactly the same positions at every step; only sample j differs.
A control twin swaps nothing: its distance to the original is the numerical noise floor (0 on
CPU, where the vmapped step is bit-for-bit independent of the row).

Draws. Expert i's m positions j (distinct, uniform on [0, n_i)) and ghost rows (distinct,
uniform on the task's ghost pool) come from numpy's generator seeded by (seed, task, expert seed,
n_i), so experts that differ only in eta, b, K or the optimizer share their perturbations
(common random numbers across a hyperparameter sweep).

Estimator. For each twin r of expert i = origin[r]: ||x_K^r - x_K^i||^2 over the backbone and
over the full parameters (backbone + head), the loss stability |f(x^r; z) - f(x^i; z)| averaged
(and maximised) over the task's test points z, and for merged models ||x_avg - x_avg^(i,j)||^2,
computed by merging the twin stack (so a data-dependent merge such as TIES may change its mask
between twins). `estimate` turns samples into a mean with standard error, 95% t-interval and max.

Legend: E rows (originals then twins), m twins per expert, G groups, M members per group.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from stability import experts as experts_lib
from stability import merging
from stability.data import tasks as tasks_lib

ROLES = ("original", "twin", "control")


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


def check_counts(m: Any, control: bool) -> None:
  """m twins per expert (an int >= 0) and a control twin: at least one twin in all."""
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
    _fail("stability.num_twins", f"must be an int >= 0; got {m!r}")
  if m == 0 and not control:
    _fail("stability.num_twins", "must be >= 1 when stability.control is False (no twins)")


def make_twins(experts: experts_lib.Experts, arrays: tasks_lib.TaskArrays, *, m: int,
               seed: int = 0, control: bool = True) -> experts_lib.Experts:
  """The originals followed by m twins (and one control twin if `control`) per original.

  Row layout: originals 0..E-1, then for each original i its m twins, then its control.
  """
  check_counts(m, control)
  E = experts.size
  if np.any(experts.replaced >= 0) or np.any(experts.origin != np.arange(E)):
    _fail("experts", "must all be originals (replaced = -1, origin = own row) to make twins")
  n_ghost = np.asarray(arrays.n_ghost)[experts.task]
  n_train = np.asarray(arrays.n_train)[experts.task]
  bad = np.flatnonzero((m > experts.n) | (m > n_ghost))
  if bad.size:
    i = int(bad[0])
    _fail("stability.num_twins", f"must be <= every expert's n and its task's ghost pool; "
          f"expert {i} has n={int(experts.n[i])}, ghost pool {int(n_ghost[i])}, m={m}")
  rows, subset, replaced = [], [], []
  for i in range(E):
    rng = np.random.default_rng([int(seed), int(experts.task[i]), int(experts.seed[i]),
                                 int(experts.n[i])])
    js = rng.choice(int(experts.n[i]), m, replace=False)
    ghosts = rng.choice(int(n_ghost[i]), m, replace=False)
    for j, g in zip(js, ghosts):
      s = experts.subset[i].copy()
      s[j] = n_train[i] + g
      rows.append(i), subset.append(s), replaced.append(int(j))
    if control:
      rows.append(i), subset.append(experts.subset[i].copy()), replaced.append(-1)
  rows = np.asarray(rows, np.int64)
  twins = experts.take(rows).replace(subset=np.stack(subset).astype(np.int32),
                                     replaced=np.asarray(replaced, np.int32),
                                     origin=rows.astype(np.int32))
  return jax.tree.map(lambda a, b: np.concatenate([a, b]), experts, twins)


def roles(experts: experts_lib.Experts) -> np.ndarray:
  """'original' | 'twin' | 'control' per row."""
  own = experts.origin == np.arange(experts.size)
  return np.where(own, "original", np.where(experts.replaced >= 0, "twin", "control"))


def twin_rows(experts: experts_lib.Experts) -> np.ndarray:
  """Rows that twin another row (perturbed twins and controls)."""
  return np.flatnonzero(experts.origin != np.arange(experts.size))


# ---------------------------------------------------------------------------------------------
# Distances.

@jax.jit
def _sq_by_part(params, origin):
  def sq(tree):
    out = jnp.zeros(origin.shape, jnp.float32)
    for a in jax.tree.leaves(tree):
      d = (a - a[origin]).reshape(a.shape[0], -1)
      out = out + jnp.sum(d * d, axis=1).astype(jnp.float32)
    return out
  return {part: sq(params[part]) for part in ("backbone", "head")}


def sq_distances(params, experts: experts_lib.Experts) -> dict[str, np.ndarray]:
  """||x^r - x^origin(r)||^2 per row [E] for 'backbone', 'head' and 'full' (0 for originals)."""
  if jax.tree.leaves(params) and jax.tree.leaves(params)[0].shape[0] != experts.size:
    _fail("params", f"leading axis must equal the number of experts ({experts.size})")
  out = {k: np.asarray(v, np.float64)
         for k, v in _sq_by_part(params, jnp.asarray(experts.origin)).items()}
  out["full"] = out["backbone"] + out["head"]
  return out


def loss_stability(test_losses: np.ndarray, experts: experts_lib.Experts,
                   n_test: np.ndarray) -> dict[str, np.ndarray]:
  """Mean and max over the task's test points z of |f(x^r; z) - f(x^origin(r); z)|, per row.

  test_losses: [E, P] per-sample test losses (`evaluate.test_losses`); n_test [T] per task.
  """
  L = np.asarray(test_losses, np.float64)
  valid = np.arange(L.shape[1])[None, :] < np.asarray(n_test)[experts.task][:, None]
  d = np.where(valid, np.abs(L - L[experts.origin]), 0.0)
  return {"mean": d.sum(1) / valid.sum(1), "max": d.max(1)}


# ---------------------------------------------------------------------------------------------
# Merged-model stability.

def twin_groups(groups: np.ndarray, experts: experts_lib.Experts):
  """Twin groups: each group with one member replaced by one of that member's twins.

  Returns (twin_groups [G', M], base [G'] the original group's row, pos [G'] the replaced
  member's position, row [G'] the twin's row), G' = sum over members of their twin counts.
  """
  groups = np.asarray(groups)
  own = experts.origin == np.arange(experts.size)
  if not np.all(own[groups]):
    _fail("groups", "must index original experts only (twins are substituted automatically)")
  by_origin: dict[int, list[int]] = {}
  for r in twin_rows(experts):
    by_origin.setdefault(int(experts.origin[r]), []).append(int(r))
  tg, base, pos, row = [], [], [], []
  for g, members in enumerate(groups):
    for p, i in enumerate(members):
      for r in by_origin.get(int(i), []):
        t = members.copy()
        t[p] = r
        tg.append(t), base.append(g), pos.append(p), row.append(r)
  M = groups.shape[1]
  return (np.asarray(tg, np.int32).reshape(-1, M), np.asarray(base, np.int32),
          np.asarray(pos, np.int32), np.asarray(row, np.int32))


MergeFn = Callable[..., Any]  # (x0, stack, groups, group_ids) -> merged backbones [G, ...]


def merge_fn(name: str, **hparams) -> MergeFn:
  """A registered merge as `(x0, stack, groups, group_ids) -> merged`; group_ids (RNG ids)
  are passed to merges that draw randomness (registry flag `random`: DARE, AdaMerging), so
  twins share their masks."""
  fn = merging.get(name)
  takes_ids = merging.ALGORITHMS[name].random

  def run(x0, stack, groups, group_ids):
    extra = {"group_ids": group_ids} if takes_ids else {}
    return fn(x0, stack, groups, **hparams, **extra)
  return run


@jax.jit
def _sq_rows(merged, a_rows, b_rows):
  out = 0.0
  for leaf in jax.tree.leaves(merged):
    d = (leaf[a_rows] - leaf[b_rows]).reshape(a_rows.shape[0], -1)
    out = out + jnp.sum(d * d, axis=1).astype(jnp.float32)
  return jnp.broadcast_to(out, a_rows.shape)


def merged_sq_distances(merge: MergeFn, x0, backbones, heads, groups: np.ndarray,
                        experts: experts_lib.Experts) -> dict[str, np.ndarray]:
  """||x_avg(g) - x_avg(g with member i -> twin r)||^2 for every group g, member i and twin r.

  The original groups and the twin groups are merged in one call (twin groups carry their
  original's RNG id). 'backbone' is the merged backbone distance; 'full' adds the replaced
  member's head distance (the merged model for task i pairs the merged backbone with head i).
  Also returns base/pos/row (see `twin_groups`) and 'merged', the original groups' merged
  backbones [G, ...].
  """
  tg, base, pos, row = twin_groups(groups, experts)
  G = groups.shape[0]
  if tg.shape[0] == 0:
    z = np.zeros((0,))
    return dict(backbone=z, full=z, base=base, pos=pos, row=row,
                merged=merge(x0, backbones, groups.astype(np.int32), np.arange(G, dtype=np.int32)))
  all_groups = np.concatenate([groups, tg]).astype(np.int32)
  ids = np.concatenate([np.arange(G), base]).astype(np.int32)
  # Pad to whole chunks (copies of group 0): every group then runs through the same compiled
  # vmapped body, so a control twin's merge is bit-identical to its original's (a remainder
  # chunk is compiled separately and may round differently).
  pad = -len(all_groups) % merging.CHUNK if len(all_groups) > merging.CHUNK else 0
  all_groups = np.concatenate([all_groups, np.repeat(all_groups[:1], pad, 0)])
  ids = np.concatenate([ids, np.zeros((pad,), np.int32)])
  merged = merge(x0, backbones, all_groups, ids)
  sq_bb = np.asarray(_sq_rows(merged, jnp.asarray(G + np.arange(len(tg))), jnp.asarray(base)),
                     np.float64)
  sq_head = np.asarray(_sq_rows(heads, jnp.asarray(row), jnp.asarray(experts.origin[row])),
                       np.float64)
  return dict(backbone=sq_bb, full=sq_bb + sq_head, base=base, pos=pos, row=row,
              merged=jax.tree.map(lambda a: a[:G], merged))


# ---------------------------------------------------------------------------------------------
# The estimator.

def estimate(samples: Any, *, level: float = 0.95) -> dict[str, float]:
  """Mean, standard error, two-sided t-interval at `level`, max and count of i.i.d. samples."""
  x = np.asarray(samples, np.float64).reshape(-1)
  if x.size == 0:
    _fail("samples", "needs at least one sample")
  if not 0 < level < 1:
    _fail("level", f"must lie in (0, 1); got {level}")
  mean = float(x.mean())
  se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
  half = float(scipy.stats.t.ppf(0.5 + level / 2, x.size - 1) * se) if x.size > 1 else float("nan")
  return dict(mean=mean, se=se, ci_lo=mean - half, ci_hi=mean + half, max=float(x.max()),
              count=int(x.size))


def estimate_table(df, by: list[str], value: str, *, level: float = 0.95):
  """`estimate` of column `value` for each group of `by` (a pandas DataFrame, one row each)."""
  import pandas as pd
  out = [dict(zip(by, key if isinstance(key, tuple) else (key,)),
              **estimate(g[value].to_numpy(), level=level))
         for key, g in df.groupby(by, sort=True)]
  return pd.DataFrame(out)
