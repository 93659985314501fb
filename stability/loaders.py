"""Data loaders: image datasets on disk -> `tasks.Task`s and `tasks.Suite`s for the pipeline.

Five loader kinds each read one dataset into `Split`s (x float32 [N, S, S, C] in [0, 1], y int32
[N], class names), keyed "train" and, when the dataset has one, "test":

  folder  <root>/<task>/{train,test}/<class>/*.png|jpg|...   labels: sorted class folder names
  npz     <root>/<task>.npz: x_train, y_train[, x_test, y_test][, classes]
  arrays  <root>/<task>/x_train.npy, y_train.npy[, x_test.npy, y_test.npy][, classes.txt]
  hf      <root>/hf/<task>/: parquet or arrow files named by split (train-*.parquet, ...) or a
          `save_to_disk` directory; needs `datasets`
  tfds    <root>/tfds/<tfds name>/ as written by TFDS `download_and_prepare`; needs
          `tensorflow_datasets`; never downloads

Preprocessing (`Preprocess`): central square crop, antialiased bilinear resize to S x S (PIL;
`tasks._resize_bilinear` without PIL), grey <-> RGB. Normalisation (`normalize`) and keyed
random-crop + flip augmentation (`augment`) are suite options. A task's ghost pool is a held-out
slice of its train split (`tasks._split_task`); a dataset without a test split gets one the
same way. Nothing here touches the network.

`paper20_suite` builds the paper's 20 tasks (`PAPER20`) from a data root; `find_missing` and
`describe_missing` say which datasets are absent and where they were looked for, loading nothing.

Legend: N rows, H, W input image dims, S output side, C channels.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
import zlib
from typing import Any, Sequence

import numpy as np

from stability import tasks as tasks_lib

try:
  from PIL import Image
except ImportError:  # pillow ships with matplotlib; the numpy resize is the fallback
  Image = None

Array = np.ndarray

KINDS = ("folder", "npz", "arrays", "hf", "tfds")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
TEST_SPLITS = ("test", "validation", "val", "valid")  # first one present is the test split
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WORKERS = min(16, os.cpu_count() or 1)  # image-decoding threads of the folder loader
_LIBRARIES = {"hf": ("datasets", "datasets"), "tfds": ("tensorflow_datasets",
                                                       "tensorflow-datasets")}


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset: x float32 [N, S, S, C] in [0, 1], y int32 [N], class names."""
  x: Array
  y: Array
  classes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Per-image preprocessing shared by every loader."""
  size: int | None = 32       # output side S in pixels (None: keep; images must share a shape)
  channels: int | None = 3    # 1 (luminance) or 3 (grey replicated; alpha dropped); None: keep
  center_crop: bool = True    # crop the central square before resizing (no aspect distortion)

  def __post_init__(self):
    if self.size is not None and (not isinstance(self.size, (int, np.integer)) or self.size < 1):
      raise ValueError(f"image_size: {self.size!r} is not a positive int or None")
    if self.channels not in (None, 1, 3):
      raise ValueError(f"channels: {self.channels!r}; allowed: 1, 3 or None")


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


# ---------------------------------------------------------------------------------------------
# Preprocessing.

def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


def _scale_to_unit(x: Array, field: str) -> Array:
  """uint8/int 0-255, uint16 0-65535, bool or float [0, 1] -> float32 [0, 1]."""
  if x.dtype == np.bool_:
    return x.astype(np.float32)
  if x.dtype == np.uint16:
    return x.astype(np.float32) / 65535.0
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      _fail(field, f"integer images must lie in [0, 255]; got [{x.min()}, {x.max()}]")
    return x.astype(np.float32) / 255.0
  if np.issubdtype(x.dtype, np.floating):
    if x.size and not (np.isfinite(x).all() and x.min() >= -1e-6 and x.max() <= 1 + 1e-6):
      _fail(field, f"float images must be finite and lie in [0, 1]; got [{np.nanmin(x)}, "
            f"{np.nanmax(x)}] (store 0-255 data as uint8)")
    return np.clip(x, 0.0, 1.0).astype(np.float32)
  _fail(field, f"unsupported image dtype {x.dtype}")


def _pil_to_array(img) -> Array:
  """A decoded PIL image as [H, W, C] float32 in [0, 1] (palette, alpha, CMYK -> RGB)."""
  if img.mode in ("1", "LA", "La"):
    img = img.convert("L")
  elif img.mode.startswith("I;16") or img.mode == "I":
    return np.clip(np.asarray(img, np.float32) / 65535.0, 0, 1)[..., None]
  elif img.mode not in ("L", "RGB", "F"):
    img = img.convert("RGB")
  return _scale_to_unit(np.asarray(img), "image").reshape(img.size[1], img.size[0], -1)


def _set_channels(x_HxWxC: Array, channels: int | None) -> Array:
  C = x_HxWxC.shape[-1]
  if C not in (1, 3, 4):
    _fail("x", f"images need 1, 3 or 4 channels (channels last); got {C}")
  if C == 4:  # RGBA: drop alpha
    x_HxWxC, C = x_HxWxC[..., :3], 3
  if channels is None or channels == C:
    return x_HxWxC
  if channels == 3:
    return np.repeat(x_HxWxC, 3, axis=-1)
  # ITU-R 601-2 luma, as PIL's convert("L").
  luma = np.asarray([0.299, 0.587, 0.114], np.float32)
  return (x_HxWxC @ luma)[..., None].astype(np.float32)


def resize(x_HxWxC: Array, size: int, center_crop: bool = True) -> Array:
  """Central square crop, then antialiased bilinear resize to [size, size, C] (PIL, float)."""
  H, W = x_HxWxC.shape[:2]
  if center_crop and H != W:
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    x_HxWxC = x_HxWxC[top:top + s, left:left + s]
  if x_HxWxC.shape[:2] == (size, size):
    return np.asarray(x_HxWxC, np.float32)
  chans = np.moveaxis(np.asarray(x_HxWxC, np.float32), -1, 0)
  if Image is None:
    out = tasks_lib._resize_bilinear(chans, size)
  else:
    # Mode "F" per channel: one code path for uint8 and float data, no 8-bit rounding.
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in chans])
  return np.clip(np.moveaxis(out, 0, -1), 0.0, 1.0).astype(np.float32)


def preprocess(images, prep: Preprocess, field: str = "x", workers: int = 1) -> Array:
  """Images ([N, H, W(, C)] array, or a sequence of PIL images, arrays, encoded bytes or file
  paths) -> float32 [N, S, S, C]; `workers` threads decode and resize a sequence."""
  if isinstance(images, np.ndarray):
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4:
      _fail(field, f"expected [N, H, W] or [N, H, W, C] (channels last); got shape "
            f"{images.shape}")
    if images.shape[-1] not in (1, 3, 4):
      _fail(field, f"expected channels last with C in 1, 3, 4; got shape {images.shape}")
    x = _scale_to_unit(images, field)
    if prep.channels is not None or x.shape[-1] == 4:
      x = _set_channels(x, prep.channels)
    if prep.size is None or x.shape[1:3] == (prep.size, prep.size):
      return np.ascontiguousarray(x, np.float32)
    out = [resize(im, prep.size, prep.center_crop) for im in x]
    return np.stack(out) if out else np.zeros((0, prep.size, prep.size, x.shape[-1]), np.float32)
  one = lambda im: _preprocess_one(im, prep, field)
  if workers > 1:  # PIL releases the GIL while decoding and resizing; map keeps the order
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return _stack(list(pool.map(one, images)), field)
  return _stack([one(im) for im in images], field)


def _preprocess_one(im, prep: Preprocess, field: str) -> Array:
  a = _set_channels(_image_to_array(im, field), prep.channels)
  return a if prep.size is None else resize(a, prep.size, prep.center_crop)


def _stack(images: list[Array], field: str) -> Array:
  if not images:
    _fail(field, "no images")
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    which = "image_size" if len({s[:2] for s in shapes}) > 1 else "channels"
    _fail(which, f"{field} has images of shapes {sorted(shapes)[:3]}...; set {which}")
  return np.stack(images).astype(np.float32)


def _image_to_array(im, field: str) -> Array:
  """A PIL image, encoded bytes dict (HF), file path, or [H, W(, C)] array -> [H, W, C] float."""
  if isinstance(im, dict):  # HF Image feature with decode=False, or parquet without metadata
    im = im.get("bytes") or im.get("path")
  if isinstance(im, (bytes, str)):
    if Image is None:
      raise ImportError("decoding images needs pillow: pip install pillow")
    with Image.open(io.BytesIO(im) if isinstance(im, bytes) else im) as f:
      f.load()
      return _pil_to_array(f)
  if Image is not None and isinstance(im, Image.Image):
    return _pil_to_array(im)
  a = np.asarray(im)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    _fail(field, f"an image must be [H, W] or [H, W, C]; got shape {a.shape}")
  return _scale_to_unit(a, field)


def channel_stats(x_NxHxWxC: Array) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation (float64 accumulation)."""
  flat = np.asarray(x_NxHxWxC, np.float64).reshape(-1, x_NxHxWxC.shape[-1])
  return tuple(flat.mean(0).tolist()), tuple(flat.std(0).tolist())


