"""Sweeps: the library function behind each study, called by the thin runner.

The main job (`run_main`): a grid of (eta, b, data_ratio, seed) configs x tasks = E experts,
trained as one sharded, vmapped stack from the pretrained base; at each K milestone every expert
is evaluated, and for each config G random groups of M tasks (group seeds 0..G-1, the same
groups at every K and config) are merged by simple averaging of backbones and evaluated with
each member's own head. Each milestone is one unit of work in the results store.

Row kinds: `expert` (one per expert x K), `merged_task` (one per group x config x member x K),
`merged` (one per group x config x K, means over the members).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from stability import config as config_lib
from stability import evaluate as evaluate_lib
from stability import experts as experts_lib
from stability import merge as merge_lib
from stability import models as models_lib
from stability import plots
from stability import pretrain as pretrain_lib
from stability import results as results_lib
from stability import tasks as tasks_lib
from stability import train as train_lib

log = logging.getLogger(__name__)


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


def resolve_tasks(suite: tasks_lib.Suite, names) -> list[int]:
  """Task indices for config.data.tasks (empty: every task of the suite)."""
  return [suite.index(n) for n in names] if names else list(range(len(suite.tasks)))


def make_groups(num_tasks: int, M: int, G: int, seed0: int = 0) -> np.ndarray:
  """[G, M] task positions; group g draws M distinct tasks with seed seed0 + g."""
  if M < 1 or M > num_tasks:
    _fail("sweep.group_size", f"must lie in [1, {num_tasks}] (the number of tasks); got {M}")
  if G < 1:
    _fail("sweep.num_groups", f"must be >= 1; got {G}")
  return np.stack([np.sort(np.random.default_rng(seed0 + g).choice(num_tasks, M, replace=False))
                   for g in range(G)]).astype(np.int32)


def build_grid(cfg: ml_collections.ConfigDict, suite: tasks_lib.Suite):
  """Expert specs for config.sweep's grid, and the list of (eta, b, ratio, seed) configs."""
  sw = cfg.sweep
  task_ids = resolve_tasks(suite, cfg.data.tasks)
  for field in ("lr", "batch_size", "data_ratio", "seeds"):
    if len(sw[field]) == 0:
      _fail(f"sweep.{field}", "needs at least one value")
  if any(not (np.isfinite(v) and v > 0) for v in sw.lr):
    _fail("sweep.lr", f"learning rates must be finite and > 0; got {tuple(sw.lr)}")
  if any(not 0 < r <= 1 for r in sw.data_ratio):
    _fail("sweep.data_ratio", f"must lie in (0, 1]; got {tuple(sw.data_ratio)}")
  if any(v < 1 for v in sw.batch_size):
    _fail("sweep.batch_size", f"must be >= 1; got {tuple(sw.batch_size)}")
  train_lib.check_milestones(sw.milestones)
  configs = list(itertools.product(sw.lr, sw.batch_size, sw.data_ratio, sw.seeds))
  rows = [(c, t) for c in configs for t in task_ids]
  spec = experts_lib.make_experts(
      suite, task=[t for _, t in rows], eta=[c[0] for c, _ in rows],
      b=[c[1] for c, _ in rows], K=[sw.milestones[-1]] * len(rows),
      data_ratio=[c[2] for c, _ in rows], seed=[c[3] for c, _ in rows],
      momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
  return spec, configs, task_ids


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check that needs no compute, so a bad config fails before any training."""
  if cfg.data.suite not in tasks_lib.suite_names():
    _fail("data.suite", f"unknown suite {cfg.data.suite!r}; allowed: "
          f"{', '.join(tasks_lib.suite_names())}")
  if cfg.model.name not in models_lib.model_names():
    _fail("model.name", f"unknown model {cfg.model.name!r}; allowed: "
          f"{', '.join(models_lib.model_names())}")
  train_lib.get_optimizer(cfg.optim.name)
  train_lib.get_optimizer(cfg.pretrain.optimizer)
  train_lib.check_milestones(cfg.sweep.milestones)


def _model(cfg, suite):
  return models_lib.get_model(cfg.model.name, suite.max_classes, **cfg.model.kwargs.to_dict())


def base_backbone(cfg: ml_collections.ConfigDict, suite, model):
  p = cfg.pretrain
  return pretrain_lib.get_pretrained(
      model, suite, {"name": cfg.model.name, **cfg.model.kwargs.to_dict()},
      os.path.expanduser(cfg.output.cache_dir) if cfg.output.cache_dir else None,
      steps=p.steps, batch_size=p.batch_size, eta=p.lr, momentum=p.momentum,
      weight_decay=p.weight_decay, optimizer=p.optimizer, seed=cfg.seed)


def run_main(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the main job into `workdir`; returns a summary dict (also written as summary.json)."""
  t_start = time.time()
  validate(cfg)
  suite = tasks_lib.get_suite(cfg.data.suite, cfg.seed)
  spec, configs, task_ids = build_grid(cfg, suite)
  group_pos = make_groups(len(task_ids), cfg.sweep.group_size, cfg.sweep.num_groups)
  T = len(task_ids)
  # Expert row of (config c, task position t) is c * T + t.
  groups = np.concatenate([c * T + group_pos for c in range(len(configs))])
  group_cfg = np.repeat(np.arange(len(configs)), len(group_pos))
  group_id = np.tile(np.arange(len(group_pos)), len(configs))

  is_writer = jax.process_index() == 0
  store = results_lib.Store(workdir) if is_writer else None
  chash = config_lib.config_hash(cfg)
  milestones = [int(k) for k in cfg.sweep.milestones]
  if store is not None and all(store.done(f"K={k}") for k in milestones):
    log.info("all %d milestones already in %s; nothing to do", len(milestones), workdir)
    return summarize(cfg, workdir)

  model = _model(cfg, suite)
  backbone0 = base_backbone(cfg, suite, model)
  arrays = suite.arrays()
  params = experts_lib.init_stack(model, backbone0, spec, suite.image_shape)
  trainer = train_lib.Trainer(model, cfg.optim.name, spec, train_lib.Pools.from_arrays(arrays),
                              max_chunk=cfg.train.max_chunk)
  data = evaluate_lib.EvalData.from_arrays(arrays)
  state = trainer.init(params)
  metrics_log = results_lib.MetricsLog(workdir) if is_writer else None
  bar = tqdm(total=milestones[-1], desc=f"{spec.size} experts", unit="step",
             disable=not (is_writer and cfg.output.progress))
  done_steps = [0]

  def progress(k, loss_E):
    bar.update(k - done_steps[0])
    done_steps[0] = k
    bar.set_postfix(loss=f"{np.nanmean(loss_E):.3f}")
    if metrics_log is not None:
      metrics_log.log(step=k, mean_loss=float(np.nanmean(loss_E)), time=time.time() - t_start)

  common = dict(study=cfg.study, config_hash=chash, suite=suite.name, model=cfg.model.name)
  for K, snap in trainer.run(state, milestones, progress=progress):
    snap = trainer.unpad(snap)
    rows = expert_rows(spec, suite, evaluate_lib.evaluate(model, snap.params, spec, data),
                       np.asarray(snap.diverged_at), K, common)
    merged = merge_lib.average(backbone0, snap.params["backbone"], groups)
    member = evaluate_lib.member_params(merged, snap.params["head"], groups)
    mm = evaluate_lib.evaluate(model, member, spec.take(groups.reshape(-1)), data)
    rows += merged_rows(spec, suite, groups, group_cfg, group_id, mm, K, common)
    if store is not None:
      store.write(f"K={K}", rows)
  bar.close()
  if metrics_log is not None:
    metrics_log.close()
  return summarize(cfg, workdir, wall_time=time.time() - t_start,
                   expert_steps=spec.size * milestones[-1])


def expert_rows(spec, suite, m, diverged_at, K, common) -> list[dict]:
  rows = []
  for e in range(spec.size):
    rows.append(dict(common, kind="expert", expert=e, task=suite.tasks[spec.task[e]].name,
                     eta=float(spec.eta[e]), b=int(spec.b[e]),
                     data_ratio=round(float(spec.data_ratio[e]), 6), seed=int(spec.seed[e]),
                     n=int(spec.n[e]), K=K, diverged_at=int(diverged_at[e]),
                     **{k: float(v[e]) for k, v in m.items()}))
  return rows


def merged_rows(spec, suite, groups, group_cfg, group_id, mm, K, common) -> list[dict]:
  G, M = groups.shape
  rows = []
  for g in range(G):
    e0 = groups[g, 0]
    hp = dict(eta=float(spec.eta[e0]), b=int(spec.b[e0]),
              data_ratio=round(float(spec.data_ratio[e0]), 6), seed=int(spec.seed[e0]))
    base = dict(common, group=int(group_id[g]), config=int(group_cfg[g]), M=M, K=K, **hp)
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
  """Summary numbers and the main figure, from the stored results."""
  df = results_lib.load(workdir)
  if jax.process_index() == 0 and cfg.output.figures:
    plots.merged_vs_K(df, os.path.join(workdir, "merged_vs_K.png"))
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
  if jax.process_index() == 0:
    results_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary


STUDIES = {"main": run_main}


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Dispatches config.study to its library function."""
  if cfg.study not in STUDIES:
    _fail("study", f"unknown study {cfg.study!r}; allowed: {', '.join(STUDIES)}")
  return STUDIES[cfg.study](cfg, workdir)
