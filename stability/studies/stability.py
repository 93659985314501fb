"""The stability study: originals plus coupled twins, expert and merged-model L2 stability.

Originals of config.sweep's grid plus `stability.num_twins` twins (and a control) each, trained
as one stack; at every K, each row's metrics and its distance to its original, and for each
group size M and merge, the merged model's distance under every twin substitution
(`stability.twins`). With `stability.constants`, also G, L and sigma^2 per original expert and
K, and the measured-vs-bound tables (`studies.theory`).

Row kinds: `expert` (role original | twin | control, perturbation j, sq_backbone, sq_full,
loss_stab, loss_stab_max), `merged_twin` (one per K x merge x M x group x member x twin) and
`constants` (one per original expert x K).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from stability import evaluate as evaluate_lib
from stability import merging
from stability import plots
from stability import results as results_lib
from stability import sharding as sharding_lib
from stability import twins as twins_lib
from stability.studies import common
from stability.studies import driver
from stability.studies import theory
from theory import fit as fit_lib

FIGURES = {
    "stability_vs_hparams": plots.stability_vs_hparams,
    "merged_stability_vs_M": plots.merged_stability_vs_M,
    "merged_vs_members": plots.merged_vs_members,
    "heterogeneous_vs_homogeneous": plots.heterogeneous_vs_homogeneous,
}


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check of the stability study that needs no compute."""
  T = common.check_shared(cfg)
  twins_lib.check_counts(cfg.stability.num_twins, cfg.stability.control)
  st = cfg.stability
  allowed = merging.registry.stack_only()
  bad = [m for m in st.merges if m not in allowed]
  if bad:
    common.fail("stability.merges", f"unknown or data-dependent merge {bad[0]!r}; allowed: "
                f"{', '.join(allowed)}")
  for M in st.group_sizes:
    if not 1 <= M <= T:
      common.fail("stability.group_sizes", f"each must lie in [1, {T}] (the number of tasks); "
                  f"got {M}")
  if st.group_sizes and not st.merges:
    common.fail("stability.merges", "needs at least one merge when stability.group_sizes is set")
  if st.num_groups < 1:
    common.fail("stability.num_groups", f"must be >= 1; got {st.num_groups}")
  bad = [f for f in st.figures if f not in FIGURES]
  if bad:
    common.fail("stability.figures", f"unknown figure {bad[0]!r}; allowed: {', '.join(FIGURES)}")
  needs_merges = [f for f in st.figures if f != "stability_vs_hparams"]
  if needs_merges and not st.group_sizes:
    common.fail("stability.figures", f"{needs_merges[0]!r} needs stability.group_sizes and "
                "merges")
  if "heterogeneous_vs_homogeneous" in st.figures and "average" not in st.merges:
    common.fail("stability.figures", "'heterogeneous_vs_homogeneous' needs 'average' in "
                "stability.merges")
  if st.constants and st.constants_samples < 1:
    common.fail("stability.constants_samples", f"must be >= 1; got {st.constants_samples}")


def rows_per_config(cfg: ml_collections.ConfigDict, T: int) -> int:
  """Expert rows per config: T originals, each with num_twins twins and maybe a control."""
  st = cfg.stability
  return T * (1 + st.num_twins + int(st.control))


def layout(cfg: ml_collections.ConfigDict, num_configs: int, T: int) -> tuple[int, int]:
  """(expert rows per config, merge groups in all)."""
  st = cfg.stability
  return rows_per_config(cfg, T), num_configs * st.num_groups * len(st.group_sizes)


def plan(cfg: ml_collections.ConfigDict) -> str:
  validate(cfg)
  return driver.describe(cfg, layout)


