"""Dataset readers: one dataset on disk -> {"train": Split[, "test": Split]}.

Five loader kinds each read one dataset into `Split`s (x float32 [N, S, S, C] in [0, 1], y int32
[N], class names), keyed "train" and, when the dataset has one, "test":

  folder  <root>/<task>/{train,test}/<class>/*.png|jpg|...   labels: sorted class folder names
  npz     <root>/<task>.npz: x_train, y_train[, x_test, y_test][, classes]
  arrays  <root>/<task>/x_train.npy, y_train.npy[, x_test.npy, y_test.npy][, classes.txt]
  hf      <root>/hf/<task>/: parquet or arrow files named by split (train-*.parquet, ...) or a
          `save_to_disk` directory; needs `datasets`
  tfds    <root>/tfds/<tfds name>/ as written by TFDS `download_and_prepare`; needs
          `tensorflow_datasets`; never downloads

Every image goes through `transforms.preprocess` (`Preprocess`). `max_train` / `max_test` keep a
seeded random subset of a split's rows. Where a dataset lives under a data root is `roots`'
business; nothing here touches the network.

Legend: N rows, S output side, C channels.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import os
import sys
import zlib
from typing import Any, Sequence

import numpy as np

from stability.data import catalog
from stability.data import transforms

Array = np.ndarray
Preprocess = transforms.Preprocess  # the loaders' `prep` argument

KINDS = ("folder", "npz", "arrays", "hf", "tfds")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
TEST_SPLITS = ("test", "validation", "val", "valid")  # first one present is the test split
_WORKERS = min(16, os.cpu_count() or 1)  # image-decoding threads of the folder loader
# loader kind -> (module it imports, pip package that provides it)
LIBRARIES = {"hf": ("datasets", "datasets"), "tfds": ("tensorflow_datasets",
                                                      "tensorflow-datasets")}


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset: x float32 [N, S, S, C] in [0, 1], y int32 [N], class names."""
  x: Array
  y: Array
  classes: tuple[str, ...]


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


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
    out[split] = Split(transforms.preprocess(x, prep, f"x_{split}"), y, classes)
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
  if transforms.Image is None:
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
    x = transforms.preprocess([paths[i][0] for i in keep], prep, d, workers=_WORKERS)
    out[split] = Split(x, y, classes)
  return out


def _import(kind: str):
  module, pip_name = LIBRARIES[kind]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    msg = (f"loader {kind!r} needs `{module}`, which is not installed (pip install {pip_name}); "
           "or store the data as an image folder or npz")
    raise ImportError(msg) from e


def library_installed(kind: str) -> bool:
  """Whether the loader's library can be imported, without importing it (TFDS pulls in TF)."""
  if kind not in LIBRARIES:
    return True
  module = LIBRARIES[kind][0]
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
        ims.append(transforms.preprocess_one(im, prep, f"tfds {name} {tfds_split}"))
        ys.append(int(lab))
    raw[split] = (transforms.stack_images(ims, f"tfds {name} {tfds_split}"),
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


def is_hf_saved(directory: str) -> bool:
  """Whether `directory` was written by `datasets`' `save_to_disk`."""
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
  if is_hf_saved(directory):
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
      ims.append(transforms.preprocess_one(row[img_col], prep, f"hf {directory} {hf_split}"))
      ys.append(row[lab_col])
    raw[split] = (transforms.stack_images(ims, f"hf {directory} {hf_split}"),
                  _labels(ys, len(ims), f"hf {hf_split} {lab_col}"))
  classes = _class_names(names, [y for _, y in raw.values()], f"hf {directory}: classes")
  return {s: Split(x, y, classes) for s, (x, y) in raw.items()}


def load(kind: str, path: str, prep: Preprocess = Preprocess(), *,
         spec: catalog.DatasetSpec | None = None, max_train: int | None = None,
         max_test: int | None = None, seed: int = 0) -> dict[str, Split]:
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
    spec = spec or catalog.DatasetSpec(os.path.basename(path))
    return load_hf(path, prep, image_column=spec.image_column, label_column=spec.label_column,
                   **limits)
  tfds_name = spec.tfds if spec is not None and spec.tfds else os.path.basename(path)
  data_dir = path  # <root>/tfds/<name>[/<config>] -> <root>/tfds
  for _ in tfds_name.split(":")[0].split("/"):
    data_dir = os.path.dirname(data_dir)
  return load_tfds(tfds_name, data_dir, prep, **limits)
