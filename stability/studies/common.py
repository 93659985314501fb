"""What every study shares: the suite, the grid of expert configs, merge groups, the model and
its pretrained base, the checks every study runs before compute, and the per-expert rows.

A study config has the sections `data`, `model`, `pretrain`, `optim`, `sweep`, `train`,
`output` (`experiments/common.py` builds them). `sweep` is a grid of (eta, b, data_ratio, seed)
configs; each config trains one expert per task, config-major: expert row of (config c, task
position t) is c * T + t.

Legend: C configs, T tasks per config, G groups, M members per group, K milestone (steps).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any

import ml_collections
import numpy as np

from stability import config as config_lib
from stability import data as data_lib
from stability import evaluate as evaluate_lib
from stability import experts as experts_lib
from stability import models as models_lib
from stability import pretrain as pretrain_lib
from stability import train as train_lib


def fail(field: str, allowed: str):
  """Raises the one-line error every check uses: `field: what is allowed (got what)`."""
  raise ValueError(f"{field}: {allowed}")


def get_suite(cfg: ml_collections.ConfigDict) -> data_lib.Suite:
  """The configured task suite (`data.suite` built with `data.options`)."""
  return data_lib.get_suite(cfg.data.suite, cfg.seed, **cfg.data.options.to_dict())


@dataclasses.dataclass(frozen=True)
class NominalTask:
  name: str
  num_classes: int


@dataclasses.dataclass(frozen=True)
class NominalSuite:
  """The shape facts the planner needs, from the paper-20 table instead of the data."""
  tasks: tuple
  image_shape: tuple
  max_classes: int

  def index(self, name: str) -> int:
    names = [t.name for t in self.tasks]
    if name not in names:
      fail("task", f"unknown task {name!r}; allowed: {', '.join(names)}")
    return names.index(name)


def suite_or_nominal(cfg: ml_collections.ConfigDict) -> tuple[Any, str | None]:
  """(suite, None), or for a paper20 suite whose data is missing (nominal suite, what is
  missing and where it was looked for): a plan needs only the tasks' shapes."""
  try:
    return get_suite(cfg), None
  except ValueError as e:
    if not str(e).startswith("data_root:") or cfg.data.suite != "paper20":
      raise
    missing = str(e)[len("data_root: "):]
  opts = cfg.data.options.to_dict()
  specs = [sp for sp in data_lib.PAPER20 if not cfg.data.tasks or sp.name in cfg.data.tasks]
  size, channels = opts.get("image_size", 32), opts.get("channels", 3) or 3
  return NominalSuite(tasks=tuple(NominalTask(sp.name, sp.classes) for sp in specs),
                      image_shape=(size, size, channels),
                      max_classes=max(sp.classes for sp in specs)), missing


def resolve_tasks(suite, names) -> list[int]:
  """Task indices for config.data.tasks (empty: every task of the suite)."""
  return [suite.index(n) for n in names] if names else list(range(len(suite.tasks)))


def make_groups(num_tasks: int, M: int, G: int, seed0: int = 0) -> np.ndarray:
  """[G, M] task positions; group g draws M distinct tasks with seed seed0 + g."""
  if M < 1 or M > num_tasks:
    fail("sweep.group_size", f"must lie in [1, {num_tasks}] (the number of tasks); got {M}")
  if G < 1:
    fail("sweep.num_groups", f"must be >= 1; got {G}")
  return np.stack([np.sort(np.random.default_rng(seed0 + g).choice(num_tasks, M, replace=False))
                   for g in range(G)]).astype(np.int32)


def config_groups(num_configs: int, T: int, M: int, G: int):
  """Groups of expert rows for every config: the same G task groups (seeds 0..G-1) per config.

  Returns groups [C*G, M] of expert rows, the config of each group [C*G] and its group id [C*G].
  """
  group_pos = make_groups(T, M, G)
  groups = np.concatenate([c * T + group_pos for c in range(num_configs)])
  return (groups, np.repeat(np.arange(num_configs), G), np.tile(np.arange(G), num_configs))


def check_sweep(cfg: ml_collections.ConfigDict) -> None:
  """The sweep grid's fields, alone (no suite needed)."""
  sw = cfg.sweep
  for field in ("lr", "batch_size", "data_ratio", "seeds"):
    if len(sw[field]) == 0:
      fail(f"sweep.{field}", "needs at least one value")
  if any(not (np.isfinite(v) and v > 0) for v in sw.lr):
    fail("sweep.lr", f"learning rates must be finite and > 0; got {tuple(sw.lr)}")
  if any(not 0 < r <= 1 for r in sw.data_ratio):
    fail("sweep.data_ratio", f"must lie in (0, 1]; got {tuple(sw.data_ratio)}")
  if any(v < 1 for v in sw.batch_size):
    fail("sweep.batch_size", f"must be >= 1; got {tuple(sw.batch_size)}")
  train_lib.check_milestones(sw.milestones)


def grid_configs(cfg: ml_collections.ConfigDict) -> list[tuple]:
  """The (eta, b, data_ratio, seed) configs of the sweep, in row order."""
  sw = cfg.sweep
  return list(itertools.product(sw.lr, sw.batch_size, sw.data_ratio, sw.seeds))