def normalize(x_NxHxWxC: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
  """(x - mean) / std per channel, float32."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  C = x_NxHxWxC.shape[-1]
  if mean.shape != (C,) or std.shape != (C,):
    _fail("normalize", f"mean and std need {C} values (one per channel); got {mean.shape}, "
          f"{std.shape}")
  if not np.all(std > 0):
    _fail("normalize", f"std must be > 0; got {std.tolist()}")
  return ((x_NxHxWxC - mean) / std).astype(np.float32)


_apply_stats = normalize  # `normalize` is also a disk_suite option, which shadows the function


def augment(x_NxHxWxC: Array, seed: int, *, pad: int = 4, flip: bool = True) -> Array:
  """Random crop of the zero-padded image (pad px each side) and random horizontal flip.

  Keyed: a pure function of (x, seed, pad, flip), never the global RNG.
  """
  if pad < 0:
    _fail("augment_pad", f"must be >= 0; got {pad}")
  N, H, W, _ = x_NxHxWxC.shape
  rng = np.random.default_rng([int(seed), 0xA06])
  dy = rng.integers(0, 2 * pad + 1, N)
  dx = rng.integers(0, 2 * pad + 1, N)
  flips = rng.random(N) < 0.5 if flip else np.zeros(N, bool)
  padded = np.pad(x_NxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = dy[:, None] + np.arange(H)[None, :]                          # [N, H]
  cols = dx[:, None] + np.arange(W)[None, :]                          # [N, W]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(N)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ---------------------------------------------------------------------------------------------
# Loaders: each returns {"train": Split[, "test": Split]}.

def _cap(n: int, limit: int | None, seed: int, split: str) -> Array:
  """Rows kept from a split of n rows: a seeded random subset of `limit`, in original order."""
  if limit is None or limit >= n:
    return np.arange(n)
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 0xCA9])
  return np.sort(rng.permutation(n)[:limit])


def _labels(y, n: int, field: str) -> Array:
  y = np.asarray(y)
  if y.ndim != 1:
    _fail(field, f"labels must be 1-D; got shape {y.shape}")
  if len(y) != n:
    _fail(field, f"{len(y)} labels for {n} images")
  if y.size and y.dtype.kind not in "biuf":
    _fail(field, f"labels must be integer class indices; got dtype {y.dtype}")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.mod(y, 1) == 0):
      _fail(field, f"labels must be integers; got dtype {y.dtype}")
  if y.size and y.min() < 0:
    _fail(field, f"labels must be >= 0; got {y.min()}")
  return y.astype(np.int32)


def _class_names(names, ys: Sequence[Array], field: str) -> tuple[str, ...]:
  top = max((int(y.max()) for y in ys if y.size), default=-1)
  if names is None:
    return tuple(str(i) for i in range(top + 1))
  names = tuple(str(c) for c in names)
  if top >= len(names):
    _fail(field, f"label {top} but only {len(names)} class names")
  return names


def _from_arrays(arrays: dict[str, Any], names, prep: Preprocess, where: str, *,
                 max_train: int | None, max_test: int | None, seed: int) -> dict[str, Split]:
  for k in ("x_train", "y_train"):
    if k not in arrays:
      _fail(k, f"missing from {where}; found {sorted(arrays)}")
  if ("x_test" in arrays) != ("y_test" in arrays):
    _fail("x_test", f"x_test and y_test come together in {where}; found {sorted(arrays)}")
  out, raw = {}, {}
  for split, limit in (("train", max_train), ("test", max_test)):
    if f"x_{split}" not in arrays:
      continue
    x = np.asarray(arrays[f"x_{split}"])
    y = _labels(arrays[f"y_{split}"], len(x), f"y_{split}")
    keep = _cap(len(y), limit, seed, split)
    raw[split] = (x[keep], y[keep])
  classes = _class_names(names, [y for _, y in raw.values()], f"{where}: classes")
  for split, (x, y) in raw.items():
    if not len(y):
      _fail(f"x_{split}", f"{where} has no {split} rows")
    out[split] = Split(preprocess(x, prep, f"x_{split}"), y, classes)
  return out


def load_npz(path: str, prep: Preprocess = Preprocess(), *, max_train: int | None = None,
             max_test: int | None = None, seed: int = 0) -> dict[str, Split]:
  """<task>.npz with x_train, y_train[, x_test, y_test][, classes]."""
  if not os.path.isfile(path):
    _fail("path", f"no npz file at {path}")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  names = arrays.pop("classes", None)
  return _from_arrays(arrays, names, prep, path, max_train=max_train, max_test=max_test,
                      seed=seed)


def load_arrays(directory: str, prep: Preprocess = Preprocess(), *,
                max_train: int | None = None, max_test: int | None = None,
                seed: int = 0) -> dict[str, Split]:
  """A directory of x_train.npy, y_train.npy[, x_test.npy, y_test.npy][, classes.txt]."""
  if not os.path.isdir(directory):
    _fail("path", f"no directory at {directory}")
  arrays = {}
  for k in ("x_train", "y_train", "x_test", "y_test"):
    p = os.path.join(directory, k + ".npy")
    if os.path.isfile(p):
      arrays[k] = np.load(p, mmap_mode="r", allow_pickle=False)
  names = None
  if os.path.isfile(os.path.join(directory, "classes.txt")):
    with open(os.path.join(directory, "classes.txt")) as f:
      names = [line.strip() for line in f if line.strip()]
  return _from_arrays(arrays, names, prep, directory, max_train=max_train, max_test=max_test,
                      seed=seed)


def _list_folder(split_dir: str) -> dict[str, list[str]]:
  classes = sorted(d for d in os.listdir(split_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    _fail("path", f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
  files = {}
  for c in classes:
    d = os.path.join(split_dir, c)
    files[c] = sorted(os.path.join(d, f) for f in os.listdir(d)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files[c]:
      _fail("path", f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)})")
  return files


def load_image_folder(directory: str, prep: Preprocess = Preprocess(), *,
                      max_train: int | None = None, max_test: int | None = None,
                      seed: int = 0) -> dict[str, Split]:
  """<directory>/{train,test}/<class>/<image>; labels index the sorted train class folders."""
  if Image is None:
    raise ImportError("the folder loader needs pillow to decode images: pip install pillow")
  train_dir = os.path.join(directory, "train")
  if not os.path.isdir(train_dir):
    _fail("path", f"no train folder at {train_dir} (expected {directory}/train/<class>/<image>)")
  splits = {"train": (train_dir, max_train)}
  test = next((s for s in TEST_SPLITS if os.path.isdir(os.path.join(directory, s))), None)
  if test is not None:
    splits["test"] = (os.path.join(directory, test), max_test)
  listed = {s: _list_folder(d) for s, (d, _) in splits.items()}
  classes = tuple(listed["train"])
  out = {}
  for split, (d, limit) in splits.items():
    unknown = sorted(set(listed[split]) - set(classes))
    if unknown:
      _fail("path", f"{d} has class folders not in train: {', '.join(unknown)}")
    paths = [(p, classes.index(c)) for c, ps in listed[split].items() for p in ps]
    keep = _cap(len(paths), limit, seed, split)
    y = np.array([paths[i][1] for i in keep], np.int32)
    x = preprocess([paths[i][0] for i in keep], prep, d, workers=_WORKERS)
    out[split] = Split(x, y, classes)
  return out


def _import(kind: str):
  module, pip_name = _LIBRARIES[kind]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    msg = (f"loader {kind!r} needs `{module}`, which is not installed (pip install {pip_name}); "
           "or store the data as an image folder or npz")
    raise ImportError(msg) from e


def _installed(kind: str) -> bool:
  """Whether the loader's library can be imported, without importing it (TFDS pulls in TF)."""
  if kind not in _LIBRARIES:
    return True
  module = _LIBRARIES[kind][0]
  if module in sys.modules:
    return sys.modules[module] is not None
  return importlib.util.find_spec(module) is not None


def load_tfds(name: str, data_dir: str, prep: Preprocess = Preprocess(), *,
              max_train: int | None = None, max_test: int | None = None,
              seed: int = 0) -> dict[str, Split]:
  """A prepared TFDS dataset from `data_dir`, read with downloads disabled."""
  tfds = _import("tfds")
  if not os.path.isdir(data_dir):
    _fail("path", f"no TFDS data_dir at {data_dir}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    info = builder.info
  except Exception as e:  # noqa: BLE001 -- TFDS raises many types for an unknown name
    raise ValueError(f"tfds: cannot open {name!r} in {data_dir}: {e}") from e
  splits = list(info.splits.keys()) if hasattr(info.splits, "keys") else list(info.splits)
  if "train" not in splits:
    _fail("tfds", f"{name} in {data_dir} has no train split; splits: {splits}")
  wanted = {"train": ("train", max_train)}
  test = next((s for s in TEST_SPLITS if s in splits), None)
  if test is not None:
    wanted["test"] = (test, max_test)
  if not info.supervised_keys:
    _fail("tfds", f"{name} has no supervised (image, label) keys")
  label_key = info.supervised_keys[1]
  names = getattr(info.features[label_key], "names", None)
  raw = {}
  for split, (tfds_split, limit) in wanted.items():
    keep = set(_cap(int(info.splits[tfds_split].num_examples), limit, seed, split).tolist())
    try:
      ds = builder.as_dataset(split=tfds_split, as_supervised=True)
    except Exception as e:  # noqa: BLE001 -- an unprepared builder fails here, not on download
      raise ValueError(f"tfds: {name} is not prepared in {data_dir} (downloads are disabled): "
                       f"{e}") from e
    ims, ys = [], []
    for i, (im, lab) in enumerate(tfds.as_numpy(ds)):
      if i in keep:  # preprocess as we go: raw images of a large split need not fit in memory
        ims.append(_preprocess_one(im, prep, f"tfds {name} {tfds_split}"))
        ys.append(int(lab))
    raw[split] = (_stack(ims, f"tfds {name} {tfds_split}"),
                  _labels(ys, len(ims), f"tfds {name} {tfds_split} labels"))
  classes = _class_names(names, [y for _, y in raw.values()], f"tfds {name}: classes")
  return {split: Split(x, y, classes) for split, (x, y) in raw.items()}


def _hf_split_of(path: str) -> str | None:
  """Split named by a data file: train-00000-of-00001.parquet, test.arrow, train/0.parquet."""
  stem = os.path.basename(path).split(".")[0]
  for token in (stem.split("-")[0].split("_")[0], os.path.basename(os.path.dirname(path))):
    if token in ("train",) + TEST_SPLITS:
      return token
  return None


def _hf_data_files(directory: str) -> tuple[str, dict[str, list[str]]] | None:
  """('parquet'|'arrow', {split: files}) for a directory of data files; None if it has none."""
  for ext in ("parquet", "arrow"):
    files = sorted(glob.glob(os.path.join(directory, "**", f"*.{ext}"), recursive=True))
    if files:
      by_split: dict[str, list[str]] = {}
      for f in files:
        s = _hf_split_of(f)
        if s is not None:
          by_split.setdefault(s, []).append(f)
      if "train" not in by_split:
        _fail("path", f"{directory} has {ext} files but none named for the train split "
              f"(train-*.{ext} or train/*.{ext})")
      return ext, by_split
  return None


def _is_hf_saved(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f))
             for f in ("dataset_dict.json", "state.json"))


