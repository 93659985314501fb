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

import dataclasses
import functools
import itertools
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from stability import checkpoint as checkpoint_lib
from stability import config as config_lib
from stability import evaluate as evaluate_lib
from stability import experts as experts_lib
from stability import merge as merge_lib
from stability import models as models_lib
from stability import planner
from stability import plots
from stability import pretrain as pretrain_lib
from stability import results as results_lib
from stability import sharding as sharding_lib
from stability import tasks as tasks_lib
from stability import train as train_lib
from stability import twins as twins_lib
from theory import compare as compare_lib
from theory import constants as constants_lib
from theory import fit as fit_lib

log = logging.getLogger(__name__)


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


def get_suite(cfg: ml_collections.ConfigDict) -> tasks_lib.Suite:
  """The configured task suite (`data.suite` built with `data.options`)."""
  return tasks_lib.get_suite(cfg.data.suite, cfg.seed, **cfg.data.options.to_dict())


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
  if cfg.pretrain.optimizer not in train_lib.OPTIMIZERS:
    _fail("pretrain.optimizer", f"unknown optimizer {cfg.pretrain.optimizer!r}; allowed: "
          f"{', '.join(train_lib.OPTIMIZERS)}")
  train_lib.check_milestones(cfg.sweep.milestones)
  tr = cfg.train
  if tr.max_chunk < 1:
    _fail("train.max_chunk", f"must be >= 1 step; got {tr.max_chunk}")
  if tr.checkpoint_every < 0:
    _fail("train.checkpoint_every", f"must be >= 0 steps (0 = no checkpoints); got "
          f"{tr.checkpoint_every}")
  if tr.memory_gb < 0:
    _fail("train.memory_gb", f"must be >= 0 (0 = detect); got {tr.memory_gb}")


def _model(cfg, suite):
  return models_lib.get_model(cfg.model.name, suite.max_classes, **cfg.model.kwargs.to_dict())


def base_backbone(cfg: ml_collections.ConfigDict, suite, model):
  p = cfg.pretrain
  return pretrain_lib.get_pretrained(
      model, suite, {"name": cfg.model.name, **cfg.model.kwargs.to_dict(),
                     **({"suite_options": cfg.data.options.to_dict()} if cfg.data.options
                        else {})},
      os.path.expanduser(cfg.output.cache_dir) if cfg.output.cache_dir else None,
      steps=p.steps, batch_size=p.batch_size, eta=p.lr, momentum=p.momentum,
      weight_decay=p.weight_decay, optimizer=p.optimizer, seed=cfg.seed)


def config_groups(num_configs: int, T: int, M: int, G: int):
  """Groups of expert rows for every config: the same G task groups (seeds 0..G-1) per config.

  Expert row of (config c, task position t) is c * T + t. Returns groups [C*G, M], the config
  of each group [C*G] and its group id [C*G].
  """
  group_pos = make_groups(T, M, G)
  groups = np.concatenate([c * T + group_pos for c in range(num_configs)])
  return (groups, np.repeat(np.arange(num_configs), G), np.tile(np.arange(G), num_configs))


@dataclasses.dataclass
class Context:
  """What a study's per-milestone function needs besides the snapshot."""
  suite: tasks_lib.Suite
  model: models_lib.Model
  backbone0: Any
  arrays: tasks_lib.TaskArrays
  data: evaluate_lib.EvalData
  common: dict


def make_context(cfg: ml_collections.ConfigDict, suite: tasks_lib.Suite) -> Context:
  """The model, the pretrained base (cached or trained once per run) and the suite's arrays."""
  model = _model(cfg, suite)
  arrays = suite.arrays()
  return Context(suite=suite, model=model, backbone0=base_backbone(cfg, suite, model),
                 arrays=arrays, data=evaluate_lib.EvalData.from_arrays(arrays),
                 common=dict(study=cfg.study, config_hash=config_lib.config_hash(cfg),
                             suite=suite.name, model=cfg.model.name))


# Row fields holding an expert row or a config index: offset per wave so ids are sweep-global.
_EXPERT_IDS, _CONFIG_IDS = ("expert", "origin", "twin"), ("config",)


def _units(milestones, wave: int) -> list[str]:
  return [f"wave={wave}/K={k}" for k in milestones]


