"""Suites from datasets on disk: normalisation options, disjoint and cached pools, a named
pretraining set, errors, and a suite from an image folder that trains."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from stability import data
from stability import experts as experts_lib
from stability import models
from stability import sharding
from stability import train
from stability.data import disk


def test_normalisation_options(tmp_path, write_folder, class_images):
  write_folder(tmp_path / "t", {"train": class_images(0, ["a", "b"], 12)})
  s = disk.disk_suite(0, data_root=str(tmp_path), image_size=4, normalize="task")
  flat = s.tasks[0].x_train.reshape(-1, 3)
  np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(flat.std(0), 1, atol=1e-4)
  s = disk.disk_suite(0, data_root=str(tmp_path), image_size=4, normalize="imagenet")
  raw = disk.disk_suite(0, data_root=str(tmp_path), image_size=4)
  np.testing.assert_allclose(s.tasks[0].x_test * data.IMAGENET_STD + data.IMAGENET_MEAN,
                             raw.tasks[0].x_test, atol=1e-6)
  # The same statistics as a (mean, std) pair of lists, as a config gives them: nested lists
  # must still key the suite cache.
  pair = data.get_suite("disk", 0, data_root=str(tmp_path), image_size=4,
                        normalize=[list(map(float, data.IMAGENET_MEAN)),
                                   list(map(float, data.IMAGENET_STD))])
  np.testing.assert_allclose(pair.tasks[0].x_test, s.tasks[0].x_test, atol=1e-6)
  with pytest.raises(ValueError, match="normalize: 'imagenet' needs channels=3"):
    disk.disk_suite(0, data_root=str(tmp_path), channels=1, normalize="imagenet")
  with pytest.raises(ValueError, match="normalize"):
    disk.disk_suite(0, data_root=str(tmp_path), normalize="zscore")


def test_bad_suite_options_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="tasks: unknown paper task"):
    disk.paper20_suite(0, data_root=str(tmp_path), tasks=("imagenet",))
  with pytest.raises(ValueError, match="data_root: a suite read from disk needs"):
    data.get_suite("paper20", 0)


def test_disk_suite_pools_are_disjoint_deterministic_and_cached(tmp_path, make_root, row_hashes):
  root = make_root(tmp_path)
  s = data.get_suite("disk", 0, data_root=root, image_size=8, augment_copies=1)
  assert s is data.get_suite("disk", 0, data_root=root, image_size=8, augment_copies=1)
  assert s.task_names == ("shapes", "tones") and s.image_shape == (8, 8, 3)
  pre = row_hashes(s.x_pretrain)
  for t in s.tasks:
    assert t.num_classes == 3 and len(t.y_test) == 12
    n0 = t.n_train // 2  # originals, then one augmented view of each
    np.testing.assert_array_equal(t.y_train[:n0], t.y_train[n0:])
    tr, te, gh = row_hashes(t.x_train[:n0]), row_hashes(t.x_test), row_hashes(t.x_ghost)
    assert not (tr & te) and not (tr & gh) and not (te & gh) and not (pre & (tr | gh | te))
    assert n0 + len(t.y_ghost) == 48 - 5  # 10% of 48 train rows held out for pretraining
  assert len(s.y_pretrain) == 10 and s.pretrain_classes == 3
  again = disk.disk_suite(0, data_root=root, image_size=8, augment_copies=1)
  np.testing.assert_array_equal(again.tasks[1].x_train, s.tasks[1].x_train)
  seed0, seed1 = (disk.disk_suite(k, data_root=root, image_size=8) for k in (0, 1))
  assert not np.array_equal(seed0.tasks[0].y_train, seed1.tasks[0].y_train)
  cache = str(tmp_path / "cache")
  a = disk.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  assert len(os.listdir(cache)) == 2
  b = disk.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  np.testing.assert_array_equal(a.tasks[0].x_train, b.tasks[0].x_train)
  np.testing.assert_array_equal(a.x_pretrain, b.x_pretrain)
  # An image edited inside a class folder (the task folder's own mtime does not change) is
  # read again, not served from the cache.
  img = os.path.join(root, "shapes", "train", "a", "000.png")
  Image.fromarray(np.zeros_like(np.asarray(Image.open(img)))).save(img)
  os.utime(img, ns=(os.stat(img).st_atime_ns, os.stat(img).st_mtime_ns + 10 ** 9))
  c = disk.disk_suite(0, data_root=root, image_size=8, cache_dir=cache)
  assert len(os.listdir(cache)) == 3
  total = lambda su: float(su.x_pretrain.sum()) + sum(
      float(t.x_train.sum() + t.x_test.sum() + t.x_ghost.sum()) for t in su.tasks)
  assert total(c) < total(b)  # the zeroed image is in it


def test_suite_from_an_image_folder_root_trains(tmp_path, make_root):
  suite = disk.disk_suite(0, data_root=make_root(tmp_path), image_size=8, channels=1)
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


def test_a_named_pretraining_dataset_feeds_pretraining_and_is_not_a_task(tmp_path, make_root,
                                                                         write_folder,
                                                                         class_images):
  root = make_root(tmp_path)
  write_folder(tmp_path / "pretrain", {"train": class_images(5, ["p", "q", "r", "s"], 6)})
  s = disk.disk_suite(0, data_root=root, image_size=8, pretrain="pretrain")
  assert s.task_names == ("shapes", "tones") and s.pretrain_classes == 4
  want = data.load_image_folder(str(tmp_path / "pretrain"), data.Preprocess(size=8))
  np.testing.assert_array_equal(s.x_pretrain, want["train"].x)
  assert all(t.n_train + len(t.y_ghost) == 48 for t in s.tasks)  # nothing held out
  with pytest.raises(ValueError, match="missing imagenet: looked at"):
    disk.disk_suite(0, data_root=root, pretrain="imagenet")
