"""Heterogeneous merge groups: members whose hyperparameters differ (the paper's title).

The expert set is a centre configuration c = (eta, b, K, data_ratio) plus, for every axis a in
`hetero.axes` and spread s > 1 in `hetero.spreads`, the two configurations with a at c_a / s and
c_a * s (the other axes held); one expert per task per configuration, each with
`hetero.num_twins` coupled twins, all trained as one stack (each expert stops at its own K; the
snapshot is taken at the largest). Groups of M distinct tasks (the same task draws, seeds
0..G-1, for every group set) take their members' configurations by mode:

  homogeneous   all M members from one configuration, drawn per group
  mixed         each member's configuration drawn independently
  spread        along axis a by factor s: member m takes c_a / s, c_a, c_a * s for m mod 3 =
                0, 1, 2 (s = 1: every member at the centre)

Per group and merge: merged test loss, accuracy and gap (each member task with its own head),
measured merged eps^2 from the twins (backbone, and full = with the perturbed member's head),
the members' own eps^2 (backbone and head parts), the task-vector dispersion
(1/M) sum_m ||x_m - x_bar||^2, and the predicted merged backbone eps^2 of the simple average,
(1/M) sum_i eps2_bound(eta_i, b_i, K_i, n_i) / M^2, from each member's OWN hyperparameters
with the constants `theory.G`, `theory.L`: the non-convex form (the model is a non-convex MLP;
it may overflow, and the summary counts the finite ones) and the convex form, which is outside
the theorem here and kept only as a ranking heuristic. Plain SGD (momentum 0) keeps the
optimizer inside the bounds' assumptions.

Summary: rank agreement of predicted and measured merged eps^2 and gap over groups (Spearman,
n, bootstrap 95% CI); per axis, Spearman of log s with the merged test loss and gap over the
spread groups, with a verdict for "similar hyperparameters merge better" (yes: the CI lies above
0; no: below; inconclusive: it contains 0); mixed against homogeneous (difference of means,
bootstrap CI); the dispersion against the merged train-loss excess over the members.

Row kinds: `expert` (originals and twins at their own K), `hetero_group` (one per group set x
group x merge).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from stability import evaluate as evaluate_lib
from stability import experts as experts_lib
from stability import merging
from stability import planner
from stability import plots
from stability import results as results_lib
from stability import twins as twins_lib
from stability.studies import common
from stability.studies import driver
from theory import bounds

# config axis name -> Experts field
AXES = {"lr": "eta", "batch_size": "b", "K": "K", "data_ratio": "data_ratio"}
MODES = ("homogeneous", "mixed", "spread")
_INT_AXES = ("b", "K")


def configurations(cfg: ml_collections.ConfigDict) -> list[dict]:
  """Configuration 0 is the centre; then per axis and spread s > 1 the configurations at
  c / s (side -1) and c * s (side +1). b and K are rounded to integers (at least 1)."""
  h = cfg.hetero
  c = h.centre
  centre = dict(eta=float(c.lr), b=int(c.batch_size), K=int(c.K),
                data_ratio=float(c.data_ratio))
  out = [dict(centre, axis=None, s=1.0, side=0)]
  for a in h.axes:
    key = AXES[a]
    for s in h.spreads:
      if s == 1:
        continue
      for side in (-1, 1):
        v = centre[key] * float(s) ** side
        v = max(1, int(round(v))) if key in _INT_AXES else float(v)
        out.append(dict(centre, **{key: v}, axis=a, s=float(s), side=side))
  return out


def _experts(cfg, suite, task_ids) -> experts_lib.Experts:
  """One expert per (configuration, task), configuration-major; b <= n_i checked per config."""
  confs = configurations(cfg)
  T = len(task_ids)
  parts = []
  for conf in confs:
    try:
      parts.append(experts_lib.make_experts(
          suite, task=task_ids, eta=conf["eta"], b=conf["b"], K=conf["K"],
          data_ratio=conf["data_ratio"], seed=cfg.sweep.seeds[0], momentum=cfg.optim.momentum,
          weight_decay=cfg.optim.weight_decay))
    except ValueError as e:
      where = "hetero.centre" if conf["axis"] is None else (
          f"hetero.spreads (axis {conf['axis']}, s = {conf['s']:g}, "
          f"{'c / s' if conf['side'] < 0 else 'c * s'})")
      common.fail(where, f"gives an invalid expert: {e}")
  spec = experts_lib.concat(*parts)
  assert spec.size == len(confs) * T
  return spec


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check of the heterogeneous-group study that needs no compute."""
  common.check_fields(cfg)
  h = cfg.hetero
  if len(cfg.sweep.seeds) != 1:
    common.fail("sweep.seeds", f"the hetero study takes one expert seed; got {tuple(cfg.sweep.seeds)}")
  bad = [a for a in h.axes if a not in AXES]
  if bad or not h.axes or len(set(h.axes)) != len(h.axes):
    common.fail("hetero.axes", f"distinct names from {', '.join(AXES)}; got {tuple(h.axes)}")
  if not h.spreads or any(not (np.isfinite(s) and s >= 1) for s in h.spreads):
    common.fail("hetero.spreads", f"each spread factor must be >= 1; got {tuple(h.spreads)}")
  bad = [m for m in h.modes if m not in MODES]
  if bad or not h.modes:
    common.fail("hetero.modes", f"names from {', '.join(MODES)}; got {tuple(h.modes)}")
  allowed = merging.registry.stack_only()
  bad = [m for m in h.merges if m not in allowed]
  if bad or not h.merges:
    common.fail("hetero.merges", f"unknown or data-dependent merge "
                f"{bad[0] if bad else None!r}; allowed: {', '.join(allowed)}")
  suite, missing = common.suite_or_nominal(cfg)
  task_ids = common.resolve_tasks(suite, cfg.data.tasks)
  T = len(task_ids)
  if len(set(task_ids)) != T:
    common.fail("data.tasks", f"each task at most once; got {tuple(cfg.data.tasks)}")
  if not 2 <= h.group_size <= T:
    common.fail("hetero.group_size", f"must lie in [2, {T}] (the number of tasks); got "
                f"{h.group_size}")
  if "spread" in h.modes and h.group_size < 3:
    common.fail("hetero.group_size", f"the spread mode needs >= 3 members (c / s, c, c * s); "
                f"got {h.group_size}")
  if h.num_groups < 1:
    common.fail("hetero.num_groups", f"must be >= 1; got {h.num_groups}")
  twins_lib.check_counts(h.num_twins, False)
  Kmax = max(conf["K"] for conf in configurations(cfg))
  if cfg.sweep.milestones[-1] < Kmax:
    common.fail("sweep.milestones", f"the last milestone must be >= the largest K of the grid "
                f"({Kmax}); got {tuple(cfg.sweep.milestones)}")
  if missing is None:
    _experts(cfg, suite, task_ids)