def _pick_column(columns: Sequence[str], explicit: str | None, candidates: Sequence[str],
                 field: str) -> str:
  if explicit is not None:
    if explicit not in columns:
      _fail(field, f"column {explicit!r} not in {list(columns)}")
    return explicit
  for c in candidates:
    if c in columns:
      return c
  _fail(field, f"none of {list(candidates)} in columns {list(columns)}; set {field}")


def load_hf(directory: str, prep: Preprocess = Preprocess(), *, image_column: str | None = None,
            label_column: str | None = None, max_train: int | None = None,
            max_test: int | None = None, seed: int = 0) -> dict[str, Split]:
  """Hugging Face `datasets` from local parquet/arrow files or a `save_to_disk` directory."""
  datasets = _import("hf")
  if not os.path.isdir(directory):
    _fail("path", f"no directory at {directory}")
  if _is_hf_saved(directory):
    dd = datasets.load_from_disk(directory)
    if not hasattr(dd, "keys"):  # a single saved Dataset is the train split
      dd = {"train": dd}
  else:
    found = _hf_data_files(directory)
    if found is None:
      _fail("path", f"{directory} has no parquet or arrow files and no dataset_dict.json")
    ext, files = found
    dd = datasets.load_dataset(ext, data_files=files)
  splits = list(dd.keys())
  if "train" not in splits:
    _fail("hf", f"{directory} has no train split; splits: {splits}")
  wanted = {"train": ("train", max_train)}
  test = next((s for s in TEST_SPLITS if s in splits), None)
  if test is not None:
    wanted["test"] = (test, max_test)
  train = dd["train"]
  img_col = _pick_column(train.column_names, image_column, ("image", "img", "pixel_values"),
                         "image_column")
  lab_col = _pick_column(train.column_names, label_column,
                         ("label", "labels", "fine_label", "target"), "label_column")
  names = getattr(train.features[lab_col], "names", None)
  raw = {}
  for split, (hf_split, limit) in wanted.items():
    ds = dd[hf_split]
    keep = _cap(len(ds), limit, seed, split)
    if len(keep) < len(ds):
      ds = ds.select(keep.tolist())
    ims, ys = [], []
    for row in ds:  # row by row: one decoded image in memory at a time
      ims.append(_preprocess_one(row[img_col], prep, f"hf {directory} {hf_split}"))
      ys.append(row[lab_col])
    raw[split] = (_stack(ims, f"hf {directory} {hf_split}"),
                  _labels(ys, len(ims), f"hf {hf_split} {lab_col}"))
  classes = _class_names(names, [y for _, y in raw.values()], f"hf {directory}: classes")
  return {s: Split(x, y, classes) for s, (x, y) in raw.items()}


