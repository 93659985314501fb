"""How a task's rows are divided: train / test / ghost pools, and each expert's train subset.

`split_task` shuffles one labelled set with a key of its own and cuts it into disjoint test,
ghost and train pools (a `Task`); `subset_indices` picks an expert's `data_ratio` subset of the
train pool, nested across ratios. Every draw is keyed by (seed, task key), never the global RNG.
"""
from __future__ import annotations

import numpy as np

from stability.data import tasks as tasks_lib

Array = np.ndarray


def split_task(name: str, x: Array, y: Array, num_classes: int, seed: int, key: int,
               test_frac: float, ghost_frac: float) -> tasks_lib.Task:
  """Shuffles deterministically and splits into disjoint test / ghost / train pools.

  The first round(test_frac * N) shuffled rows are the test pool, the next
  max(1, round(ghost_frac * N)) the ghost pool, the rest the train pool.
  """
  perm = np.random.default_rng([seed, key, 0x7A5C]).permutation(len(y))
  x, y = x[perm], y[perm]
  n_test = int(round(test_frac * len(y)))
  n_ghost = max(1, int(round(ghost_frac * len(y))))
  s0, s1 = n_test, n_test + n_ghost
  return tasks_lib.Task(name=name, num_classes=int(num_classes),
                        x_test=x[:s0], y_test=y[:s0], x_ghost=x[s0:s1], y_ghost=y[s0:s1],
                        x_train=x[s1:], y_train=y[s1:])


def subset_size(n_train: int, data_ratio: float) -> int:
  """n_i = floor(data_ratio * n_train), at least 1."""
  if not 0.0 < data_ratio <= 1.0:
    raise ValueError(f"data_ratio: {data_ratio} is outside (0, 1]")
  return max(1, int(np.floor(data_ratio * n_train + 1e-9)))


def subset_indices(n_train: int, data_ratio: float, seed: int, task_index: int = 0) -> Array:
  """Deterministic random subset of train-pool rows for (task, seed); nested across ratios."""
  rng = np.random.default_rng([seed, task_index, 0x5EB5E7])
  return rng.permutation(n_train)[:subset_size(n_train, data_ratio)].astype(np.int32)