def layout(cfg: ml_collections.ConfigDict, num_configs: int, T: int) -> tuple[int, int]:
  """(expert rows per configuration, merge groups in all)."""
  h = cfg.hetero
  return T * (1 + h.num_twins), len(group_sets(cfg)) * h.num_groups * len(h.merges)


def _plan(cfg, suite, T) -> planner.Plan:
  return driver.make_plan(cfg, suite, len(configurations(cfg)), T, layout, _b_max(cfg))


def _b_max(cfg) -> int:
  return max(c["b"] for c in configurations(cfg))


def plan(cfg: ml_collections.ConfigDict) -> str:
  validate(cfg)
  suite, _ = common.suite_or_nominal(cfg)
  T = len(common.resolve_tasks(suite, cfg.data.tasks))
  return f"study         {cfg.study}\n" + _plan(cfg, suite, T).describe()


def group_sets(cfg) -> list[tuple[str, str | None, float]]:
  """(mode, axis, s) of every group set, in row order."""
  h = cfg.hetero
  out = [(m, None, 1.0) for m in ("homogeneous", "mixed") if m in h.modes]
  if "spread" in h.modes:
    out += [("spread", a, float(s)) for a in h.axes for s in h.spreads]
  return out


def member_configs(cfg, mode: str, axis: str | None, s: float, g: int) -> np.ndarray:
  """[M] configuration ids of group g's members in one group set."""
  h, M = cfg.hetero, cfg.hetero.group_size
  confs = configurations(cfg)
  if mode == "homogeneous":
    return np.full(M, np.random.default_rng([h.seed, 0, g]).integers(len(confs)))
  if mode == "mixed":
    return np.random.default_rng([h.seed, 1, g]).integers(len(confs), size=M)
  if s == 1:
    return np.zeros(M, int)
  ids = {(c["axis"], c["s"], c["side"]): i for i, c in enumerate(confs)}
  return np.array([0 if m % 3 == 1 else ids[(axis, s, -1 if m % 3 == 0 else 1)]
                   for m in range(M)])