def load(kind: str, path: str, prep: Preprocess = Preprocess(), *, spec: DatasetSpec | None = None,
         max_train: int | None = None, max_test: int | None = None,
         seed: int = 0) -> dict[str, Split]:
  """Dispatches to the loader of `kind`; for tfds, `path` is <root>/tfds/<tfds name>."""
  if kind not in KINDS:
    _fail("kind", f"unknown loader kind {kind!r}; allowed: {', '.join(KINDS)}")
  limits = dict(max_train=max_train, max_test=max_test, seed=seed)
  if kind == "folder":
    return load_image_folder(path, prep, **limits)
  if kind == "npz":
    return load_npz(path, prep, **limits)
  if kind == "arrays":
    return load_arrays(path, prep, **limits)
  if kind == "hf":
    spec = spec or DatasetSpec(os.path.basename(path))
    return load_hf(path, prep, image_column=spec.image_column, label_column=spec.label_column,
                   **limits)
  tfds_name = spec.tfds if spec is not None and spec.tfds else os.path.basename(path)
  data_dir = path  # <root>/tfds/<name>[/<config>] -> <root>/tfds
  for _ in tfds_name.split(":")[0].split("/"):
    data_dir = os.path.dirname(data_dir)
  return load_tfds(tfds_name, data_dir, prep, **limits)


