"""Task, Suite and TaskArrays: the data types every suite builds and the pipeline consumes.

A `Suite` holds tasks that share one image shape. Each `Task` has three disjoint pools:
train (experts train on a `data_ratio` subset of it, see `splits`), test (generalization), and
ghost (replacement samples for stability twins). The suite also holds a pretraining set that is
disjoint from every task's pools at the level of source images. `Suite.arrays()` packs the tasks
into padded device-ready `TaskArrays`.

Legend: T tasks, P pool rows (train ++ ghost, padded), Q test rows (padded), H, W, C image dims.
"""
from __future__ import annotations

import dataclasses

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One classification task; images are float32 [N, H, W, C] in [0, 1], labels int32 [N]."""
  name: str
  num_classes: int
  x_train: Array
  y_train: Array
  x_test: Array
  y_test: Array
  x_ghost: Array
  y_ghost: Array

  @property
  def n_train(self) -> int:
    return len(self.y_train)


@dataclasses.dataclass(frozen=True, eq=False)
class Suite:
  """Tasks sharing one image shape, plus the pretraining set for the base backbone."""
  name: str
  seed: int
  tasks: tuple[Task, ...]
  x_pretrain: Array
  y_pretrain: Array
  pretrain_classes: int

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.tasks[0].x_train.shape[1:])

  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  @property
  def max_classes(self) -> int:
    return max([t.num_classes for t in self.tasks] + [self.pretrain_classes])

  def index(self, name: str) -> int:
    if name not in self.task_names:
      raise ValueError(f"task: unknown task {name!r} in suite {self.name!r}; "
                       f"allowed: {', '.join(self.task_names)}")
    return self.task_names.index(name)

  def arrays(self) -> "TaskArrays":
    """Stacks all tasks into padded device-ready arrays (see `TaskArrays`)."""
    return _pack(self)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskArrays:
  """Padded per-task arrays. Pool row r < n_train[t] is train sample r; the next n_ghost[t]
  rows are ghost samples. Padding rows are zeros and are never indexed by valid positions."""
  x_pool: Array      # [T, P, H, W, C] float32
  y_pool: Array      # [T, P] int32
  n_train: Array     # [T] int32
  n_ghost: Array     # [T] int32
  x_test: Array      # [T, Q, H, W, C] float32
  y_test: Array      # [T, Q] int32
  n_test: Array      # [T] int32
  num_classes: Array  # [T] int32


def _pack(suite: Suite) -> TaskArrays:
  T = len(suite.tasks)
  P = max(t.n_train + len(t.y_ghost) for t in suite.tasks)
  Q = max(len(t.y_test) for t in suite.tasks)
  shape = suite.image_shape
  x_pool = np.zeros((T, P) + shape, np.float32)
  y_pool = np.zeros((T, P), np.int32)
  x_test = np.zeros((T, Q) + shape, np.float32)
  y_test = np.zeros((T, Q), np.int32)
  for i, t in enumerate(suite.tasks):
    pool_x = np.concatenate([t.x_train, t.x_ghost])
    pool_y = np.concatenate([t.y_train, t.y_ghost])
    x_pool[i, :len(pool_y)] = pool_x
    y_pool[i, :len(pool_y)] = pool_y
    x_test[i, :len(t.y_test)] = t.x_test
    y_test[i, :len(t.y_test)] = t.y_test
  return TaskArrays(
      x_pool=x_pool, y_pool=y_pool,
      n_train=np.array([t.n_train for t in suite.tasks], np.int32),
      n_ghost=np.array([len(t.y_ghost) for t in suite.tasks], np.int32),
      x_test=x_test, y_test=y_test,
      n_test=np.array([len(t.y_test) for t in suite.tasks], np.int32),
      num_classes=np.array([t.num_classes for t in suite.tasks], np.int32))
