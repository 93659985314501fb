"""Dataset readers on data the tests write: round trips, labels, bad input, and TFDS / Hugging
Face through fake modules with the same API calls."""
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from stability import data
from stability.data import sources

RAW = data.Preprocess(size=None, channels=None)  # no resize, no channel change


def test_folder_pixels_round_trip_and_labels_follow_sorted_class_folders(tmp_path, write_folder,
                                                                         random_rgb):
  rng = np.random.default_rng(0)
  train = {"zebra": random_rgb(rng, 3), "ant": random_rgb(rng, 2), "moth": random_rgb(rng, 4)}
  test = {"moth": random_rgb(rng, 2), "ant": random_rgb(rng, 1)}  # a subset of the train classes
  write_folder(tmp_path, {"train": train, "test": test})
  out = sources.load_image_folder(str(tmp_path), RAW)
  assert out["train"].classes == ("ant", "moth", "zebra")
  for split, src in (("train", train), ("test", test)):
    s = out[split]
    assert s.x.dtype == np.float32 and s.y.dtype == np.int32
    want_x = np.concatenate([src[c] for c in sorted(src)])
    want_y = np.concatenate([np.full(len(src[c]), s.classes.index(c)) for c in sorted(src)])
    np.testing.assert_array_equal(np.round(s.x * 255).astype(np.uint8), want_x)
    np.testing.assert_array_equal(s.y, want_y)


def test_npz_and_array_files_load_the_same_splits(tmp_path, random_rgb):
  rng = np.random.default_rng(1)
  x_tr, x_te = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), random_rgb(rng, 4, 6)[..., 0]
  y_tr, y_te = rng.integers(0, 3, 10), np.array([0, 2, 1, 1])
  classes = np.array(["a", "b", "c"])
  np.savez(tmp_path / "t.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
           classes=classes)
  os.makedirs(tmp_path / "t")
  for k, v in dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te).items():
    np.save(tmp_path / "t" / f"{k}.npy", v)
  (tmp_path / "t" / "classes.txt").write_text("a\nb\nc\n")
  prep = data.Preprocess(size=None, channels=3)
  a = sources.load_npz(str(tmp_path / "t.npz"), prep)
  b = sources.load_arrays(str(tmp_path / "t"), prep)
  assert a["train"].classes == b["train"].classes == ("a", "b", "c")
  for s in ("train", "test"):
    np.testing.assert_array_equal(a[s].x, b[s].x)
    np.testing.assert_array_equal(a[s].y, b[s].y)
  np.testing.assert_array_equal(a["train"].x[..., 1], x_tr / np.float32(255))  # grey -> RGB
  assert a["train"].x.shape == (10, 6, 6, 3)


