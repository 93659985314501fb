"""Helpers shared by the data tests, as fixtures (tests/ is not a package: with
--import-mode=importlib a test file cannot import another)."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image


def _write_folder(root, splits):
  """root/<split>/<class>/<i>.png from {split: {class: uint8 [n, H, W(, C)]}}."""
  for split, classes in splits.items():
    for c, ims in classes.items():
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i, im in enumerate(ims):
        Image.fromarray(im).save(os.path.join(d, f"{i:03d}.png"))


def _class_images(seed, classes, n, size=8):
  """Images with a class-dependent mean, so a model can learn them."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, c in enumerate(classes):
    base = np.full((n, size, size, 3), 40 + 80 * k, np.int64)
    out[c] = np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
  return out


def _make_root(tmp_path):
  """Two 3-class image-folder tasks (16 train and 4 test images a class) under tmp_path."""
  for k, name in enumerate(("shapes", "tones")):
    _write_folder(tmp_path / name, {"train": _class_images(k, ["a", "b", "c"], 16),
                                    "test": _class_images(10 + k, ["a", "b", "c"], 4)})
  return str(tmp_path)


@pytest.fixture
def write_folder():
  return _write_folder


@pytest.fixture
def class_images():
  return _class_images


@pytest.fixture
def make_root():
  return _make_root


@pytest.fixture
def random_rgb():
  """random_rgb(rng, n, size=8): n random uint8 RGB images."""
  return lambda rng, n, size=8: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def row_hashes():
  """row_hashes(x): the set of sha1 digests of x's rows (to test pools for disjointness)."""
  return lambda x: {hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x}