def _done(store: results_lib.Store | None, units: list[str]) -> np.ndarray:
  """Which units the store holds, as process 0 sees it, on every process."""
  done = np.array([store.done(u) for u in units] if store is not None else [False] * len(units))
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done.astype(bool)


def layout(cfg: ml_collections.ConfigDict, num_configs: int, T: int) -> tuple[int, int]:
  """(expert rows per config, merge groups in all) of the configured study."""
  st = cfg.get("stability")
  twins = 1 + st.num_twins + int(st.control) if cfg.study in ("stability", "compare") else 1
  if cfg.study == "stability":
    groups = num_configs * st.num_groups * len(st.group_sizes)
  else:
    groups = num_configs * cfg.sweep.num_groups
  return T * twins, groups


def make_plan(cfg: ml_collections.ConfigDict, suite: tasks_lib.Suite, num_configs: int,
              T: int) -> planner.Plan:
  """The wave plan of the configured study on this machine's devices."""
  per_config, groups = layout(cfg, num_configs, T)
  return planner.plan(_model(cfg, suite), cfg.optim.name, suite.image_shape,
                      configs=num_configs, experts_per_config=per_config,
                      b_max=int(max(cfg.sweep.batch_size)),
                      milestones=[int(k) for k in cfg.sweep.milestones], groups=groups,
                      memory_gb=cfg.train.memory_gb, max_wave=cfg.train.max_wave)


def dry_run(cfg: ml_collections.ConfigDict) -> str:
  """The plan (experts, waves, snapshots, groups, memory, compute) without computing anything."""
  if cfg.study not in STUDIES:
    _fail("study", f"unknown study {cfg.study!r}; allowed: {', '.join(STUDIES)}")
  validate(cfg)
  try:
    suite = get_suite(cfg)
  except ValueError as e:
    if not str(e).startswith("data_root:") or cfg.data.suite != "paper20":
      raise
    # Plan from the datasets' nominal shapes, and say what is missing and where we looked.
    suite, missing = _nominal_paper20(cfg), str(e)[len("data_root: "):]
    num_configs = int(np.prod([len(cfg.sweep[f]) for f in ("lr", "batch_size", "data_ratio",
                                                            "seeds")]))
    T = len(cfg.data.tasks) or len(suite.tasks)
    return (f"study         {cfg.study}\n"
            + make_plan(cfg, suite, num_configs, T).describe()
            + f"\ndata          NOT READY (planned from nominal dataset shapes): {missing}")
  _, configs, task_ids = build_grid(cfg, suite)
  return f"study         {cfg.study}\n" + make_plan(cfg, suite, len(configs),
                                                    len(task_ids)).describe()


@dataclasses.dataclass(frozen=True)
class _NominalTask:
  name: str
  num_classes: int


@dataclasses.dataclass(frozen=True)
class _NominalSuite:
  """The shape facts the planner needs, from the paper-20 table instead of the data."""
  tasks: tuple
  image_shape: tuple
  max_classes: int


def _nominal_paper20(cfg) -> _NominalSuite:
  from stability import loaders  # noqa: PLC0415 (only the paper suite needs it)
  opts = cfg.data.options.to_dict()
  specs = [sp for sp in loaders.PAPER20 if not cfg.data.tasks or sp.name in cfg.data.tasks]
  size, channels = opts.get("image_size", 32), opts.get("channels", 3) or 3
  return _NominalSuite(tasks=tuple(_NominalTask(sp.name, sp.classes) for sp in specs),
                       image_shape=(size, size, channels),
                       max_classes=max(sp.classes for sp in specs))