def merge_fns(cfg) -> dict[str, twins_lib.MergeFn]:
  """Merge functions of the study; random merges (DARE) are keyed by stability.seed."""
  return merging.inputs.merge_fns(cfg.stability.merges, key=jax.random.key(cfg.stability.seed))


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains originals and twins, stores the rows at every K, and summarizes."""
  suite = common.get_suite(cfg)
  all_originals, configs, task_ids = common.build_grid(cfg, suite)
  T = len(task_ids)
  st = cfg.stability
  merges = merge_fns(cfg)
  arrays = suite.arrays()

  def make_wave(config_ids):
    originals = common.wave_experts(all_originals, config_ids, T)
    spec = twins_lib.make_twins(originals, arrays, m=st.num_twins, seed=st.seed,
                                control=st.control)
    group_sets = {M: common.config_groups(len(config_ids), T, M, st.num_groups)
                  for M in st.group_sizes}
    return spec, functools.partial(_rows, cfg, suite, originals, spec, group_sets, merges)

  ran = driver.sweep_waves(cfg, workdir, suite, len(configs), T, layout, make_wave)
  return summarize(cfg, workdir, **(ran or {}))


def _rows(cfg, suite, originals, spec, group_sets, merges, K, snap, ctx):
  """Rows of one wave of the stability study at milestone K."""
  st = cfg.stability
  role = twins_lib.roles(spec)
  m = evaluate_lib.evaluate(ctx.model, snap.params, spec, ctx.data)
  sq = twins_lib.sq_distances(snap.params, spec)
  ls = twins_lib.loss_stability(
      evaluate_lib.test_losses(ctx.model, snap.params, spec, ctx.data), spec,
      ctx.arrays.n_test)
  per_row = dict(m, sq_backbone=sq["backbone"], sq_full=sq["full"], loss_stab=ls["mean"],
                 loss_stab_max=ls["max"])
  rows = common.expert_rows(spec, suite, per_row, np.asarray(snap.diverged_at), K, ctx.common)
  for e, row in enumerate(rows):
    row.update(role=str(role[e]), origin=int(spec.origin[e]),
               perturbation=int(spec.replaced[e]))
  if st.constants:
    rows += theory.constant_rows(ctx, theory.params_of(snap.params, originals.size), originals,
                                 K, st.constants_samples, st.seed)
  merge_params = sharding_lib.on_one_device(snap.params) if group_sets else None
  for M, (groups, group_cfg, group_id) in group_sets.items():
    for name, fn in merges.items():
      out = twins_lib.merged_sq_distances(fn, ctx.backbone0, merge_params["backbone"],
                                          merge_params["head"], groups, spec)
      rows += merged_twin_rows(spec, suite, groups, group_cfg, group_id, out, sq, role, name,
                               K, ctx.common)
  return rows


def merged_twin_rows(spec, suite, groups, group_cfg, group_id, out, member_sq, role, algorithm,
                     K, common_fields) -> list[dict]:
  """One `merged_twin` row per (group, member, twin) of `twins.merged_sq_distances`' output."""
  rows = []
  M = groups.shape[1]
  for t, (g, r) in enumerate(zip(out["base"], out["row"])):
    i = int(spec.origin[r])
    rows.append(dict(common_fields, kind="merged_twin", algorithm=algorithm, M=M, K=K,
                     group=int(group_id[g]), config=int(group_cfg[g]),
                     **common.hparams_of(spec, i), n=int(spec.n[i]),
                     task=suite.tasks[spec.task[i]].name, expert=i, twin=int(r),
                     role=str(role[r]), perturbation=int(spec.replaced[r]),
                     sq_backbone=float(out["backbone"][t]), sq_full=float(out["full"][t]),
                     member_sq_backbone=float(member_sq["backbone"][r]),
                     member_sq_full=float(member_sq["full"][r])))
  return rows


def _nested(table, outer: str, inner: str, value: str = "mean") -> dict:
  return {f"{a:g}" if isinstance(a, float) else str(a):
          {f"{b:g}" if isinstance(b, float) else str(b): float(f"{v:.4g}")
           for b, v in sub.set_index(inner)[value].items()}
          for a, sub in table.groupby(outer)}


def _slope(x, y) -> tuple[list[dict], fit_lib.LogLogFit]:
  """Per regressor {slope, 95% CI} of a log-log least-squares fit, and the fit."""
  f = fit_lib.loglog_fit(x, y)
  return [dict(slope=round(float(f.slope[k]), 3), ci=[round(float(c), 3) for c in f.ci_slope[k]])
          for k in range(len(f.slope))], f


