"""The merge comparison: every algorithm on the same experts, groups and K snapshots.

Every merge in `compare.merges` (names from `stability.merging.registry`) merges the same
groups of the twin-extended stack: merged test accuracy/loss and gap (each member task with its
own head), merged-model stability from the twins, and task-vector diagnostics per group. The
inputs a data-dependent merge needs (Fisher diagonals, Gram matrices, unlabelled or held-out
batches, keys) are built by `merging.inputs` from the registry's `needs`.

Row kinds: `merge_compare` (algorithm x config x group x K) and `diagnostics` (config x group x
K).
"""
from __future__ import annotations

import functools
import logging
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
from stability.studies import stability as stability_study

log = logging.getLogger(__name__)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check of the merge comparison that needs no compute."""
  T = common.check_shared(cfg)
  twins_lib.check_counts(cfg.stability.num_twins, cfg.stability.control)
  allowed = merging.registry.compare_names()
  bad = [m for m in cfg.compare.merges if m not in allowed]
  if bad or not cfg.compare.merges:
    common.fail("compare.merges", f"unknown merge {bad[0] if bad else None!r}; allowed: "
                f"{', '.join(allowed)}")
  if cfg.compare.samples < 1:
    common.fail("compare.samples", f"must be >= 1 (labelled samples per expert); got "
                f"{cfg.compare.samples}")
  if cfg.compare.adamerging_steps < 0:
    common.fail("compare.adamerging_steps", f"must be >= 0; got {cfg.compare.adamerging_steps}")
  common.make_groups(T, cfg.sweep.group_size, cfg.sweep.num_groups)


def layout(cfg: ml_collections.ConfigDict, num_configs: int, T: int) -> tuple[int, int]:
  """(expert rows per config, merge groups in all)."""
  return stability_study.rows_per_config(cfg, T), num_configs * cfg.sweep.num_groups


def plan(cfg: ml_collections.ConfigDict) -> str:
  validate(cfg)
  return driver.describe(cfg, layout)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the experts and their twins, merges with every algorithm at every K, summarizes."""
  suite = common.get_suite(cfg)
  originals, configs, task_ids = common.build_grid(cfg, suite)
  st = cfg.stability
  T = len(task_ids)
  arrays = suite.arrays()

  def make_wave(config_ids):
    spec = twins_lib.make_twins(common.wave_experts(originals, config_ids, T), arrays,
                                m=st.num_twins, seed=st.seed, control=st.control)
    groups = common.config_groups(len(config_ids), T, cfg.sweep.group_size,
                                  cfg.sweep.num_groups)
    md = merging.inputs.MergeData.build(spec, arrays, cfg.compare.samples)
    return spec, functools.partial(_rows, cfg, suite, spec, groups, md)

  ran = driver.sweep_waves(cfg, workdir, suite, len(configs), T, layout, make_wave)
  return summarize(cfg, workdir, **(ran or {}))