# ---------------------------------------------------------------------------------------------
# Where datasets live under a data root.

def _spec(name: str) -> DatasetSpec:
  for s in PAPER20:
    if s.name == name:
      return s
  return DatasetSpec(name, name, tfds=name)


def locations(data_root: str, spec: DatasetSpec | str) -> list[tuple[str, str]]:
  """(kind, path) candidates for one dataset, in the order they are tried."""
  spec = _spec(spec) if isinstance(spec, str) else spec
  r, n = os.path.expanduser(data_root), spec.name
  out = [("folder", os.path.join(r, n)), ("npz", os.path.join(r, n + ".npz")),
         ("arrays", os.path.join(r, n)), ("hf", os.path.join(r, "hf", n))]
  if spec.tfds:
    out.append(("tfds", os.path.join(r, "tfds", *spec.tfds.split(":")[0].split("/"))))
  return out


def _looked_at(kind: str, path: str) -> str:
  return {"folder": os.path.join(path, "train", "<class>", ""),
          "npz": path, "arrays": os.path.join(path, "x_train.npy"),
          "hf": os.path.join(path, "") + "{*.parquet,*.arrow,dataset_dict.json}",
          "tfds": os.path.join(path, "")}[kind]


def _present(kind: str, path: str) -> bool:
  if kind == "folder":
    return os.path.isdir(os.path.join(path, "train"))
  if kind == "npz":
    return os.path.isfile(path)
  if kind == "arrays":
    return os.path.isfile(os.path.join(path, "x_train.npy"))
  if kind == "hf":
    return os.path.isdir(path) and (_is_hf_saved(path) or bool(
        glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
        or glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True)))
  return os.path.isdir(path)