def summarize(cfg, workdir: str, **extra) -> dict[str, Any]:
  """Estimates (mean, s.e., 95% CI, max) by hyperparameter and K, the merged-model tables, the
  fitted exponents, CSV tables and figures, from the stored results."""
  df = results_lib.load(workdir)
  ex = df[df.kind == "expert"]
  tw, ctrl = ex[ex.role == "twin"], ex[ex.role == "control"]
  est = twins_lib.estimate_table(tw, ["eta", "b", "data_ratio", "n", "K"], "sq_full")
  summary: dict[str, Any] = dict(
      experts=int((ex.role == "original").sum() // ex.K.nunique()),
      twins=int(len(tw) // ex.K.nunique()), milestones=sorted(int(k) for k in ex.K.unique()),
      noise_floor_max_sq=float(ctrl.sq_full.max()) if len(ctrl) else None,
      noise_floor_max_loss=float(ctrl.loss_stab_max.max()) if len(ctrl) else None,
      diverged=int((ex[ex.K == ex.K.max()].diverged_at >= 0).sum()))
  for var in ("eta", "b", "data_ratio"):
    for col, key in (("sq_full", "eps2"), ("sq_backbone", "eps2_backbone"),
                     ("loss_stab", "loss_stab")):
      summary[f"{key}_by_{var}_K"] = _nested(twins_lib.estimate_table(tw, [var, "K"], col),
                                             var, "K")
  cells = est[est["mean"] > 0]
  # n enters only when the data ratio varies (across tasks alone it is confounded with the task).
  varying = [v for v in ("eta", "b", "n", "K") if cells[v].nunique() > 1
             and (v != "n" or cells["data_ratio"].nunique() > 1)]
  if varying and len(cells) > len(varying) + 1:
    slopes, f = _slope(cells[varying].to_numpy(float), cells["mean"].to_numpy())
    summary["eps2_exponents"] = dict(zip(varying, slopes))
    summary["eps2_fit_r2"] = round(float(f.r2), 3)
  mt = df[df.kind == "merged_twin"]
  if len(mt):
    mtw = mt[mt.role == "twin"]
    by = mtw.groupby(["algorithm", "M"])
    ratio = (by.sq_backbone.mean() / by.member_sq_backbone.mean()).reset_index(name="ratio")
    summary["merged_eps2_by_algorithm_M"] = _nested(
        twins_lib.estimate_table(mtw, ["algorithm", "M"], "sq_backbone"), "algorithm", "M")
    summary["merged_over_member_by_algorithm_M"] = _nested(ratio, "algorithm", "M", "ratio")
    summary["merged_noise_floor_max_sq"] = float(mt[mt.role == "control"].sq_full.max()) \
        if (mt.role == "control").any() else None
    if mtw.M.nunique() > 2:
      summary["merged_eps2_slope_vs_M"] = {}
      for name, sub in mtw.groupby("algorithm"):
        means = sub.groupby("M").sq_backbone.mean()
        summary["merged_eps2_slope_vs_M"][name] = _slope(means.index.to_numpy(float),
                                                         means.to_numpy())[0][0]
  if (df.kind == "constants").any():
    comp = theory.theory_comparison(df)
    summary["theory"] = {t: c.summary for t, c in comp.items()}
    if jax.process_index() == 0:
      for t, c in comp.items():
        c.table.to_csv(os.path.join(workdir, f"theory_{t}.csv"), index=False)
      if cfg.output.figures:
        plots.bound_vs_measured({t: c.table for t, c in comp.items()},
                                os.path.join(workdir, "bound_vs_measured.png"))
        if all(c.summary["axes"] for c in comp.values()):  # some hyperparameter varies
          plots.exponents_vs_predicted({t: c.summary for t, c in comp.items()},
                                       os.path.join(workdir, "exponents_vs_predicted.png"))
  if jax.process_index() == 0:
    est.to_csv(os.path.join(workdir, "stability_estimates.csv"), index=False)
    if cfg.output.figures:
      for name in cfg.stability.figures:
        FIGURES[name](df, os.path.join(workdir, f"{name}.png"))
    results_lib.write_json_atomic(os.path.join(workdir, "summary.json"), dict(summary, **extra))
  return dict(summary, **extra)