def build_grid(cfg: ml_collections.ConfigDict, suite: data_lib.Suite):
  """Expert specs for config.sweep's grid, the list of configs and the task indices."""
  task_ids = resolve_tasks(suite, cfg.data.tasks)
  check_sweep(cfg)
  configs = grid_configs(cfg)
  rows = [(c, t) for c in configs for t in task_ids]
  spec = experts_lib.make_experts(
      suite, task=[t for _, t in rows], eta=[c[0] for c, _ in rows],
      b=[c[1] for c, _ in rows], K=[cfg.sweep.milestones[-1]] * len(rows),
      data_ratio=[c[2] for c, _ in rows], seed=[c[3] for c, _ in rows],
      momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
  return spec, configs, task_ids


def check_fields(cfg: ml_collections.ConfigDict) -> None:
  """Every check of the shared sections that needs neither data nor compute."""
  if cfg.data.suite not in data_lib.suite_names():
    fail("data.suite", f"unknown suite {cfg.data.suite!r}; allowed: "
         f"{', '.join(data_lib.suite_names())}")
  if cfg.model.name not in models_lib.model_names():
    fail("model.name", f"unknown model {cfg.model.name!r}; allowed: "
         f"{', '.join(models_lib.model_names())}")
  train_lib.get_optimizer(cfg.optim.name)
  if cfg.pretrain.optimizer not in train_lib.OPTIMIZERS:
    fail("pretrain.optimizer", f"unknown optimizer {cfg.pretrain.optimizer!r}; allowed: "
         f"{', '.join(train_lib.OPTIMIZERS)}")
  train_lib.check_milestones(cfg.sweep.milestones)
  tr = cfg.train
  if tr.max_chunk < 1:
    fail("train.max_chunk", f"must be >= 1 step; got {tr.max_chunk}")
  if tr.checkpoint_every < 0:
    fail("train.checkpoint_every", f"must be >= 0 steps (0 = no checkpoints); got "
         f"{tr.checkpoint_every}")
  if not tr.memory_gb >= 0:  # also NaN
    fail("train.memory_gb", f"must be >= 0 (0 = detect); got {tr.memory_gb}")


def check_shared(cfg: ml_collections.ConfigDict) -> int:
  """Every shared check (fields, suite, tasks, grid; the grid's experts against the real data
  when it is there); returns T, the number of tasks per config."""
  check_fields(cfg)
  suite, missing = suite_or_nominal(cfg)
  T = len(resolve_tasks(suite, cfg.data.tasks))
  if missing is None:
    build_grid(cfg, suite)  # b <= n_i and the other per-expert checks of `make_experts`
  else:
    check_sweep(cfg)
  return T


def model_of(cfg: ml_collections.ConfigDict, suite) -> models_lib.Model:
  return models_lib.get_model(cfg.model.name, suite.max_classes, **cfg.model.kwargs.to_dict())


def base_backbone(cfg: ml_collections.ConfigDict, suite, model):
  """The pretrained base x_0 (cached under output.cache_dir, or trained once per run)."""
  p = cfg.pretrain
  return pretrain_lib.get_pretrained(
      model, suite, {"name": cfg.model.name, **cfg.model.kwargs.to_dict(),
                     **({"suite_options": cfg.data.options.to_dict()} if cfg.data.options
                        else {})},
      os.path.expanduser(cfg.output.cache_dir) if cfg.output.cache_dir else None,
      steps=p.steps, batch_size=p.batch_size, eta=p.lr, momentum=p.momentum,
      weight_decay=p.weight_decay, optimizer=p.optimizer, seed=cfg.seed)


@dataclasses.dataclass
class Context:
  """What a study's per-milestone function needs besides the snapshot."""
  suite: data_lib.Suite
  model: models_lib.Model
  backbone0: Any
  arrays: data_lib.TaskArrays
  data: evaluate_lib.EvalData
  common: dict


def make_context(cfg: ml_collections.ConfigDict, suite: data_lib.Suite) -> Context:
  """The model, the pretrained base (cached or trained once per run) and the suite's arrays."""
  model = model_of(cfg, suite)
  arrays = suite.arrays()
  return Context(suite=suite, model=model, backbone0=base_backbone(cfg, suite, model),
                 arrays=arrays, data=evaluate_lib.EvalData.from_arrays(arrays),
                 common=dict(study=cfg.study, config_hash=config_lib.config_hash(cfg),
                             suite=suite.name, model=cfg.model.name))


def wave_experts(experts: experts_lib.Experts, config_ids: np.ndarray, T: int
                 ) -> experts_lib.Experts:
  """The expert rows (config-major, T tasks per config) of the given configs."""
  return experts.take((np.asarray(config_ids)[:, None] * T + np.arange(T)).reshape(-1))


def hparams_of(spec: experts_lib.Experts, e: int) -> dict:
  """The (eta, b, data_ratio, seed) columns of expert row e, as every row kind stores them."""
  return dict(eta=float(spec.eta[e]), b=int(spec.b[e]),
              data_ratio=round(float(spec.data_ratio[e]), 6), seed=int(spec.seed[e]))


def expert_rows(spec, suite, m, diverged_at, K, common) -> list[dict]:
  """One `expert` row per expert at milestone K, with its metrics m[name][E]."""
  rows = []
  for e in range(spec.size):
    rows.append(dict(common, kind="expert", expert=e, task=suite.tasks[spec.task[e]].name,
                     **hparams_of(spec, e), n=int(spec.n[e]), K=K,
                     diverged_at=int(diverged_at[e]), **{k: float(v[e]) for k, v in m.items()}))
  return rows
