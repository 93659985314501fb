"""Suites from datasets on disk: the `disk` suite (every dataset under a data root, or the named
ones) and the `paper20` suite (the paper's 20 tasks, `catalog.PAPER20`).

`build_task` turns one dataset's loaded splits into a `Task`: a ghost pool (and, without a test
split, a test pool) is held out of train by `splits.split_task`, after `holdout_frac` of train is
held out for pretraining. `disk_suite` adds the suite options: image size and channels,
normalisation, keyed augmentation copies, the pretraining set, row limits and the cache.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Sequence

import numpy as np

from stability.data import catalog
from stability.data import roots
from stability.data import sources
from stability.data import splits as splits_lib
from stability.data import tasks as tasks_lib
from stability.data import transforms


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


def build_task(name: str, splits: dict[str, sources.Split], *, seed: int, test_frac: float = 0.2,
               ghost_frac: float = 0.05, holdout_frac: float = 0.0
               ) -> tuple[tasks_lib.Task, sources.Split | None]:
  """Task from loaded splits: ghost (and, without a test split, test) rows are held out of
  train by `splits.split_task`; `holdout_frac` of train is held out first (pretraining rows)."""
  if "train" not in splits:
    _fail("splits", f"{name} has no train split")
  train, test = splits["train"], splits.get("test")
  classes = train.classes
  key = zlib.crc32(name.encode())  # stable per task, whichever other tasks are in the suite
  x, y, held = train.x, train.y, None
  if holdout_frac > 0:
    perm = np.random.default_rng([seed, key, 0x9E7]).permutation(len(y))
    k = max(1, int(round(holdout_frac * len(y))))
    held = sources.Split(x[perm[:k]], y[perm[:k]], classes)
    x, y = x[perm[k:]], y[perm[k:]]
  task = splits_lib.split_task(name, x, y, len(classes), seed, key,
                                0.0 if test is not None else test_frac, ghost_frac)
  if test is not None:
    task = dataclasses.replace(task, x_test=test.x, y_test=test.y)
  if task.n_train < 1 or len(task.y_test) < 1:
    _fail("data", f"task {name!r} has {task.n_train} train and {len(task.y_test)} test rows "
          f"after holding out ghost/test/pretraining rows from {len(train.y)}; it needs >= 1 each")
  return task, held


def _normalization(normalize_opt, channels: int | None):
  if normalize_opt is None or isinstance(normalize_opt, str) and normalize_opt == "task":
    return normalize_opt
  if normalize_opt == "imagenet":
    if channels != 3:
      _fail("normalize", "'imagenet' needs channels=3")
    return (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  if isinstance(normalize_opt, (tuple, list)) and len(normalize_opt) == 2:
    mean, std = (tuple(float(v) for v in a) for a in normalize_opt)
    if len(mean) != len(std) or not all(s > 0 for s in std):
      _fail("normalize", "(mean, std) need one value each per channel and std > 0")
    return (mean, std)
  _fail("normalize", f"{normalize_opt!r}; allowed: None, 'imagenet', 'task' or (mean, std)")


def _normalize_task(task: tasks_lib.Task, stats) -> tasks_lib.Task:
  mean, std = stats
  return dataclasses.replace(task, x_train=transforms.normalize(task.x_train, mean, std),
                             x_ghost=transforms.normalize(task.x_ghost, mean, std),
                             x_test=transforms.normalize(task.x_test, mean, std))


def disk_suite(seed: int = 0, *, data_root: str | None = None,
               tasks: Sequence[str] | str | None = None, name: str = "disk",
               image_size: int | None = 32, channels: int | None = 3, center_crop: bool = True,
               normalize: Any = None, augment_copies: int = 0, augment_pad: int = 4,
               test_frac: float = 0.2, ghost_frac: float = 0.05, pretrain: str = "holdout",
               pretrain_frac: float = 0.1, max_train: int | None = None,
               max_test: int | None = None, cache_dir: str | None = None) -> tasks_lib.Suite:
  """A Suite from datasets under `data_root` (`tasks`: names; None: every dataset found there).

  Pretraining set: pretrain="holdout" holds out `pretrain_frac` of every task's train split
  (labels are each task's own classes); any other value names a dataset under the root whose
  train split is the pretraining set. `augment_copies` appends that many keyed random-crop +
  flip views of every training row (never of ghost or test rows). `normalize`: None (pixels in
  [0, 1]), 'imagenet', 'task' (each task's train statistics) or (mean, std).
  """
  if not data_root:
    _fail("data_root", "a suite read from disk needs a data root (the directory that holds "
          "<task>/train/<class>/, <task>.npz, hf/<task>/ or tfds/<name>/)")
  data_root = os.path.abspath(os.path.expanduser(data_root))
  prep = transforms.Preprocess(image_size, channels, center_crop)
  stats_opt = _normalization(normalize, channels)
  if not 0.0 <= test_frac < 1.0:
    _fail("test_frac", f"{test_frac} is outside [0, 1)")
  if not 0.0 < ghost_frac < 1.0:
    _fail("ghost_frac", f"{ghost_frac} is outside (0, 1)")
  if pretrain == "holdout" and not 0.0 < pretrain_frac < 1.0:
    _fail("pretrain_frac", f"{pretrain_frac} is outside (0, 1)")
  if int(augment_copies) < 0 or int(augment_pad) < 0:
    _fail("augment_copies", "augment_copies and augment_pad must be >= 0")
  for field, v in (("max_train", max_train), ("max_test", max_test)):
    if v is not None and int(v) < 1:
      _fail(field, f"{v} must be >= 1 or None")
  names = (tuple(n for n in roots.discover(data_root) if n != pretrain) if tasks is None
           else catalog.parse_task_names(tasks))
  if not names:
    _fail("tasks", f"no datasets under {data_root}")
  if len(set(names)) != len(names):
    _fail("tasks", f"duplicate task names in {list(names)}")
  wanted = names + (() if pretrain == "holdout" else (pretrain,))
  if roots.find_missing(data_root, wanted):
    _fail("data_root", roots.describe_missing(data_root, wanted))
  limits = dict(max_train=max_train, max_test=max_test, seed=seed, cache_dir=cache_dir)
  built, held = [], []
  for t in names:
    splits = roots.read_dataset(data_root, t, prep, **limits)
    task, h = build_task(t, splits, seed=seed, test_frac=test_frac, ghost_frac=ghost_frac,
                         holdout_frac=pretrain_frac if pretrain == "holdout" else 0.0)
    stats = transforms.channel_stats(task.x_train) if stats_opt == "task" else stats_opt
    if augment_copies:
      keys = np.random.default_rng([seed, zlib.crc32(t.encode()), 0xA06]).integers(
          0, 2**31, int(augment_copies))
      views = [transforms.augment(task.x_train, int(k), pad=int(augment_pad)) for k in keys]
      task = dataclasses.replace(task, x_train=np.concatenate([task.x_train] + views),
                                 y_train=np.tile(task.y_train, int(augment_copies) + 1))
    if stats is not None:
      task = _normalize_task(task, stats)
      h = h if h is None else sources.Split(transforms.normalize(h.x, *stats), h.y, h.classes)
    built.append(task)
    held.append(h)
  if pretrain == "holdout":
    x_pre = np.concatenate([h.x for h in held])
    y_pre = np.concatenate([h.y for h in held]).astype(np.int32)
    pretrain_classes = max(t.num_classes for t in built)
  else:
    p = roots.read_dataset(data_root, pretrain, prep, **limits)["train"]
    stats = transforms.channel_stats(p.x) if stats_opt == "task" else stats_opt
    x_pre = p.x if stats is None else transforms.normalize(p.x, *stats)
    y_pre, pretrain_classes = p.y, len(p.classes)
  shapes = {t.name: t.x_train.shape[1:] for t in built}
  if len(set(shapes.values()) | {x_pre.shape[1:]}) > 1:
    _fail("image_size", f"tasks have different image shapes {shapes} (pretraining "
          f"{x_pre.shape[1:]}); set image_size and channels")
  return tasks_lib.Suite(name=name, seed=seed, tasks=tuple(built), x_pretrain=x_pre,
                         y_pretrain=y_pre, pretrain_classes=int(pretrain_classes))


def paper20_suite(seed: int = 0, *, data_root: str | None = None,
                  tasks: Sequence[str] | str | None = None, **options) -> tasks_lib.Suite:
  """The paper's 20 vision tasks (`PAPER20`; `tasks` picks a subset) read from `data_root`."""
  names = catalog.parse_task_names(tasks)
  unknown = [t for t in names if t not in catalog.PAPER20_NAMES]
  if unknown:
    _fail("tasks", f"unknown paper task(s) {', '.join(map(repr, unknown))}; allowed: "
          f"{', '.join(catalog.PAPER20_NAMES)}")
  return disk_suite(seed, data_root=data_root, tasks=names, name="paper20", **options)
