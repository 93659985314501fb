"""The main job: experts on a grid of (eta, b, data_ratio, seed) configs, merged by averaging.

A grid of configs x tasks = E experts, trained as one sharded, vmapped stack from the pretrained
base; at each K milestone every expert is evaluated, and for each config G random groups of M
tasks (group seeds 0..G-1, the same groups at every K and config) are merged by simple
averaging of backbones and evaluated with each member's own head.

Row kinds: `expert` (one per expert x K), `merged_task` (one per group x config x member x K),
`merged` (one per group x config x K, means over the members).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from stability import evaluate as evaluate_lib
from stability import merging
from stability import plots
from stability import results as results_lib
from stability.studies import common
from stability.studies import driver
from stability.studies import theory


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check of the main job that needs no compute."""
  T = common.check_shared(cfg)
  common.make_groups(T, cfg.sweep.group_size, cfg.sweep.num_groups)


def layout(cfg: ml_collections.ConfigDict, num_configs: int, T: int) -> tuple[int, int]:
  """(expert rows per config, merge groups in all)."""
  return T, num_configs * cfg.sweep.num_groups


def plan(cfg: ml_collections.ConfigDict) -> str:
  validate(cfg)
  return driver.describe(cfg, layout)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the main job into `workdir`; returns a summary dict (also written as summary.json)."""
  suite = common.get_suite(cfg)
  all_experts, configs, task_ids = common.build_grid(cfg, suite)
  T = len(task_ids)

  def make_wave(config_ids):
    spec = common.wave_experts(all_experts, config_ids, T)
    groups, group_cfg, group_id = common.config_groups(len(config_ids), T, cfg.sweep.group_size,
                                                       cfg.sweep.num_groups)

    def rows_at(K, snap, ctx):
      rows = common.expert_rows(spec, suite,
                                evaluate_lib.evaluate(ctx.model, snap.params, spec, ctx.data),
                                np.asarray(snap.diverged_at), K, ctx.common)
      merged = merging.average(ctx.backbone0, snap.params["backbone"], groups)
      member = evaluate_lib.member_params(merged, snap.params["head"], groups)
      mm = evaluate_lib.evaluate(ctx.model, member, spec.take(groups.reshape(-1)), ctx.data)
      return rows + merged_rows(spec, suite, groups, group_cfg, group_id, mm, K, ctx.common)
    return spec, rows_at

  ran = driver.sweep_waves(cfg, workdir, suite, len(configs), T, layout, make_wave)
  return summarize(cfg, workdir, **(ran or {}))


def merged_rows(spec, suite, groups, group_cfg, group_id, mm, K, common_fields) -> list[dict]:
  """`merged_task` rows (one per member) and a `merged` row (their mean) per group at K."""
  G, M = groups.shape
  rows = []
  for g in range(G):
    base = dict(common_fields, group=int(group_id[g]), config=int(group_cfg[g]), M=M, K=K,
                **common.hparams_of(spec, groups[g, 0]))
    per = {k: np.asarray(v).reshape(G, M)[g] for k, v in mm.items()}
    for j in range(M):
      e = int(groups[g, j])
      rows.append(dict(base, kind="merged_task", expert=e, task=suite.tasks[spec.task[e]].name,
                       **{k: float(v[j]) for k, v in per.items()}))
    rows.append(dict(base, kind="merged",
                     tasks=[suite.tasks[spec.task[e]].name for e in groups[g]],
                     **{k: float(np.mean(v)) for k, v in per.items()}))
  return rows


def summarize(cfg, workdir: str, **extra) -> dict[str, Any]:
  """Summary numbers and the main figures, from the stored results."""
  df = results_lib.load(workdir)
  if jax.process_index() == 0 and cfg.output.figures:
    plots.merged_vs_K(df, os.path.join(workdir, "merged_vs_K.png"))
    plots.gap_vs_hparams(df, os.path.join(workdir, "gap_vs_hparams.png"))
  ex, mg = df[df.kind == "expert"], df[df.kind == "merged"]
  Kmax = int(df.K.max())
  summary = dict(
      experts=int(ex.expert.nunique()), milestones=sorted(int(k) for k in df.K.unique()),
      merged_groups=int(mg[mg.K == Kmax].shape[0]),
      diverged=int((ex[ex.K == Kmax].diverged_at >= 0).sum()),
      expert_test_acc=float(ex[ex.K == Kmax].test_acc.mean()),
      merged_test_acc=float(mg[mg.K == Kmax].test_acc.mean()),
      merged_test_loss_by_eta_K={f"{eta:g}": {int(k): round(float(v), 4) for k, v in s.items()}
                                 for eta, s in mg.groupby(["eta", "K"]).test_loss.mean()
                                 .unstack().iterrows()},
      merged_gap_by_eta_K={f"{eta:g}": {int(k): round(float(v), 4) for k, v in s.items()}
                           for eta, s in mg.groupby(["eta", "K"]).gap.mean().unstack().iterrows()},
      **extra)
  if cfg.theory.L > 0:
    comp = theory.merged_gap_comparison(df, cfg)
    summary["theory_merged_gap"] = dict(
        holds=comp.summary["holds"], rows=comp.summary["rows"],
        spearman_bound_measured=round(float(comp.summary["spearman_bound_measured"]), 3),
        axes={a: {k: round(float(v), 3) for k, v in ax.items()
                  if k in ("spearman_within", "sign_agreement", "slices")}
              for a, ax in comp.summary["axes"].items()})
    if jax.process_index() == 0:
      comp.table.to_csv(os.path.join(workdir, "theory_merged_gap.csv"), index=False)
  if jax.process_index() == 0:
    results_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary
