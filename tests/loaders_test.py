"""Data loaders on data the tests write: round trips, labels, resize, channels, augmentation,
normalisation, bad input, TFDS / Hugging Face through fake modules, missing-data reports, and a
suite from an image folder that trains."""
import hashlib
import os
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from stability import experts as experts_lib
from stability import loaders
from stability import models
from stability import sharding
from stability import tasks
from stability import train

RAW = loaders.Preprocess(size=None, channels=None)  # no resize, no channel change


def _rgb(rng, n, size=8):
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(root, splits):
  """root/<split>/<class>/<i>.png from {split: {class: uint8 [n, H, W(, C)]}}."""
  for split, classes in splits.items():
    for c, ims in classes.items():
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i, im in enumerate(ims):
        Image.fromarray(im).save(os.path.join(d, f"{i:03d}.png"))


def class_images(seed, classes, n, size=8):
  """Images with a class-dependent mean, so a model can learn them."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, c in enumerate(classes):
    base = np.full((n, size, size, 3), 40 + 80 * k, np.int64)
    out[c] = np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
  return out


def _hashes(x):
  return {hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x}


# ---------------------------------------------------------------------------------------------
# Loaders and preprocessing.

def test_folder_pixels_round_trip_and_labels_follow_sorted_class_folders(tmp_path):
  rng = np.random.default_rng(0)
  train = {"zebra": _rgb(rng, 3), "ant": _rgb(rng, 2), "moth": _rgb(rng, 4)}
  test = {"moth": _rgb(rng, 2), "ant": _rgb(rng, 1)}  # a subset of the train classes
  write_folder(tmp_path, {"train": train, "test": test})
  out = loaders.load_image_folder(str(tmp_path), RAW)
  assert out["train"].classes == ("ant", "moth", "zebra")
  for split, src in (("train", train), ("test", test)):
    s = out[split]
    assert s.x.dtype == np.float32 and s.y.dtype == np.int32
    want_x = np.concatenate([src[c] for c in sorted(src)])
    want_y = np.concatenate([np.full(len(src[c]), s.classes.index(c)) for c in sorted(src)])
    np.testing.assert_array_equal(np.round(s.x * 255).astype(np.uint8), want_x)
    np.testing.assert_array_equal(s.y, want_y)


def test_npz_and_array_files_load_the_same_splits(tmp_path):
  rng = np.random.default_rng(1)
  x_tr, x_te = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), _rgb(rng, 4, 6)[..., 0]
  y_tr, y_te = rng.integers(0, 3, 10), np.array([0, 2, 1, 1])
  classes = np.array(["a", "b", "c"])
  np.savez(tmp_path / "t.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
           classes=classes)
  os.makedirs(tmp_path / "t")
  for k, v in dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te).items():
    np.save(tmp_path / "t" / f"{k}.npy", v)
  (tmp_path / "t" / "classes.txt").write_text("a\nb\nc\n")
  prep = loaders.Preprocess(size=None, channels=3)
  a = loaders.load_npz(str(tmp_path / "t.npz"), prep)
  b = loaders.load_arrays(str(tmp_path / "t"), prep)
  assert a["train"].classes == b["train"].classes == ("a", "b", "c")
  for s in ("train", "test"):
    np.testing.assert_array_equal(a[s].x, b[s].x)
    np.testing.assert_array_equal(a[s].y, b[s].y)
  np.testing.assert_array_equal(a["train"].x[..., 1], x_tr / np.float32(255))  # grey -> RGB
  assert a["train"].x.shape == (10, 6, 6, 3)


def test_resize_reproduces_affine_images_at_pixel_centres():
  """Bilinear with a symmetric, normalised filter is exact on affine images away from the border:
  output pixel j samples the input at (j + 0.5) * in / out - 0.5 (half-pixel centres)."""
  def ramp(r, c):
    return 0.1 + 0.02 * r + 0.01 * c

  for h, w, S in ((24, 24, 8), (6, 6, 9), (30, 30, 10)):
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = ramp(r, c).astype(np.float32)[..., None]
    got = loaders.resize(x, S)[..., 0]
    j = (np.arange(S) + 0.5) * h / S - 0.5
    ref = ramp(j[:, None], ((np.arange(S) + 0.5) * w / S - 0.5)[None, :])
    m = 2 if S < h else 1  # skip the border, where the filter is clipped and renormalised
    np.testing.assert_allclose(got[m:-m, m:-m], ref[m:-m, m:-m], atol=2e-6)
  const = np.full((13, 17, 3), 0.3, np.float32)
  np.testing.assert_allclose(loaders.resize(const, 5, center_crop=False), 0.3, atol=1e-6)
  # uint8 data and its float version resize identically (one float code path)
  u8 = np.random.default_rng(2).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
  prep = loaders.Preprocess(size=7, channels=None)
  np.testing.assert_allclose(loaders.preprocess(u8, prep),
                             loaders.preprocess(u8 / np.float32(255), prep), atol=1e-6)


def test_resize_without_pil_is_tasks_align_corners_bilinear(monkeypatch):
  x = np.random.default_rng(3).random((5, 7, 2)).astype(np.float32)
  monkeypatch.setattr(loaders, "Image", None)
  got = loaders.resize(x, 9, center_crop=False)
  ref = tasks._resize_bilinear(np.moveaxis(x, -1, 0), 9)
  np.testing.assert_allclose(got, np.moveaxis(ref, 0, -1), atol=1e-6)


def test_center_crop_keeps_the_central_square():
  cols = np.tile(np.arange(14, dtype=np.float32) / 14, (10, 1))[..., None]  # 10 x 14
  np.testing.assert_array_equal(loaders.resize(cols, 10)[..., 0], cols[:, 2:12, 0])


def test_channels_grey_to_rgb_and_rgb_to_luma(tmp_path):
  rng = np.random.default_rng(4)
  grey = rng.integers(0, 256, (2, 5, 5), dtype=np.uint8)
  rgb = _rgb(rng, 2, 5)
  x3 = loaders.preprocess(grey, loaders.Preprocess(size=None, channels=3))
  assert x3.shape == (2, 5, 5, 3) and np.all(x3[..., 0] == x3[..., 2])
  x1 = loaders.preprocess(rgb, loaders.Preprocess(size=None, channels=1))
  pil_luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
  np.testing.assert_allclose(x1[..., 0] * 255, pil_luma, atol=0.51)
  rgba = np.concatenate([rgb, np.full((2, 5, 5, 1), 7, np.uint8)], -1)  # alpha is dropped
  np.testing.assert_array_equal(loaders.preprocess(rgba, RAW), loaders.preprocess(rgb, RAW))


def test_augment_is_keyed_deterministic_and_a_padded_crop_or_flip():
  x = np.random.default_rng(5).random((16, 6, 6, 2)).astype(np.float32)
  a, b = loaders.augment(x, 7), loaders.augment(x, 7)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, loaders.augment(x, 8))
  np.testing.assert_array_equal(loaders.augment(x, 7, pad=0, flip=False), x)
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flipped = 0
  for i in range(len(x)):
    views = [(f, padded[i, dy:dy + 6, dx:dx + 6][:, ::-1 if f else 1])
             for dy in range(9) for dx in range(9) for f in (0, 1)]
    match = [f for f, v in views if np.array_equal(v, a[i])]
    assert match, f"row {i} is not a crop of the padded image"
    flipped += min(match)
  assert 0 < flipped < len(x)  # both flips happen


def test_normalisation_statistics_and_options(tmp_path):
  rng = np.random.default_rng(6)
  x = rng.random((50, 4, 4, 3)).astype(np.float32) * [0.2, 0.5, 1.0]
  mean, std = loaders.channel_stats(x)
  z = loaders.normalize(x, mean, std)
  np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)
  write_folder(tmp_path / "t", {"train": class_images(0, ["a", "b"], 12)})
  s = loaders.disk_suite(0, data_root=str(tmp_path), image_size=4, normalize="task")
  flat = s.tasks[0].x_train.reshape(-1, 3)
  np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(flat.std(0), 1, atol=1e-4)
  s = loaders.disk_suite(0, data_root=str(tmp_path), image_size=4, normalize="imagenet")
  raw = loaders.disk_suite(0, data_root=str(tmp_path), image_size=4)
  np.testing.assert_allclose(s.tasks[0].x_test * loaders.IMAGENET_STD + loaders.IMAGENET_MEAN,
                             raw.tasks[0].x_test, atol=1e-6)
  # The same statistics as a (mean, std) pair of lists, as a config gives them: nested lists
  # must still key the suite cache.
  pair = tasks.get_suite("disk", 0, data_root=str(tmp_path), image_size=4,
                         normalize=[list(map(float, loaders.IMAGENET_MEAN)),
                                    list(map(float, loaders.IMAGENET_STD))])
  np.testing.assert_allclose(pair.tasks[0].x_test, s.tasks[0].x_test, atol=1e-6)
  with pytest.raises(ValueError, match="normalize: 'imagenet' needs channels=3"):
    loaders.disk_suite(0, data_root=str(tmp_path), channels=1, normalize="imagenet")
  with pytest.raises(ValueError, match="normalize"):
    loaders.disk_suite(0, data_root=str(tmp_path), normalize="zscore")


def test_bad_input_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="path: no train folder"):
    loaders.load_image_folder(str(tmp_path / "nope"))
  write_folder(tmp_path / "f", {"train": class_images(0, ["a"], 2)})
  os.makedirs(tmp_path / "f" / "train" / "empty")
  with pytest.raises(ValueError, match="path: class folder .*empty has no images"):
    loaders.load_image_folder(str(tmp_path / "f"))
  x = np.zeros((6, 4, 4), np.uint8)
  np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.zeros(5, int))
  with pytest.raises(ValueError, match="y_train: 5 labels for 6 images"):
    loaders.load_npz(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "float.npz", x_train=x + 255.0, y_train=np.zeros(6, int))
  with pytest.raises(ValueError, match=r"x_train: float images must .* lie in \[0, 1\]"):
    loaders.load_npz(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "names.npz", x_train=x, y_train=np.arange(6), classes=np.array(["a"]))
  with pytest.raises(ValueError, match="classes: label 5 but only 1 class names"):
    loaders.load_npz(str(tmp_path / "names.npz"))
  with pytest.raises(ValueError, match="kind: unknown loader kind 'csv'"):
    loaders.load("csv", str(tmp_path))
  with pytest.raises(ValueError, match="tasks: unknown paper task"):
    loaders.paper20_suite(0, data_root=str(tmp_path), tasks=("imagenet",))
  with pytest.raises(ValueError, match="data_root: a suite read from disk needs"):
    tasks.get_suite("paper20", 0)
  with pytest.raises(ValueError, match="image_size"):
    loaders.Preprocess(size=0)
  with pytest.raises(ValueError, match="channels"):
    loaders.Preprocess(channels=2)


# ---------------------------------------------------------------------------------------------
# TFDS and Hugging Face through fake modules with the same API calls.

def fake_tfds(data, calls):
  """tensorflow_datasets with builder(name, data_dir).info / .as_dataset and as_numpy."""
  mod = types.ModuleType("tensorflow_datasets")

  class Builder:
    def __init__(self, name, data_dir):
      calls.append(("builder", name, data_dir))
      self.name = name
      splits = {s: types.SimpleNamespace(num_examples=len(v[1]))
                for s, v in data[name]["splits"].items()}
      self.info = types.SimpleNamespace(
          splits=splits, supervised_keys=("image", "label"),
          features={"label": types.SimpleNamespace(names=data[name]["names"])})

    def as_dataset(self, *, split, as_supervised):
      assert as_supervised
      calls.append(("as_dataset", self.name, split))
      ims, ys = data[self.name]["splits"][split]
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


def test_tfds_loader_reads_prepared_data_without_downloading(tmp_path, monkeypatch):
  rng = np.random.default_rng(7)
  ims = [rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8) for i in range(20)]
  ys = list(rng.integers(0, 3, 20))
  calls = []
  data = {"eurosat/rgb": {"names": ["forest", "river", "sea"], "splits": {"train": (ims, ys)}}}
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(data, calls))
  os.makedirs(tmp_path / "tfds" / "eurosat" / "rgb" / "2.0.0")
  assert loaders.find_missing(str(tmp_path), ["eurosat"]) == []
  assert loaders.locate(str(tmp_path), "eurosat") == (
      "tfds", str(tmp_path / "tfds" / "eurosat" / "rgb"))
  prep = loaders.Preprocess(size=6, channels=3)
  s = loaders.paper20_suite(0, data_root=str(tmp_path), tasks="eurosat", image_size=6,
                            test_frac=0.25, ghost_frac=0.1, pretrain_frac=0.1)
  assert calls[0] == ("builder", "eurosat/rgb", str(tmp_path / "tfds"))
  assert ("as_dataset", "eurosat/rgb", "train") in calls
  t = s.tasks[0]
  assert t.num_classes == 3 and s.image_shape == (6, 6, 3)
  assert t.n_train + len(t.y_test) + len(t.y_ghost) + len(s.y_pretrain) == 20  # test carved
  want = loaders.preprocess(ims, prep)
  got = np.concatenate([t.x_train, t.x_test, t.x_ghost, s.x_pretrain])
  assert _hashes(got) == _hashes(want)


def test_hf_loader_reads_local_parquet_and_saved_datasets(tmp_path, monkeypatch):
  rng = np.random.default_rng(8)
  rows = lambda n: [{"image": Image.fromarray(_rgb(rng, 1, 7)[0]), "label": int(i % 2)}
                    for i in range(n)]
  tables = {"train-00000-of-00001.parquet": rows(12), "test-00000-of-00001.parquet": rows(4),
            "saved": rows(5)}
  calls = []
  monkeypatch.setitem(sys.modules, "datasets", fake_datasets(tables, calls))
  d = tmp_path / "hf" / "cifar10" / "data"
  os.makedirs(d)
  for f in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
    (d / f).write_bytes(b"")
  out = loaders.load_hf(str(tmp_path / "hf" / "cifar10"), RAW, max_train=10)
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
  out = loaders.load_hf(str(saved), RAW)
  assert calls[-1] == ("load_from_disk", str(saved)) and set(out) == {"train"}
  with pytest.raises(ValueError, match="label_column: column 'fine' not in"):
    loaders.load_hf(str(saved), RAW, label_column="fine")


def test_missing_library_is_a_clear_error_and_reported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  os.makedirs(tmp_path / "hf" / "mnist")
  (tmp_path / "hf" / "mnist" / "train.parquet").write_bytes(b"")
  with pytest.raises(ImportError, match="loader 'hf' needs `datasets`, which is not installed"):
    loaders.load_hf(str(tmp_path / "hf" / "mnist"))
  with pytest.raises(ImportError, match="loader 'tfds' needs `tensorflow_datasets`"):
    loaders.load_tfds("mnist", str(tmp_path))
  report = loaders.describe_missing(str(tmp_path), ["mnist"])
  assert "exists but `datasets` is not installed" in report


# ---------------------------------------------------------------------------------------------
# Missing-data reports and suites.

def test_find_missing_and_describe_missing_say_where_they_looked(tmp_path):
  write_folder(tmp_path / "mnist", {"train": class_images(0, ["0", "1"], 2)})
  np.savez(tmp_path / "svhn.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1])
  root = str(tmp_path)
  missing = dict(loaders.find_missing(root))
  assert len(missing) == 18 and "mnist" not in missing and "svhn" not in missing
  assert missing["dtd"] == (os.path.join(root, "dtd", "train", "<class>", ""),
                            os.path.join(root, "dtd.npz"),
                            os.path.join(root, "dtd", "x_train.npy"),
                            os.path.join(root, "hf", "dtd", "") + "{*.parquet,*.arrow,"
                            "dataset_dict.json}",
                            os.path.join(root, "tfds", "dtd", ""))
  assert all("tfds" not in p for p in missing["gtsrb"])  # not in the TFDS catalog
  report = loaders.describe_missing(root)
  lines = report.splitlines()
  assert lines[0] == f"18 of 20 datasets missing under {root}:"
  assert len(lines) == 19 and lines[1].startswith("  missing sun397: looked at ")
  assert loaders.describe_missing(root, ["mnist", "svhn"]) == (
      f"all 2 datasets found under {root}")
  with pytest.raises(ValueError, match="data_root: 18 of 20 datasets missing"):
    tasks.get_suite("paper20", 0, data_root=root)
  assert loaders.locate(root, "svhn") == ("npz", os.path.join(root, "svhn.npz"))


def make_root(tmp_path):
  for k, name in enumerate(("shapes", "tones")):
    write_folder(tmp_path / name, {"train": class_images(k, ["a", "b", "c"], 16),
                                   "test": class_images(10 + k, ["a", "b", "c"], 4)})
  return str(tmp_path)


def test_disk_suite_pools_are_disjoint_deterministic_and_cached(tmp_path):
  root = make_root(tmp_path)
  s = tasks.get_suite("disk", 0, data_root=root, image_size=8, augment_copies=1)
  assert s is tasks.get_suite("disk", 0, data_root=root, image_size=8, augment_copies=1)
  assert s.task_names == ("shapes", "tones") and s.image_shape == (8, 8, 3)
  pre = _hashes(s.x_pretrain)
  for t in s.tasks:
    assert t.num_classes == 3 and len(t.y_test) == 12
    n0 = t.n_train // 2  # originals, then one augmented view of each
    np.testing.assert_array_equal(t.y_train[:n0], t.y_train[n0:])
    tr, te, gh = _hashes(t.x_train[:n0]), _hashes(t.x_test), _hashes(t.x_ghost)
    assert not (tr & te) and not (tr & gh) and not (te & gh) and not (pre & (tr | gh | te))
    assert n0 + len(t.y_ghost) == 48 - 5  # 10% of 48 train rows held out for pretraining
  assert len(s.y_pretrain) == 10 and s.pretrain_classes == 3
  again = loaders.disk_suite(0, data_root=root, image_size=8, augment_copies=1)
  np.testing.assert_array_equal(again.tasks[1].x_train, s.tasks[1].x_train)
  seed0, seed1 = (loaders.disk_suite(k, data_root=root, image_size=8) for k in (0, 1))
  assert not np.array_equal(seed0.tasks[0].y_train, seed1.tasks[0].y_train)
  cache = str(tmp_path / "cache")
  a = loaders.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  assert len(os.listdir(cache)) == 2
  b = loaders.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  np.testing.assert_array_equal(a.tasks[0].x_train, b.tasks[0].x_train)
  np.testing.assert_array_equal(a.x_pretrain, b.x_pretrain)
  # An image edited inside a class folder (the task folder's own mtime does not change) is
  # read again, not served from the cache.
  img = os.path.join(root, "shapes", "train", "a", "000.png")
  Image.fromarray(np.zeros_like(np.asarray(Image.open(img)))).save(img)
  os.utime(img, ns=(os.stat(img).st_atime_ns, os.stat(img).st_mtime_ns + 10 ** 9))
  c = loaders.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  assert len(os.listdir(cache)) == 3
  total = lambda su: float(su.x_pretrain.sum()) + sum(
      float(t.x_train.sum() + t.x_test.sum() + t.x_ghost.sum()) for t in su.tasks)
  assert total(c) < total(b)  # the zeroed image is in it


def test_suite_from_an_image_folder_root_trains(tmp_path):
  suite = loaders.disk_suite(0, data_root=make_root(tmp_path), image_size=8, channels=1)
  model = models.get_model("mlp", suite.max_classes, widths=(16,))
  spec = experts_lib.make_experts(suite, task=(0, 1), eta=0.1, b=8, K=10, data_ratio=1.0,
                                  seed=(0, 1))
  backbone = model.init_backbone(jax.random.key(0), suite.image_shape)
  params = experts_lib.init_stack(model, backbone, spec, suite.image_shape)
  trainer = train.Trainer(model, "sgd", spec, train.Pools.from_arrays(suite.arrays()),
                          mesh=sharding.expert_mesh(jax.devices()[:1]), max_chunk=10)
  losses = []
  (_, final), = list(trainer.run(trainer.init(params), [10],
                                 progress=lambda k, loss: losses.append(loss)))
  assert np.all(np.isfinite(np.asarray(losses))) and np.all(np.asarray(final.diverged_at) < 0)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       trainer.unpad(final.params), params)
  assert max(jax.tree.leaves(moved)) > 0


def test_a_named_pretraining_dataset_feeds_pretraining_and_is_not_a_task(tmp_path):
  root = make_root(tmp_path)
  write_folder(tmp_path / "pretrain", {"train": class_images(5, ["p", "q", "r", "s"], 6)})
  s = loaders.disk_suite(0, data_root=root, image_size=8, pretrain="pretrain")
  assert s.task_names == ("shapes", "tones") and s.pretrain_classes == 4
  want = loaders.load_image_folder(str(tmp_path / "pretrain"), loaders.Preprocess(size=8))
  np.testing.assert_array_equal(s.x_pretrain, want["train"].x)
  assert all(t.n_train + len(t.y_ghost) == 48 for t in s.tasks)  # nothing held out
  with pytest.raises(ValueError, match="missing imagenet: looked at"):
    loaders.disk_suite(0, data_root=root, pretrain="imagenet")