def _probe(data_root: str, spec: DatasetSpec) -> tuple[tuple[str, str] | None, list[str],
                                                       list[str]]:
  """(first usable (kind, path) or None, paths looked at, notes on unusable finds)."""
  looked, notes = [], []
  for kind, path in locations(data_root, spec):
    looked.append(_looked_at(kind, path))
    if _present(kind, path):
      if _installed(kind):
        return (kind, path), looked, notes
      module, pip_name = _LIBRARIES[kind]
      notes.append(f"{path} exists but `{module}` is not installed (pip install {pip_name})")
  return None, looked, notes


def locate(data_root: str, task: str | DatasetSpec) -> tuple[str, str]:
  """(kind, path) of a task's dataset under `data_root`; ValueError saying where it looked."""
  spec = _spec(task) if isinstance(task, str) else task
  found, looked, notes = _probe(data_root, spec)
  if found is None:
    _fail("data_root", f"no dataset for task {spec.name!r}; looked at {', '.join(looked)}"
          + (f" ({'; '.join(notes)})" if notes else ""))
  return found


def _task_names(tasks: Sequence[str] | str | None) -> tuple[str, ...]:
  if tasks is None:
    return PAPER20_NAMES
  if isinstance(tasks, str):
    tasks = [t for t in tasks.split(",") if t]
  return tuple(tasks)