def sweep_waves(cfg: ml_collections.ConfigDict, workdir: str, suite: tasks_lib.Suite,
                num_configs: int, T: int,
                make_wave: Callable[[np.ndarray], tuple[experts_lib.Experts, Callable]]
                ) -> dict[str, Any] | None:
  """Trains the sweep wave by wave (`planner`), storing each wave's rows at every milestone.

  `make_wave(config_ids)` returns the wave's expert specs and `rows_at(K, snapshot, ctx)`, whose
  rows use wave-local expert rows and config indices (offset here to sweep-global ones). Returns
  timing info, or None when every unit was already done.
  """
  t_start = time.time()
  milestones = [int(k) for k in cfg.sweep.milestones]
  is_writer = jax.process_index() == 0
  the_plan = make_plan(cfg, suite, num_configs, T)
  waves = the_plan.waves
  first = make_wave(np.asarray(waves[0]))  # validates the study's settings before any output
  store = results_lib.Store(workdir) if is_writer else None
  done = [_done(store, _units(milestones, w)) for w in range(len(waves))]
  if all(d.all() for d in done):
    log.info("all %d units already in %s; nothing to do", sum(map(len, done)), workdir)
    for w in range(len(waves)):
      _drop_checkpoints(workdir, w)  # left behind when a kill followed the last unit's write
    return None
  log.info("plan:\n%s", the_plan.describe())
  results_lib.write_config(workdir, config_lib.to_dict(cfg)) if is_writer else None
  ctx = make_context(cfg, suite)
  metrics_log = results_lib.MetricsLog(workdir) if is_writer else None
  bar = tqdm(total=the_plan.expert_steps, desc=f"{the_plan.experts} experts, {len(waves)} waves",
             unit="expert-step", unit_scale=True,
             disable=not (is_writer and cfg.output.progress))
  expert_offset = 0
  for w, config_ids in enumerate(waves):
    spec, rows_at = first if w == 0 else make_wave(np.asarray(config_ids))
    units = _units(milestones, w)
    if done[w].all():
      bar.update(spec.size * milestones[-1])
      _drop_checkpoints(workdir, w)  # left behind when a kill followed the last unit's write
    else:
      _train_wave(cfg, workdir, ctx, spec, rows_at, w, units, done[w], store, bar, metrics_log,
                  offsets=(expert_offset, int(config_ids[0])))
    expert_offset += spec.size
  bar.close()
  if metrics_log is not None:
    metrics_log.close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("results stored")  # summaries read the store next
  return dict(wall_time=time.time() - t_start, expert_steps=the_plan.expert_steps,
              waves=len(waves))


def _train_wave(cfg, workdir, ctx, spec, rows_at, wave, units, done, store, bar, metrics_log, *,
                offsets):
  """One wave: restore its latest checkpoint, train, store each milestone, checkpoint."""
  milestones = [int(k) for k in cfg.sweep.milestones]
  trainer = train_lib.Trainer(ctx.model, cfg.optim.name, spec,
                              train_lib.Pools.from_arrays(ctx.arrays),
                              max_chunk=cfg.train.max_chunk)
  state = trainer.init(experts_lib.init_stack(ctx.model, ctx.backbone0, spec,
                                              ctx.suite.image_shape))
  ckpt = checkpoint_lib.StackCheckpoints(_checkpoint_dir(workdir, wave),
                                         cfg.train.checkpoint_every)
  # A checkpoint at step s was saved after every milestone <= s was stored: resume from the
  # latest one that the store agrees with.
  C = trainer.chunk(milestones)
  start = max([0] + [s for s in ckpt.steps() if s % C == 0
                     and all(done[i] for i, k in enumerate(milestones) if k <= s)])
  if start:
    state = ckpt.restore(start, state)
  bar.update(spec.size * start)
  t0, steps_done = time.time(), [start]
  expert_offset, config_offset = offsets

  def progress(k, loss_E):
    bar.update(spec.size * (k - steps_done[0]))
    steps_done[0] = k
    bar.set_postfix(wave=wave, loss=f"{np.nanmean(loss_E):.3f}")
    if metrics_log is not None:
      metrics_log.log(wave=wave, step=k, mean_loss=float(np.nanmean(loss_E)),
                      time=time.time() - t0)

  for K, snap in trainer.run(state, milestones, start=start, progress=progress,
                             checkpoint=ckpt.save, checkpoint_due=ckpt.due):
    unit = units[milestones.index(K)]
    if done[milestones.index(K)]:
      continue
    if jax.process_count() > 1:
      snap = sharding_lib.on_one_device(snap)  # every process computes the rows from all rows
    rows = rows_at(K, trainer.unpad(snap), ctx)
    for r in rows:
      r["wave"] = wave
      for f in _EXPERT_IDS:
        if f in r:
          r[f] += expert_offset
      for f in _CONFIG_IDS:
        if f in r:
          r[f] += config_offset
    if store is not None:
      store.write(unit, rows)
  ckpt.close()
  _drop_checkpoints(workdir, wave)


def _checkpoint_dir(workdir: str, wave: int) -> str:
  return os.path.join(workdir, "checkpoints", f"wave={wave}")


