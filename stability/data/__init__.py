"""Data for the pipeline: named suites of vision classification tasks, offline and deterministic.

`get_suite(name, seed, **options)` returns a `Suite`: tasks sharing one image shape, each with
disjoint train / test / ghost pools, plus a pretraining set; `Suite.arrays()` packs it into
padded device-ready `TaskArrays`. Every draw is keyed by the seed, never the global RNG.

The flow, and the module that owns each step (imports only point down this list):

  suites      the registry (`get_suite` with its cache, `register_suite`, `suite_names`) and the
              embedded suites built from data inside PyPI wheels: default, mnist28, tiny; it
              registers paper20 and disk from `disk`.
  disk        datasets on disk -> `Task`s -> a `Suite`: `build_task`, `disk_suite`,
              `paper20_suite` (normalisation, augmentation copies, pretraining set options).
  roots       a data root: `locations` / `locate` / `discover` / `find_missing` /
              `describe_missing`, and `read_dataset` with its preprocessed-array cache.
  sources     readers, one dataset -> {"train": Split[, "test": Split]}: `load_npz`,
              `load_arrays`, `load_image_folder`, `load_tfds`, `load_hf` and `load` (by kind).
  catalog     which datasets there are: `DatasetSpec` and the paper's 20 tasks, `PAPER20`.
  transforms  pixels: `Preprocess` / `preprocess` / `resize` (PIL) and `resize_bilinear` (numpy),
              `normalize`, `channel_stats`, `augment`, and the [N, H, W] transforms of the
              embedded suites (`pool2`, `pixel_permutation`, `IMAGE_TRANSFORMS`, ...).
  splits      rows: `split_task` (train / test / ghost pools) and `subset_indices` /
              `subset_size` (an expert's `data_ratio` subset of the train pool).
  tasks       the types: `Task`, `Suite`, `TaskArrays` (and the packing behind `arrays()`).

So a suite flows sources -> transforms -> splits -> tasks, and `suites` names it.

To add a data source (a new on-disk layout): write `load_<kind>(path, prep, *, max_train,
max_test, seed) -> {"train": Split[, "test": Split]}` in `sources` (images through
`transforms.preprocess`), add the kind to `sources.KINDS` and `sources.load`, then teach
`roots.locations` / `roots._present` where it lives under a data root; `disk_suite` then reads it.

To add a suite: in `suites` (or any module that imports this package), decorate a factory
`fn(seed: int = 0, **options) -> Suite` with `@register_suite("name")`; build each task with
`splits.split_task` (so its pools are disjoint and keyed) and give the suite a pretraining set no
task pool shares images with. `get_suite("name", seed, **options)` then builds and caches it.
"""
from stability.data.catalog import PAPER20, PAPER20_NAMES, DatasetSpec
from stability.data.disk import build_task, disk_suite, paper20_suite
from stability.data.roots import (describe_missing, discover, find_missing, locate, locations,
                                  read_dataset)
from stability.data.sources import (IMAGE_EXTENSIONS, KINDS, TEST_SPLITS, Split, load,
                                    load_arrays, load_hf, load_image_folder, load_npz, load_tfds)
from stability.data.splits import split_task, subset_indices, subset_size
from stability.data.suites import (DEFAULT_TASKS, MNIST28_TASKS, default_suite, get_suite,
                                   mnist28_suite, register_suite, suite_names, tiny_suite)
from stability.data.tasks import Suite, Task, TaskArrays
from stability.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Preprocess, augment,
                                       channel_stats, normalize, preprocess, resize,
                                       resize_bilinear)

__all__ = [
    "DEFAULT_TASKS", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "KINDS",
    "MNIST28_TASKS", "PAPER20", "PAPER20_NAMES", "TEST_SPLITS", "DatasetSpec", "Preprocess",
    "Split", "Suite", "Task", "TaskArrays", "augment", "build_task", "channel_stats",
    "default_suite", "describe_missing", "discover", "disk_suite", "find_missing", "get_suite",
    "load", "load_arrays", "load_hf", "load_image_folder", "load_npz", "load_tfds", "locate",
    "locations", "mnist28_suite", "normalize", "paper20_suite", "preprocess", "read_dataset",
    "register_suite", "resize", "resize_bilinear", "split_task", "subset_indices",
    "subset_size", "suite_names", "tiny_suite",
]
