"""Which datasets there are: `DatasetSpec` (where one task's data lives, per loader kind) and
the paper's 20 tasks (`PAPER20`). Pure data: no file is read here.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where one task's dataset lives under a data root, for every loader kind."""
  name: str                   # task name; on-disk stem under the data root
  title: str = ""             # as the paper names it
  tfds: str | None = None     # TFDS name under <root>/tfds (None: not in the TFDS catalog)
  hf: str | None = None       # a Hugging Face Hub id that has it (a hint: data is read locally)
  image_column: str | None = None  # HF image column (None: image, img or pixel_values)
  label_column: str | None = None  # HF label column (None: label, labels, fine_label or target)
  classes: int = 0            # nominal class count (for planning before the data is there)
  n_train: int = 0            # nominal train-split size (same)


# The paper's 20 tasks (PAPER.md); the 8-task set is the first eight.
PAPER20: tuple[DatasetSpec, ...] = (
    DatasetSpec("sun397", "SUN397", "sun397", "tanganke/sun397", classes=397, n_train=19850),
    DatasetSpec("stanford_cars", "Stanford Cars", "cars196", "tanganke/stanford_cars",
                classes=196, n_train=8144),
    DatasetSpec("resisc45", "RESISC45", "resisc45", "tanganke/resisc45", classes=45, n_train=18900),
    DatasetSpec("eurosat", "EuroSAT", "eurosat/rgb", "tanganke/eurosat", classes=10, n_train=21600),
    DatasetSpec("svhn", "SVHN", "svhn_cropped", "ufldl-stanford/svhn", classes=10, n_train=73257),
    DatasetSpec("gtsrb", "GTSRB", None, "tanganke/gtsrb", classes=43, n_train=26640),
    DatasetSpec("mnist", "MNIST", "mnist", "ylecun/mnist", classes=10, n_train=60000),
    DatasetSpec("dtd", "DTD", "dtd", "tanganke/dtd", classes=47, n_train=3760),
    DatasetSpec("flowers102", "Flowers102", "oxford_flowers102",
                "dpdl-benchmark/oxford_flowers102", classes=102, n_train=1020),
    DatasetSpec("pcam", "PCam", "patch_camelyon", "1aurent/PatchCamelyon",
                classes=2, n_train=262144),
    DatasetSpec("fer2013", "FER2013", None, None, classes=7, n_train=28709),
    DatasetSpec("oxford_iiit_pet", "Oxford-IIIT Pet", "oxford_iiit_pet", "timm/oxford-iiit-pet",
                classes=37, n_train=3680),
    DatasetSpec("stl10", "STL10", "stl10", "tanganke/stl10", classes=10, n_train=5000),
    DatasetSpec("cifar100", "CIFAR100", "cifar100", "tanganke/cifar100",
                classes=100, n_train=50000),
    DatasetSpec("cifar10", "CIFAR10", "cifar10", "tanganke/cifar10", classes=10, n_train=50000),
    DatasetSpec("food101", "Food101", "food101", "ethz/food101", classes=101, n_train=75750),
    DatasetSpec("fashion_mnist", "Fashion-MNIST", "fashion_mnist",
                "zalando-datasets/fashion_mnist", classes=10, n_train=60000),
    DatasetSpec("emnist_letters", "EMNIST-letters", "emnist/letters", "tanganke/emnist_letters",
                classes=26, n_train=124800),
    DatasetSpec("kmnist", "KMNIST", "kmnist", "tanganke/kmnist", classes=10, n_train=60000),
    DatasetSpec("rendered_sst2", "Rendered-SST2", None, "nateraw/rendered-sst2",
                classes=2, n_train=6920),
)
PAPER20_NAMES: tuple[str, ...] = tuple(s.name for s in PAPER20)


def dataset_spec(name: str) -> DatasetSpec:
  """The PAPER20 spec named `name`; any other name: a spec whose TFDS name is `name`."""
  for s in PAPER20:
    if s.name == name:
      return s
  return DatasetSpec(name, name, tfds=name)


def parse_task_names(tasks: Sequence[str] | str | None) -> tuple[str, ...]:
  """Task names from a sequence or a comma-separated string; None: the paper's 20."""
  if tasks is None:
    return PAPER20_NAMES
  if isinstance(tasks, str):
    tasks = [t for t in tasks.split(",") if t]
  return tuple(tasks)