def _drop_checkpoints(workdir: str, wave: int) -> None:
  """A wave whose results are all stored needs no checkpoints."""
  if jax.process_index() == 0:
    shutil.rmtree(_checkpoint_dir(workdir, wave), ignore_errors=True)
    try:
      os.rmdir(os.path.dirname(_checkpoint_dir(workdir, wave)))  # when no other wave has any
    except OSError:
      pass


def run_main(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the main job into `workdir`; returns a summary dict (also written as summary.json)."""
  validate(cfg)
  suite = get_suite(cfg)
  all_experts, configs, task_ids = build_grid(cfg, suite)
  T = len(task_ids)

  def make_wave(config_ids):
    spec = wave_experts(all_experts, config_ids, T)
    groups, group_cfg, group_id = config_groups(len(config_ids), T, cfg.sweep.group_size,
                                                cfg.sweep.num_groups)

    def rows_at(K, snap, ctx):
      rows = expert_rows(spec, suite,
                         evaluate_lib.evaluate(ctx.model, snap.params, spec, ctx.data),
                         np.asarray(snap.diverged_at), K, ctx.common)
      merged = merge_lib.average(ctx.backbone0, snap.params["backbone"], groups)
      member = evaluate_lib.member_params(merged, snap.params["head"], groups)
      mm = evaluate_lib.evaluate(ctx.model, member, spec.take(groups.reshape(-1)), ctx.data)
      return rows + merged_rows(spec, suite, groups, group_cfg, group_id, mm, K, ctx.common)
    return spec, rows_at

  ran = sweep_waves(cfg, workdir, suite, len(configs), T, make_wave)
  return summarize(cfg, workdir, **(ran or {}))


def wave_experts(experts: experts_lib.Experts, config_ids: np.ndarray, T: int
                 ) -> experts_lib.Experts:
  """The expert rows (config-major, T tasks per config) of the given configs."""
  return experts.take((np.asarray(config_ids)[:, None] * T + np.arange(T)).reshape(-1))


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
    comp = merged_gap_comparison(df, cfg)
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


def merged_gap_comparison(df, cfg) -> compare_lib.Comparison:
  """The merged model's measured gap against the non-convex gap bound of a simple average of M
  experts (eps^2 / M^2), per config and K (means over groups), with the constants
  config.theory.G and .L; eta enters as eta / (1 - momentum) (heuristic for heavy ball,
  docs/theory.md 2.6)."""
  mg = df[df.kind == "merged"]
  ex = df[df.kind == "expert"]
  keys = ["eta", "b", "data_ratio", "K", "M"]
  table = mg.groupby(keys)[["gap", "train_loss"]].mean().reset_index()
  n = ex.groupby(["eta", "b", "data_ratio", "K"]).n.mean().rename("n")
  table = table.join(n, on=["eta", "b", "data_ratio", "K"])
  table["eta"] = table["eta"] / (1.0 - cfg.optim.momentum)
  return compare_lib.compare(table, L=float(cfg.theory.L), G=float(cfg.theory.G), target="gap",
                             convex=False)


# ---------------------------------------------------------------------------------------------
# Stability study: originals + coupled twins, expert and merged-model L2 stability.

# Merges the stability study can run on the twin stack: they need no data beyond the stack.
STABILITY_MERGES = ("average", "task_arithmetic", "ties", "dare_average", "dare_task_arithmetic",
                    "dare_ties", "uniform_soup", "model_stock")


def validate_stability(cfg: ml_collections.ConfigDict, num_tasks: int) -> None:
  st = cfg.stability
  bad = [m for m in st.merges if m not in STABILITY_MERGES]
  if bad:
    _fail("stability.merges", f"unknown or data-dependent merge {bad[0]!r}; allowed: "
          f"{', '.join(STABILITY_MERGES)}")
  for M in st.group_sizes:
    if not 1 <= M <= num_tasks:
      _fail("stability.group_sizes", f"each must lie in [1, {num_tasks}] (the number of tasks); "
            f"got {M}")
  if st.group_sizes and not st.merges:
    _fail("stability.merges", "needs at least one merge when stability.group_sizes is set")
  if st.num_groups < 1:
    _fail("stability.num_groups", f"must be >= 1; got {st.num_groups}")
  bad = [f for f in st.figures if f not in FIGURES]
  if bad:
    _fail("stability.figures", f"unknown figure {bad[0]!r}; allowed: {', '.join(FIGURES)}")
  needs_merges = [f for f in st.figures if f != "stability_vs_hparams"]
  if needs_merges and not st.group_sizes:
    _fail("stability.figures", f"{needs_merges[0]!r} needs stability.group_sizes and merges")
  if "heterogeneous_vs_homogeneous" in st.figures and "average" not in st.merges:
    _fail("stability.figures", "'heterogeneous_vs_homogeneous' needs 'average' in "
          "stability.merges")


def stability_merges(cfg) -> dict[str, twins_lib.MergeFn]:
  """Merge functions of the study; DARE keys come from stability.seed."""
  key = jax.random.key(cfg.stability.seed)
  return {name: twins_lib.merge_fn(name, **({"key": key} if name.startswith("dare") else {}))
          for name in cfg.stability.merges}


def run_stability(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Originals of config.sweep's grid plus stability.num_twins twins (and a control) each,
  trained as one stack; at every K, each row's metrics and its distance to its original, and
  for each group size M and merge, the merged model's distance under every twin substitution.

  Row kinds: `expert` (role original | twin | control, perturbation j, sq_backbone, sq_full,
  loss_stab, loss_stab_max) and `merged_twin` (one per K x merge x M x group x member x twin).
  """
  validate(cfg)
  suite = get_suite(cfg)
  all_originals, configs, task_ids = build_grid(cfg, suite)
  T = len(task_ids)
  validate_stability(cfg, T)
  st = cfg.stability
  merges = stability_merges(cfg)
  arrays = suite.arrays()

  def make_wave(config_ids):
    originals = wave_experts(all_originals, config_ids, T)
    spec = twins_lib.make_twins(originals, arrays, m=st.num_twins, seed=st.seed,
                                control=st.control)
    group_sets = {M: config_groups(len(config_ids), T, M, st.num_groups) for M in st.group_sizes}
    return spec, functools.partial(_stability_rows, cfg, suite, originals, spec, group_sets,
                                   merges)

  ran = sweep_waves(cfg, workdir, suite, len(configs), T, make_wave)
  return summarize_stability(cfg, workdir, **(ran or {}))


def _stability_rows(cfg, suite, originals, spec, group_sets, merges, K, snap, ctx):
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
  rows = expert_rows(spec, suite, per_row, np.asarray(snap.diverged_at), K, ctx.common)
  for e, row in enumerate(rows):
    row.update(role=str(role[e]), origin=int(spec.origin[e]),
               perturbation=int(spec.replaced[e]))
  if st.constants:
    rows += constant_rows(ctx, spec, params_of(snap.params, originals.size), originals, K,
                          st.constants_samples, st.seed)
  merge_params = sharding_lib.on_one_device(snap.params) if group_sets else None
  for M, (groups, group_cfg, group_id) in group_sets.items():
    for name, fn in merges.items():
      out = twins_lib.merged_sq_distances(fn, ctx.backbone0, merge_params["backbone"],
                                          merge_params["head"], groups, spec)
      rows += merged_twin_rows(spec, suite, groups, group_cfg, group_id, out, sq, role, name,
                               K, ctx.common)
  return rows


def params_of(params, E: int):
  """The first E rows (the originals) of a stack, on one device."""
  return sharding_lib.on_one_device(jax.tree.map(lambda a: a[:E], params))


def _expert_constants(model, params, x, y, mask, num_classes, key):
  """(G_max, L, sigma2) of ONE expert on its samples (`theory.constants`)."""
  loss_fn = lambda p, xi, yi: models_lib.per_sample_loss(model, p, xi[None], yi[None],
                                                         num_classes)[0][0]
  gs = constants_lib.gradient_stats(loss_fn, params, x, y, mask)
  he = constants_lib.top_hessian_eigenvalue(loss_fn, params, x, y, key, mask, num_iters=20)
  return gs["G_max"], he["L"], gs["sigma2"]


def constant_rows(ctx, spec, params, originals, K, samples: int, seed: int) -> list[dict]:
  """Per original expert at K: G_max (largest per-sample gradient norm), L (top Hessian
  eigenvalue of its training loss, 20 power iterations) and sigma2, on the first `samples`
  positions of its training subset (`theory.constants`)."""
  S = min(samples, originals.subset.shape[1])
  t = originals.task[:, None]
  rows_S = originals.subset[:, :S]
  x, y = ctx.arrays.x_pool[t, rows_S], ctx.arrays.y_pool[t, rows_S]
  mask = (np.arange(S)[None] < originals.n[:, None]).astype(np.float32)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), K), originals.size)
  G, L, s2 = (np.asarray(v) for v in _per_row(_expert_constants, ctx.model, params, x, y, mask,
                                               jnp.asarray(originals.num_classes), keys))
  return [dict(ctx.common, kind="constants", expert=e, K=K, eta=float(originals.eta[e]),
               b=int(originals.b[e]), n=int(originals.n[e]),
               data_ratio=round(float(originals.data_ratio[e]), 6),
               task=ctx.suite.tasks[originals.task[e]].name, G_max=float(G[e]), L=float(L[e]),
               sigma2=float(s2[e])) for e in range(originals.size)]