def make_groups(cfg, T: int) -> tuple[np.ndarray, list[tuple]]:
  """Groups [S * G, M] of original expert rows (configuration c, task position t -> c T + t)
  and the (mode, axis, s, g) of each; the task draws are the same in every set."""
  h = cfg.hetero
  tasks = common.make_groups(T, h.group_size, h.num_groups)
  groups, keys = [], []
  for mode, axis, s in group_sets(cfg):
    for g in range(h.num_groups):
      groups.append(member_configs(cfg, mode, axis, s, g) * T + tasks[g])
      keys.append((mode, axis, s, g))
  return np.asarray(groups, np.int32), keys


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the grid and its twins, merges every group set at the last milestone, summarizes."""
  suite = common.get_suite(cfg)
  task_ids = common.resolve_tasks(suite, cfg.data.tasks)
  T = len(task_ids)
  originals = _experts(cfg, suite, task_ids)
  C = len(configurations(cfg))
  if len(_plan(cfg, suite, T).waves) > 1:
    common.fail("train.memory_gb", "the hetero study merges across configurations, so its "
                "grid must fit one wave; raise train.memory_gb or shrink the grid")
  spec = twins_lib.make_twins(originals, suite.arrays(), m=cfg.hetero.num_twins,
                              seed=cfg.hetero.seed, control=False)
  groups, keys = make_groups(cfg, T)
  rows_at = functools.partial(_rows, cfg, suite, spec, groups, keys)
  ran = driver.sweep_waves(cfg, workdir, suite, C, T, layout, lambda ids: (spec, rows_at),
                           b_max=_b_max(cfg))
  return summarize(cfg, workdir, **(ran or {}))


@jax.jit
def _dispersion(backbones, groups):
  """(1/M) sum_m ||x_m - x_bar||^2 per group [G] (= the task vectors' dispersion)."""
  out = 0.0
  for a in jax.tree.leaves(backbones):
    x = a[groups].reshape(groups.shape + (-1,)).astype(jnp.float32)
    out = out + jnp.sum((x - x.mean(1, keepdims=True)) ** 2, axis=(1, 2))
  return out / groups.shape[1]


def _rows(cfg, suite, spec, groups, keys, K, snap, ctx):
  """Expert rows (own K) and one hetero_group row per group and merge, at the last milestone."""
  if K != int(cfg.sweep.milestones[-1]):
    return []
  params = snap.params
  m = evaluate_lib.evaluate(ctx.model, params, spec, ctx.data)
  sq = twins_lib.sq_distances(params, spec)
  role = twins_lib.roles(spec)
  rows = common.expert_rows(spec, suite, dict(m, sq_backbone=sq["backbone"], sq_head=sq["head"],
                                               sq_full=sq["full"]),
                            np.asarray(snap.diverged_at), K, ctx.common)
  for e, row in enumerate(rows):
    row.update(K=int(spec.K[e]), role=str(role[e]), origin=int(spec.origin[e]),
               perturbation=int(spec.replaced[e]))
  member_sq = {k: sq[k] for k in ("backbone", "head")}
  disp = np.asarray(_dispersion(params["backbone"], jnp.asarray(groups)))
  G, M = groups.shape
  th = cfg.theory
  pred = {form: np.asarray(fn(spec.eta.astype(np.float64), spec.b, spec.K, spec.n, th.G, *extra))
          for form, fn, extra in (("nonconvex", bounds.eps2_nonconvex, (th.L,)),
                                  ("convex", bounds.eps2_convex, ()))}
  member_spec = spec.take(groups.reshape(-1))
  for name, fn in merging.inputs.merge_fns(cfg.hetero.merges,
                                           key=jax.random.key(cfg.hetero.seed)).items():
    out = twins_lib.merged_sq_distances(fn, ctx.backbone0, params["backbone"], params["head"],
                                        groups, spec)
    member = evaluate_lib.member_params(out["merged"], params["head"], groups)
    mm = {k: np.asarray(v).reshape(G, M)
          for k, v in evaluate_lib.evaluate(ctx.model, member, member_spec, ctx.data).items()}
    for g, (mode, axis, s, gid) in enumerate(keys):
      sel = out["base"] == g
      mem = groups[g]
      twin_rows = out["row"][sel]
      rows.append(dict(
          ctx.common, kind="hetero_group", algorithm=name, mode=mode, axis=axis, s=s,
          group=gid, M=M, K=K, tasks=[suite.tasks[spec.task[e]].name for e in mem],
          eta=[float(spec.eta[e]) for e in mem], b=[int(spec.b[e]) for e in mem],
          K_members=[int(spec.K[e]) for e in mem], n=[int(spec.n[e]) for e in mem],
          **{k: float(v[g].mean()) for k, v in mm.items()},
          **{f"member_{k}": float(np.mean(m[k][mem])) for k in ("test_loss", "train_loss",
                                                                   "gap", "test_acc")},
          merged_eps2=float(out["backbone"][sel].mean()),
          merged_eps2_full=float(out["full"][sel].mean()),
          member_eps2=float(member_sq["backbone"][twin_rows].mean()),
          member_eps2_head=float(member_sq["head"][twin_rows].mean()),
          dispersion=float(disp[g]),
          **{f"pred_eps2_{form}": float(np.mean(p[mem]) / M ** 2) for form, p in pred.items()}))
  return rows


def _spearman_ci(x, y, seed: int = 0) -> dict:
  """Spearman rho of paired samples with n and a percentile bootstrap 95% CI (scipy)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  out = dict(n=int(len(x)), dropped_nonfinite=int((~ok).sum()), rho=None, ci=None)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return out
  rho = lambda a, b: scipy.stats.spearmanr(a, b).statistic
  with warnings.catch_warnings():  # resamples of a few groups can be constant: nan, dropped
    warnings.simplefilter("ignore")
    res = scipy.stats.bootstrap((x, y), rho, paired=True, vectorized=False, n_resamples=999,
                                method="percentile", rng=np.random.default_rng(seed))
  ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
  return dict(out, rho=round(float(rho(x, y)), 4),
              ci=[round(c, 4) if np.isfinite(c) else None for c in ci])


def _verdict(ci) -> str:
  if ci is None or any(c is None for c in ci):
    return "inconclusive"
  return "yes" if ci[0] > 0 else "no" if ci[1] < 0 else "inconclusive"


def _mean_diff_ci(a, b, seed: int = 0) -> dict:
  """mean(a) - mean(b) with a percentile bootstrap 95% CI (independent samples)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  res = scipy.stats.bootstrap((a, b), lambda u, v: np.mean(u) - np.mean(v), vectorized=False,
                              n_resamples=999, method="percentile",
                              rng=np.random.default_rng(seed))
  return dict(diff=round(float(a.mean() - b.mean()), 5), n=[len(a), len(b)],
              ci=[round(float(res.confidence_interval.low), 5),
                  round(float(res.confidence_interval.high), 5)])


def summarize(cfg, workdir: str, **extra) -> dict[str, Any]:
  """Rank agreement, the spread effect per axis, mixed vs homogeneous, figure, summary.json."""
  df = results_lib.load(workdir)
  hg = df[df.kind == "hetero_group"]
  ex = df[(df.kind == "expert") & (df.role == "original")]
  summary: dict[str, Any] = dict(
      experts=int(len(ex)), groups=int(len(hg)),
      diverged_experts=int((ex.diverged_at >= 0).sum()), by_algorithm={})
  for name, sub in hg.groupby("algorithm"):
    finite = np.isfinite(sub.pred_eps2_nonconvex)
    s: dict[str, Any] = dict(
        rank_agreement_eps2={form: _spearman_ci(sub[f"pred_eps2_{form}"], sub.merged_eps2)
                             for form in ("nonconvex", "convex")},
        nonconvex_finite=f"{int(finite.sum())} of {len(sub)}",
        dispersion_vs_train_excess=_spearman_ci(sub.dispersion,
                                                sub.train_loss - sub.member_train_loss),
        spread={})
    for axis, sa in sub[sub["mode"] == "spread"].groupby("axis"):
      s["spread"][axis] = {}
      for col in ("test_loss", "gap"):
        r = _spearman_ci(np.log(sa.s), sa[col])
        s["spread"][axis][col] = dict(r, means_by_s={f"{k:g}": round(float(v), 5) for k, v in
                                                     sa.groupby("s")[col].mean().items()},
                                      similar_merge_better=_verdict(r["ci"]) if col ==
                                      "test_loss" else None)
    modes = set(sub["mode"])
    if {"mixed", "homogeneous"} <= modes:
      s["mixed_minus_homogeneous"] = {
          col: _mean_diff_ci(sub[sub["mode"] == "mixed"][col],
                             sub[sub["mode"] == "homogeneous"][col])
          for col in ("test_loss", "gap", "merged_eps2")}
    summary["by_algorithm"][name] = s
  if jax.process_index() == 0:
    hg.drop(columns=[c for c in ("tasks", "eta", "b", "K_members", "n") if c in hg]).to_csv(
        os.path.join(workdir, "hetero_groups.csv"), index=False)
    if cfg.output.figures:
      plots.hetero_spread(df, os.path.join(workdir, "hetero_spread.png"))
    results_lib.write_json_atomic(os.path.join(workdir, "summary.json"), dict(summary, **extra))
  return dict(summary, **extra)