def test_bad_input_errors_name_the_field(tmp_path, write_folder, class_images):
  with pytest.raises(ValueError, match="path: no train folder"):
    sources.load_image_folder(str(tmp_path / "nope"))
  write_folder(tmp_path / "f", {"train": class_images(0, ["a"], 2)})
  os.makedirs(tmp_path / "f" / "train" / "empty")
  with pytest.raises(ValueError, match="path: class folder .*empty has no images"):
    sources.load_image_folder(str(tmp_path / "f"))
  x = np.zeros((6, 4, 4), np.uint8)
  np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.zeros(5, int))
  with pytest.raises(ValueError, match="y_train: 5 labels for 6 images"):
    sources.load_npz(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "float.npz", x_train=x + 255.0, y_train=np.zeros(6, int))
  with pytest.raises(ValueError, match=r"x_train: float images must .* lie in \[0, 1\]"):
    sources.load_npz(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "names.npz", x_train=x, y_train=np.arange(6), classes=np.array(["a"]))
  with pytest.raises(ValueError, match="classes: label 5 but only 1 class names"):
    sources.load_npz(str(tmp_path / "names.npz"))
  with pytest.raises(ValueError, match="kind: unknown loader kind 'csv'"):
    sources.load("csv", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# TFDS and Hugging Face through fake modules with the same API calls.

def fake_tfds(tables, calls):
  """tensorflow_datasets with builder(name, data_dir).info / .as_dataset and as_numpy."""
  mod = types.ModuleType("tensorflow_datasets")

  class Builder:
    def __init__(self, name, data_dir):
      calls.append(("builder", name, data_dir))
      self.name = name
      splits = {s: types.SimpleNamespace(num_examples=len(v[1]))
                for s, v in tables[name]["splits"].items()}
      self.info = types.SimpleNamespace(
          splits=splits, supervised_keys=("image", "label"),
          features={"label": types.SimpleNamespace(names=tables[name]["names"])})

    def as_dataset(self, *, split, as_supervised):
      assert as_supervised
      calls.append(("as_dataset", self.name, split))
      ims, ys = tables[self.name]["splits"][split]
      return list(zip(ims, ys))  # no download_and_prepare: a call to it would fail

  mod.builder = lambda name, *, data_dir: Builder(name, data_dir)
  mod.as_numpy = lambda ds: iter(ds)
  return mod


def fake_datasets(tables, calls):
  """`datasets` with load_dataset('parquet'|'arrow', data_files=...) and load_from_disk."""
  mod = types.ModuleType("datasets")

  class Dataset:
    def __init__(self, rows, names):
      self.rows, self.column_names = rows, list(rows[0])
      self.features = {"label": types.SimpleNamespace(names=names), "image": object()}

    def __len__(self):
      return len(self.rows)

    def __iter__(self):
      return iter([dict(r) for r in self.rows])

    def select(self, indices):
      return Dataset([self.rows[i] for i in indices], self.features["label"].names)

  def load_dataset(builder, *, data_files):
    calls.append(("load_dataset", builder, data_files))
    return {s: Dataset(tables[os.path.basename(fs[0])], ["cat", "dog"])
            for s, fs in data_files.items()}

  def load_from_disk(path):
    calls.append(("load_from_disk", path))
    return {"train": Dataset(tables["saved"], ["cat", "dog"])}

  mod.load_dataset, mod.load_from_disk = load_dataset, load_from_disk
  return mod


def test_tfds_loader_reads_prepared_data_without_downloading(tmp_path, monkeypatch, row_hashes):
  rng = np.random.default_rng(7)
  ims = [rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8) for i in range(20)]
  ys = list(rng.integers(0, 3, 20))
  calls = []
  tables = {"eurosat/rgb": {"names": ["forest", "river", "sea"], "splits": {"train": (ims, ys)}}}
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(tables, calls))
  os.makedirs(tmp_path / "tfds" / "eurosat" / "rgb" / "2.0.0")
  assert data.find_missing(str(tmp_path), ["eurosat"]) == []
  assert data.locate(str(tmp_path), "eurosat") == (
      "tfds", str(tmp_path / "tfds" / "eurosat" / "rgb"))
  prep = data.Preprocess(size=6, channels=3)
  s = data.paper20_suite(0, data_root=str(tmp_path), tasks="eurosat", image_size=6,
                         test_frac=0.25, ghost_frac=0.1, pretrain_frac=0.1)
  assert calls[0] == ("builder", "eurosat/rgb", str(tmp_path / "tfds"))
  assert ("as_dataset", "eurosat/rgb", "train") in calls
  t = s.tasks[0]
  assert t.num_classes == 3 and s.image_shape == (6, 6, 3)
  assert t.n_train + len(t.y_test) + len(t.y_ghost) + len(s.y_pretrain) == 20  # test carved
  want = data.preprocess(ims, prep)
  got = np.concatenate([t.x_train, t.x_test, t.x_ghost, s.x_pretrain])
  assert row_hashes(got) == row_hashes(want)


def test_hf_loader_reads_local_parquet_and_saved_datasets(tmp_path, monkeypatch, random_rgb):
  rng = np.random.default_rng(8)
  rows = lambda n: [{"image": Image.fromarray(random_rgb(rng, 1, 7)[0]), "label": int(i % 2)}
                    for i in range(n)]
  tables = {"train-00000-of-00001.parquet": rows(12), "test-00000-of-00001.parquet": rows(4),
            "saved": rows(5)}
  calls = []
  monkeypatch.setitem(sys.modules, "datasets", fake_datasets(tables, calls))
  d = tmp_path / "hf" / "cifar10" / "data"
  os.makedirs(d)
  for f in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
    (d / f).write_bytes(b"")
  out = sources.load_hf(str(tmp_path / "hf" / "cifar10"), RAW, max_train=10)
  assert calls[0] == ("load_dataset", "parquet",
                      {"train": [str(d / "train-00000-of-00001.parquet")],
                       "test": [str(d / "test-00000-of-00001.parquet")]})
  assert out["train"].classes == ("cat", "dog") and len(out["train"].y) == 10
  want = np.stack([np.asarray(r["image"]) for r in tables["test-00000-of-00001.parquet"]])
  np.testing.assert_array_equal(np.round(out["test"].x * 255).astype(np.uint8), want)
  np.testing.assert_array_equal(out["test"].y, [0, 1, 0, 1])
  saved = tmp_path / "saved"
  os.makedirs(saved)
  (saved / "dataset_dict.json").write_text("{}")
  out = sources.load_hf(str(saved), RAW)
  assert calls[-1] == ("load_from_disk", str(saved)) and set(out) == {"train"}
  with pytest.raises(ValueError, match="label_column: column 'fine' not in"):
    sources.load_hf(str(saved), RAW, label_column="fine")


def test_missing_library_is_a_clear_error_and_reported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  os.makedirs(tmp_path / "hf" / "mnist")
  (tmp_path / "hf" / "mnist" / "train.parquet").write_bytes(b"")
  with pytest.raises(ImportError, match="loader 'hf' needs `datasets`, which is not installed"):
    sources.load_hf(str(tmp_path / "hf" / "mnist"))
  with pytest.raises(ImportError, match="loader 'tfds' needs `tensorflow_datasets`"):
    sources.load_tfds("mnist", str(tmp_path))
  report = data.describe_missing(str(tmp_path), ["mnist"])
  assert "exists but `datasets` is not installed" in report