def theory_comparison(df) -> dict[str, Any]:
  """Per original expert and K: measured eps^2 (mean over its twins) and gap against the
  non-convex bounds with G and L the largest estimates along its trajectory up to K."""
  ex = df[df.kind == "expert"]
  const = df[df.kind == "constants"].sort_values("K")
  const = const.assign(G=const.groupby("expert").G_max.cummax(),
                       L=const.groupby("expert").L.cummax())
  eps = ex[ex.role == "twin"].groupby(["origin", "K"]).sq_full.mean().rename("eps2")
  orig = ex[ex.role == "original"].set_index(["expert", "K"])[["gap", "train_loss"]]
  table = const.set_index(["expert", "K"])[["eta", "b", "n", "data_ratio", "G", "L"]].join(
      orig).join(eps.rename_axis(["expert", "K"])).reset_index()
  return {target: compare_lib.compare(table, L="L", G="G", target=target, convex=False)
          for target in ("eps2", "gap")}


def merged_twin_rows(spec, suite, groups, group_cfg, group_id, out, member_sq, role, algorithm,
                     K, common) -> list[dict]:
  rows = []
  M = groups.shape[1]
  for t, (g, r) in enumerate(zip(out["base"], out["row"])):
    i = int(spec.origin[r])
    rows.append(dict(common, kind="merged_twin", algorithm=algorithm, M=M, K=K,
                     group=int(group_id[g]), config=int(group_cfg[g]), eta=float(spec.eta[i]),
                     b=int(spec.b[i]), data_ratio=round(float(spec.data_ratio[i]), 6),
                     seed=int(spec.seed[i]), n=int(spec.n[i]),
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


def summarize_stability(cfg, workdir: str, **extra) -> dict[str, Any]:
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
    f = fit_lib.loglog_fit(cells[varying].to_numpy(float), cells["mean"].to_numpy())
    summary["eps2_exponents"] = {v: dict(slope=round(float(f.slope[k]), 3),
                                         ci=[round(float(c), 3) for c in f.ci_slope[k]])
                                 for k, v in enumerate(varying)}
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
        f = fit_lib.loglog_fit(means.index.to_numpy(float), means.to_numpy())
        summary["merged_eps2_slope_vs_M"][name] = dict(
            slope=round(float(f.slope[0]), 3), ci=[round(float(c), 3) for c in f.ci_slope[0]])
  if (df.kind == "constants").any():
    comp = theory_comparison(df)
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


FIGURES = {
    "stability_vs_hparams": plots.stability_vs_hparams,
    "merged_stability_vs_M": plots.merged_stability_vs_M,
    "merged_vs_members": plots.merged_vs_members,
    "heterogeneous_vs_homogeneous": plots.heterogeneous_vs_homogeneous,
}


# ---------------------------------------------------------------------------------------------
# Merge comparison: every algorithm on the same experts, groups and K snapshots.

DATA_MERGES = ("fisher", "regmean", "adamerging_task", "adamerging_layer", "greedy_soup")
COMPARE_MERGES = STABILITY_MERGES + DATA_MERGES + ("ensemble",)


@dataclasses.dataclass
class MergeData:
  """Per-row data of the data-dependent merges (rows of the twin-extended expert stack).

  Labelled: the first `samples` positions of each row's own training subset (so a twin's
  Fisher/Gram statistics see its replaced sample when j < samples). Unlabeled (AdaMerging) and
  test (ensemble): the task's test inputs. Held-out (greedy soup): the task's ghost pool.
  """
  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  mask_test: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  mask_val: np.ndarray

  @classmethod
  def build(cls, spec: experts_lib.Experts, arrays: tasks_lib.TaskArrays, samples: int):
    t = spec.task[:, None]
    pos = np.arange(min(samples, spec.subset.shape[1]))
    rows = spec.subset[:, pos]
    Q = arrays.x_test.shape[1]
    V = int(np.max(arrays.n_ghost))
    val_rows = arrays.n_train[spec.task][:, None] + np.arange(V)
    val_rows = np.minimum(val_rows, arrays.x_pool.shape[1] - 1)
    return cls(x=arrays.x_pool[t, rows], y=arrays.y_pool[t, rows],
               mask=(pos[None] < spec.n[:, None]).astype(np.float32),
               x_test=arrays.x_test[spec.task], y_test=arrays.y_test[spec.task],
               mask_test=(np.arange(Q)[None] < arrays.n_test[spec.task][:, None]).astype(
                   np.float32),
               x_val=arrays.x_pool[t, val_rows], y_val=arrays.y_pool[t, val_rows],
               mask_val=(np.arange(V)[None] < arrays.n_ghost[spec.task][:, None]).astype(
                   np.float32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _per_row(fn, model, *xs):
  """fn(model, *row) over the leading (row) axis of xs in batches of 8, so per-example
  intermediates stay bounded; `fn` is a module-level function, so this compiles once per
  shape, not once per milestone."""
  return jax.lax.map(lambda r: fn(model, *r), xs, batch_size=8)


def compare_merge_fns(cfg, model, params, spec, md: MergeData) -> dict[str, twins_lib.MergeFn]:
  """Every configured merge as `(x0, stack, groups, group_ids) -> merged` on the twin stack."""
  key = jax.random.key(cfg.stability.seed)
  nc = spec.num_classes
  needs = set(cfg.compare.merges)
  extra: dict[str, dict] = {}
  if "fisher" in needs:
    extra["fisher"] = dict(fishers=_per_row(merge_lib.diag_fisher, model, params, md.x, md.y,
                                            jnp.asarray(nc), md.mask))
  if "regmean" in needs:
    extra["regmean"] = dict(grams=_per_row(merge_lib.gram_matrices, model, params["backbone"],
                                           md.x, md.mask))
  for name in ("adamerging_task", "adamerging_layer"):
    extra[name] = dict(model=model, heads=params["head"], x=md.x_test, num_classes=nc, key=key,
                       mask=md.mask_test, steps=cfg.compare.adamerging_steps)
  extra["greedy_soup"] = dict(model=model, heads=params["head"], x=md.x_val, y=md.y_val,
                              num_classes=nc, mask=md.mask_val)
  for name in ("dare", "dare_average", "dare_task_arithmetic", "dare_ties"):
    extra[name] = dict(key=key)
  return {name: twins_lib.merge_fn(name, **extra.get(name, {}))
          for name in cfg.compare.merges if name != "ensemble"}


def ensemble_metrics(model, x0, params, groups, spec, md: MergeData) -> dict[str, np.ndarray]:
  """Test accuracy and loss [G] of each group's logit ensemble (mean over member tasks)."""
  logits = merge_lib.ensemble(x0, params["backbone"], groups, model=model, heads=params["head"],
                              x=md.x_test, num_classes=spec.num_classes)
  y = md.y_test[groups]                                       # [G, M, Q]
  m = md.mask_test[groups]
  logp = np.asarray(jax.nn.log_softmax(logits))
  loss = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  acc = np.argmax(logp, axis=-1) == y
  per = lambda v: ((v * m).sum(-1) / m.sum(-1)).mean(-1)
  return dict(test_acc=per(acc), test_loss=per(loss))


def run_compare(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Every merge in config.compare.merges on the same experts, groups and K snapshots: merged
  test accuracy/loss and gap (each member task with its own head), merged-model stability from
  the twins, and task-vector diagnostics per group. Row kinds: `merge_compare` (algorithm x
  config x group x K) and `diagnostics` (config x group x K)."""
  validate(cfg)
  suite = get_suite(cfg)
  originals, configs, task_ids = build_grid(cfg, suite)
  bad = [m for m in cfg.compare.merges if m not in COMPARE_MERGES]
  if bad or not cfg.compare.merges:
    _fail("compare.merges", f"unknown merge {bad[0] if bad else None!r}; allowed: "
          f"{', '.join(COMPARE_MERGES)}")
  st = cfg.stability
  T = len(task_ids)
  arrays = suite.arrays()

  def make_wave(config_ids):
    spec = twins_lib.make_twins(wave_experts(originals, config_ids, T), arrays, m=st.num_twins,
                                seed=st.seed, control=st.control)
    groups = config_groups(len(config_ids), T, cfg.sweep.group_size, cfg.sweep.num_groups)
    md = MergeData.build(spec, arrays, cfg.compare.samples)
    return spec, functools.partial(_compare_rows, cfg, suite, spec, groups, md)

  ran = sweep_waves(cfg, workdir, suite, len(configs), T, make_wave)
  return summarize_compare(cfg, workdir, **(ran or {}))


def _compare_rows(cfg, suite, spec, group_set, md, K, snap, ctx):
  """Rows of one wave of the compare study at milestone K."""
  st = cfg.stability
  groups, group_cfg, group_id = group_set
  is_twin = twins_lib.roles(spec) == "twin"
  # The per-row statistics and the merges read arbitrary rows: gather the stack once.
  params = sharding_lib.on_one_device(snap.params)
  member_sq = twins_lib.sq_distances(params, spec)
  fns = compare_merge_fns(cfg, ctx.model, params, spec, md)
  member_spec = spec.take(groups.reshape(-1))
  G, M = groups.shape
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
      rows.append(_compare_row(ctx, spec, suite, groups, g, group_cfg, group_id, name, K,
                               {k: float(v[g]) for k, v in ev.items()},
                               merged_eps2=float(out["backbone"][sel].mean()),
                               merged_eps2_full=float(out["full"][sel].mean()),
                               member_eps2=float(member_sq["backbone"][out["row"][sel]].mean())))
  if "ensemble" in cfg.compare.merges:
    ens = ensemble_metrics(ctx.model, ctx.backbone0, params, groups, spec, md)
    rows += [_compare_row(ctx, spec, suite, groups, g, group_cfg, group_id, "ensemble", K,
                          {k: float(v[g]) for k, v in ens.items()}) for g in range(G)]
  diag = merge_lib.diagnostics(ctx.backbone0, params["backbone"], groups,
                               key=jax.random.key(st.seed))
  cos = np.asarray(diag["cosine"])
  off = ~np.eye(M, dtype=bool)
  for g in range(G):
    rows.append(_compare_row(
        ctx, spec, suite, groups, g, group_cfg, group_id, None, K, {}, kind="diagnostics",
        tau_norm=float(np.mean(diag["tau_norm"][g])), cosine=float(cos[g][off].mean()),
        sign_conflict=float(diag["sign_conflict"][g]),
        ties_sign_conflict=float(diag["ties_sign_conflict"][g]),
        ties_sparsity=float(np.mean(diag["ties_sparsity"][g])),
        ties_merged_sparsity=float(diag["ties_merged_sparsity"][g]),
        dare_sparsity=float(np.mean(diag["dare_sparsity"][g]))))
  return rows


def _compare_row(ctx, spec, suite, groups, g, group_cfg, group_id, algorithm, K, metrics,
                 kind="merge_compare", **extra) -> dict:
  e0 = int(groups[g, 0])
  return dict(ctx.common, kind=kind, algorithm=algorithm, K=K, M=int(groups.shape[1]),
              group=int(group_id[g]), config=int(group_cfg[g]), eta=float(spec.eta[e0]),
              b=int(spec.b[e0]), data_ratio=round(float(spec.data_ratio[e0]), 6),
              seed=int(spec.seed[e0]),
              tasks=[suite.tasks[spec.task[e]].name for e in groups[g]], **metrics, **extra)


def summarize_compare(cfg, workdir: str, **extra) -> dict[str, Any]:
  """Per-algorithm table at every K (means over groups), CSV, figure and summary.json."""
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


STUDIES = {"main": run_main, "stability": run_stability, "compare": run_compare}


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Dispatches config.study to its library function, after checking the workdir."""
  if cfg.study not in STUDIES:
    _fail("study", f"unknown study {cfg.study!r}; allowed: {', '.join(STUDIES)}")
  results_lib.check_workdir(workdir, config_lib.to_dict(cfg))
  return STUDIES[cfg.study](cfg, workdir)