def find_missing(data_root: str, tasks: Sequence[str] | None = None
                 ) -> list[tuple[str, tuple[str, ...]]]:
  """(task, paths looked at) for every task without usable data (default: the paper's 20)."""
  out = []
  for name in _task_names(tasks):
    found, looked, _ = _probe(data_root, _spec(name))
    if found is None:
      out.append((name, tuple(looked)))
  return out


def describe_missing(data_root: str, tasks: Sequence[str] | None = None) -> str:
  """Header line, then one line per missing dataset with the paths looked at (for --dry-run)."""
  names = _task_names(tasks)
  root = os.path.abspath(os.path.expanduser(data_root))
  lines = []
  for name in names:
    found, looked, notes = _probe(root, _spec(name))
    if found is None:
      lines.append(f"  missing {name}: looked at {', '.join(looked)}"
                   + (f"; {'; '.join(notes)}" if notes else ""))
  if not lines:
    return f"all {len(names)} datasets found under {root}"
  where = "" if os.path.isdir(root) else " (the data root does not exist)"
  return "\n".join([f"{len(lines)} of {len(names)} datasets missing under {root}{where}:"]
                   + lines)


def discover(data_root: str) -> tuple[str, ...]:
  """Task names of every dataset under a root (folder, npz, arrays, hf layouts; not tfds)."""
  data_root = os.path.expanduser(data_root)
  if not os.path.isdir(data_root):
    _fail("data_root", f"{data_root} is not a directory")
  names = set()
  for entry in os.listdir(data_root):
    p = os.path.join(data_root, entry)
    if entry.startswith(".") or entry in ("hf", "tfds"):
      continue
    if entry.endswith(".npz") and os.path.isfile(p):
      names.add(entry[:-4])
    elif _present("folder", p) or _present("arrays", p):
      names.add(entry)
  hf = os.path.join(data_root, "hf")
  if os.path.isdir(hf):
    names |= {e for e in os.listdir(hf) if _present("hf", os.path.join(hf, e))}
  return tuple(sorted(names))


# ---------------------------------------------------------------------------------------------
# Tasks and suites.

def _stamp(path: str) -> tuple[int, int, int]:
  """(files, bytes, latest mtime in ns) of a file or of every file below a directory: a
  directory's own mtime misses edits and additions inside its class subfolders."""
  if os.path.isfile(path):
    st = os.stat(path)
    return 1, st.st_size, st.st_mtime_ns
  n = size = latest = 0
  for d, _, files in os.walk(path):
    for f in files:
      st = os.stat(os.path.join(d, f))
      n, size, latest = n + 1, size + st.st_size, max(latest, st.st_mtime_ns)
  return n, size, latest