def _rows(cfg, suite, spec, group_set, md, K, snap, ctx):
  """Rows of one wave of the compare study at milestone K."""
  st = cfg.stability
  groups, group_cfg, group_id = group_set
  is_twin = twins_lib.roles(spec) == "twin"
  # The per-row statistics and the merges read arbitrary rows: gather the stack once.
  params = sharding_lib.on_one_device(snap.params)
  member_sq = twins_lib.sq_distances(params, spec)
  steps = cfg.compare.adamerging_steps
  fns = merging.inputs.merge_fns(
      [m for m in cfg.compare.merges if m != "ensemble"], model=ctx.model, params=params,
      spec=spec, data=md, key=jax.random.key(st.seed),
      hparams={"adamerging_task": dict(steps=steps), "adamerging_layer": dict(steps=steps)})
  member_spec = spec.take(groups.reshape(-1))
  G, M = groups.shape
  row = functools.partial(_row, ctx, spec, suite, groups, group_cfg, group_id, K=K)
  rows = []
  for name, fn in fns.items():
    log.info("K=%d: merging with %s", K, name)
    out = twins_lib.merged_sq_distances(fn, ctx.backbone0, params["backbone"],
                                        params["head"], groups, spec)
    member = evaluate_lib.member_params(out["merged"], params["head"], groups)
    ev = {k: np.asarray(v).reshape(G, M).mean(1)
          for k, v in evaluate_lib.evaluate(ctx.model, member, member_spec, ctx.data).items()}
    tw = is_twin[out["row"]]
    for g in range(G):
      sel = tw & (out["base"] == g)
      rows.append(row(g, name, {k: float(v[g]) for k, v in ev.items()},
                      merged_eps2=float(out["backbone"][sel].mean()),
                      merged_eps2_full=float(out["full"][sel].mean()),
                      member_eps2=float(member_sq["backbone"][out["row"][sel]].mean())))
  if "ensemble" in cfg.compare.merges:
    ens = merging.inputs.ensemble_metrics(ctx.model, ctx.backbone0, params, groups, spec, md)
    rows += [row(g, "ensemble", {k: float(v[g]) for k, v in ens.items()}) for g in range(G)]
  diag = merging.diagnostics(ctx.backbone0, params["backbone"], groups,
                             key=jax.random.key(st.seed))
  cos = np.asarray(diag["cosine"])
  off = ~np.eye(M, dtype=bool)
  for g in range(G):
    rows.append(row(
        g, None, {}, kind="diagnostics",
        tau_norm=float(np.mean(diag["tau_norm"][g])), cosine=float(cos[g][off].mean()),
        sign_conflict=float(diag["sign_conflict"][g]),
        ties_sign_conflict=float(diag["ties_sign_conflict"][g]),
        ties_sparsity=float(np.mean(diag["ties_sparsity"][g])),
        ties_merged_sparsity=float(diag["ties_merged_sparsity"][g]),
        dare_sparsity=float(np.mean(diag["dare_sparsity"][g]))))
  return rows


def _row(ctx, spec, suite, groups, group_cfg, group_id, g, algorithm, metrics, *, K,
         kind="merge_compare", **extra) -> dict:
  return dict(ctx.common, kind=kind, algorithm=algorithm, K=K, M=int(groups.shape[1]),
              group=int(group_id[g]), config=int(group_cfg[g]),
              **common.hparams_of(spec, int(groups[g, 0])),
              tasks=[suite.tasks[spec.task[e]].name for e in groups[g]], **metrics, **extra)


def summarize(cfg, workdir: str, **extra) -> dict[str, Any]:
  """Per-algorithm table at every K (means over groups), CSV, figures and summary.json."""
  df = results_lib.load(workdir)
  mc = df[df.kind == "merge_compare"]
  cols = [c for c in ("test_acc", "test_loss", "gap", "merged_eps2", "member_eps2")
          if c in mc.columns]
  table = mc.groupby(["K", "algorithm"])[cols].mean().reset_index()
  if "merged_eps2" in table:
    table["eps2_ratio"] = table["merged_eps2"] / table["member_eps2"]
  Kmax = int(mc.K.max())
  last = table[table.K == Kmax].drop(columns="K").set_index("algorithm")
  dg = df[(df.kind == "diagnostics") & (df.K == Kmax)]
  summary = dict(
      algorithms=sorted(mc.algorithm.unique()), milestones=sorted(int(k) for k in mc.K.unique()),
      groups=int(mc[(mc.K == Kmax)].groupby("algorithm").size().max()),
      table_at_Kmax={a: {c: (None if not np.isfinite(v) else float(f"{v:.4g}"))
                         for c, v in r.items()} for a, r in last.iterrows()},
      diagnostics_at_Kmax={c: round(float(dg[c].mean()), 4) for c in (
          "tau_norm", "cosine", "sign_conflict", "ties_sign_conflict", "ties_sparsity",
          "ties_merged_sparsity", "dare_sparsity")})
  if jax.process_index() == 0:
    table.to_csv(os.path.join(workdir, "compare_table.csv"), index=False)
    if cfg.output.figures:
      plots.merge_comparison(df, os.path.join(workdir, "merge_comparison.png"))
      plots.algorithms_vs_bound_terms(df, os.path.join(workdir, "algorithms_vs_bound_terms.png"))
    results_lib.write_json_atomic(os.path.join(workdir, "summary.json"), dict(summary, **extra))
  return dict(summary, **extra)
