"""The shared driver: waves, checkpoints, the results store, progress, and the plan.

A study hands the driver `make_wave(config_ids) -> (experts, rows_at)`; the driver trains the
sweep wave by wave (`stability.planner`: whole configs per wave, sized to device memory) and, at
every milestone K, stores `rows_at(K, snapshot, ctx)` as one unit of work (`wave=w/K=k`) in the
SQLite store. Checkpoints of the expert stack are saved at chunk boundaries after the rows of
every milestone up to that step are stored, so a resumed run restores the latest checkpoint the
store agrees with and recomputes nothing it has. Finished waves drop their checkpoints.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from stability import checkpoint as checkpoint_lib
from stability import config as config_lib
from stability import experts as experts_lib
from stability import planner
from stability import results as results_lib
from stability import sharding as sharding_lib
from stability import train as train_lib
from stability.studies import common

log = logging.getLogger(__name__)

# Row fields holding an expert row or a config index: offset per wave so ids are sweep-global.
_EXPERT_IDS, _CONFIG_IDS = ("expert", "origin", "twin"), ("config",)

Layout = Callable[[ml_collections.ConfigDict, int, int], tuple[int, int]]
MakeWave = Callable[[np.ndarray], tuple[experts_lib.Experts, Callable]]


def make_plan(cfg: ml_collections.ConfigDict, suite, num_configs: int, T: int,
              layout: Layout, b_max: int | None = None) -> planner.Plan:
  """The wave plan on this machine's devices; `layout(cfg, C, T)` is the study's (expert rows
  per config, merge groups in all); b_max defaults to the sweep's largest batch size."""
  per_config, groups = layout(cfg, num_configs, T)
  return planner.plan(common.model_of(cfg, suite), cfg.optim.name, suite.image_shape,
                      configs=num_configs, experts_per_config=per_config,
                      b_max=int(b_max or max(cfg.sweep.batch_size)),
                      milestones=[int(k) for k in cfg.sweep.milestones], groups=groups,
                      memory_gb=cfg.train.memory_gb, max_wave=cfg.train.max_wave)


def describe(cfg: ml_collections.ConfigDict, layout: Layout) -> str:
  """The plan (experts, waves, snapshots, groups, memory, compute) without computing anything;
  a paper20 suite whose data is missing is planned from the datasets' nominal shapes."""
  suite, missing = common.suite_or_nominal(cfg)
  num_configs = len(common.grid_configs(cfg))
  T = len(common.resolve_tasks(suite, cfg.data.tasks))
  text = f"study         {cfg.study}\n" + make_plan(cfg, suite, num_configs, T, layout).describe()
  if missing:
    text += f"\ndata          NOT READY (planned from nominal dataset shapes): {missing}"
  return text


def _units(milestones, wave: int) -> list[str]:
  return [f"wave={wave}/K={k}" for k in milestones]


def _done(store: results_lib.Store | None, units: list[str]) -> np.ndarray:
  """Which units the store holds, as process 0 sees it, on every process."""
  done = np.array([store.done(u) for u in units] if store is not None else [False] * len(units))
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done.astype(bool)


def sweep_waves(cfg: ml_collections.ConfigDict, workdir: str, suite, num_configs: int, T: int,
                layout: Layout, make_wave: MakeWave, *, b_max: int | None = None
                ) -> dict[str, Any] | None:
  """Trains the sweep wave by wave, storing each wave's rows at every milestone.

  `make_wave(config_ids)` returns the wave's expert specs and `rows_at(K, snapshot, ctx)`, whose
  rows use wave-local expert rows and config indices (offset here to sweep-global ones). Returns
  timing info, or None when every unit was already done.
  """
  t_start = time.time()
  milestones = [int(k) for k in cfg.sweep.milestones]
  is_writer = jax.process_index() == 0
  the_plan = make_plan(cfg, suite, num_configs, T, layout, b_max)
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
  ctx = common.make_context(cfg, suite)
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