def _cache_key(kind: str, path: str, prep: Preprocess, **extra) -> str:
  blob = json.dumps(dict(kind=kind, path=os.path.abspath(path), stamp=_stamp(path),
                         prep=dataclasses.asdict(prep), **extra), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_dataset(data_root: str, task: str | DatasetSpec, prep: Preprocess = Preprocess(), *,
                 max_train: int | None = None, max_test: int | None = None, seed: int = 0,
                 cache_dir: str | None = None) -> dict[str, Split]:
  """Locates and loads one task's dataset; with `cache_dir`, preprocessed arrays are reused."""
  spec = _spec(task) if isinstance(task, str) else task
  kind, path = locate(data_root, spec)
  limits = dict(max_train=max_train, max_test=max_test, seed=seed)
  if not cache_dir:
    return load(kind, path, prep, spec=spec, **limits)
  key = _cache_key(kind, path, prep, **limits)
  file = os.path.join(cache_dir, f"{spec.name}-{key}.npz")
  if os.path.isfile(file):
    with np.load(file, allow_pickle=False) as f:
      classes = tuple(f["classes"].tolist())
      return {s: Split(f[f"x_{s}"], f[f"y_{s}"], classes) for s in ("train", "test")
              if f"x_{s}" in f.files}
  splits = load(kind, path, prep, spec=spec, **limits)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = file + f".tmp{os.getpid()}.npz"
  arrays = {f"{k}_{s}": getattr(v, k) for s, v in splits.items() for k in ("x", "y")}
  np.savez(tmp, classes=np.array(splits["train"].classes), **arrays)
  os.replace(tmp, file)  # atomic: a crash never leaves a torn cache file
  return splits


def build_task(name: str, splits: dict[str, Split], *, seed: int, test_frac: float = 0.2,
               ghost_frac: float = 0.05, holdout_frac: float = 0.0
               ) -> tuple[tasks_lib.Task, Split | None]:
  """Task from loaded splits: ghost (and, without a test split, test) rows are held out of
  train by `tasks._split_task`; `holdout_frac` of train is held out first (pretraining rows)."""
  if "train" not in splits:
    _fail("splits", f"{name} has no train split")
  train, test = splits["train"], splits.get("test")
  classes = train.classes
  key = zlib.crc32(name.encode())  # stable per task, whichever other tasks are in the suite
  x, y, held = train.x, train.y, None
  if holdout_frac > 0:
    perm = np.random.default_rng([seed, key, 0x9E7]).permutation(len(y))
    k = max(1, int(round(holdout_frac * len(y))))
    held = Split(x[perm[:k]], y[perm[:k]], classes)
    x, y = x[perm[k:]], y[perm[k:]]
  task = tasks_lib._split_task(name, x, y, len(classes), seed, key,
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
    return (IMAGENET_MEAN, IMAGENET_STD)
  if isinstance(normalize_opt, (tuple, list)) and len(normalize_opt) == 2:
    mean, std = (tuple(float(v) for v in a) for a in normalize_opt)
    if len(mean) != len(std) or not all(s > 0 for s in std):
      _fail("normalize", "(mean, std) need one value each per channel and std > 0")
    return (mean, std)
  _fail("normalize", f"{normalize_opt!r}; allowed: None, 'imagenet', 'task' or (mean, std)")


def _normalize_task(task: tasks_lib.Task, stats) -> tasks_lib.Task:
  mean, std = stats
  return dataclasses.replace(task, x_train=normalize(task.x_train, mean, std),
                             x_ghost=normalize(task.x_ghost, mean, std),
                             x_test=normalize(task.x_test, mean, std))


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
  prep = Preprocess(image_size, channels, center_crop)
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
  names = (tuple(n for n in discover(data_root) if n != pretrain) if tasks is None
           else _task_names(tasks))
  if not names:
    _fail("tasks", f"no datasets under {data_root}")
  if len(set(names)) != len(names):
    _fail("tasks", f"duplicate task names in {list(names)}")
  wanted = names + (() if pretrain == "holdout" else (pretrain,))
  if find_missing(data_root, wanted):
    _fail("data_root", describe_missing(data_root, wanted))
  limits = dict(max_train=max_train, max_test=max_test, seed=seed, cache_dir=cache_dir)
  built, held = [], []
  for t in names:
    splits = read_dataset(data_root, t, prep, **limits)
    task, h = build_task(t, splits, seed=seed, test_frac=test_frac, ghost_frac=ghost_frac,
                         holdout_frac=pretrain_frac if pretrain == "holdout" else 0.0)
    stats = channel_stats(task.x_train) if stats_opt == "task" else stats_opt
    if augment_copies:
      keys = np.random.default_rng([seed, zlib.crc32(t.encode()), 0xA06]).integers(
          0, 2**31, int(augment_copies))
      views = [augment(task.x_train, int(k), pad=int(augment_pad)) for k in keys]
      task = dataclasses.replace(task, x_train=np.concatenate([task.x_train] + views),
                                 y_train=np.tile(task.y_train, int(augment_copies) + 1))
    if stats is not None:
      task = _normalize_task(task, stats)
      h = h if h is None else Split(_apply_stats(h.x, *stats), h.y, h.classes)
    built.append(task)
    held.append(h)
  if pretrain == "holdout":
    x_pre = np.concatenate([h.x for h in held])
    y_pre = np.concatenate([h.y for h in held]).astype(np.int32)
    pretrain_classes = max(t.num_classes for t in built)
  else:
    p = read_dataset(data_root, pretrain, prep, **limits)["train"]
    stats = channel_stats(p.x) if stats_opt == "task" else stats_opt
    x_pre = p.x if stats is None else _apply_stats(p.x, *stats)
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
  names = _task_names(tasks)
  unknown = [t for t in names if t not in PAPER20_NAMES]
  if unknown:
    _fail("tasks", f"unknown paper task(s) {', '.join(map(repr, unknown))}; allowed: "
          f"{', '.join(PAPER20_NAMES)}")
  return disk_suite(seed, data_root=data_root, tasks=names, name="paper20", **options)
