"""Suites: the registry, the embedded suites (size, disjoint pools, determinism), their arrays
pinned bit for bit, and the package's public API."""
import dataclasses
import hashlib

import numpy as np
import pytest

from stability import data
from stability.data import suites

# sha256 over every array of get_suite(name, 0).arrays(), x_pretrain and y_pretrain (name, dtype,
# shape, bytes), then the task names and pretrain_classes. Computed through stability.tasks
# before the move into stability/data; a change here changes every study's results.
PINNED = {
    "tiny": "268113e9c8f4df6aed0d2a3d6dc9e829d59aa73f30f8be4eba95a606b5fc46d1",
    "default": "150e20afcbafc53bc86ed09316ff2ca40644330fd0f00b99d257fff5d213f992",
    "mnist28": "74d0c5c1439a91fcb3b5a6a115b59d19e8c264884e981974392f5f2738eb1352",
}


def _digest(suite: data.Suite) -> str:
  h = hashlib.sha256()
  a = suite.arrays()
  named = [(f.name, getattr(a, f.name)) for f in dataclasses.fields(a)]
  named += [("x_pretrain", suite.x_pretrain), ("y_pretrain", suite.y_pretrain)]
  for name, v in named:
    v = np.ascontiguousarray(v)
    for part in (name, str(v.dtype), str(v.shape)):
      h.update(part.encode())
    h.update(v.tobytes())
  h.update(repr((suite.task_names, suite.pretrain_classes)).encode())
  return h.hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_embedded_suites_are_bit_identical_to_the_pinned_arrays(name):
  assert _digest(data.get_suite(name, 0)) == PINNED[name]


def test_default_suite_has_20_plus_distinct_tasks_with_varied_classes():
  s = data.get_suite("default", 0)
  assert len(s.tasks) >= 20 and len(set(s.task_names)) == len(s.tasks)
  assert {t.num_classes for t in s.tasks} >= {2, 3, 5, 10}
  # distinct tasks: no two tasks share both their training images and labels
  sig = {(hashlib.sha1(t.x_train.tobytes()).hexdigest(), t.y_train.tobytes()) for t in s.tasks}
  assert len(sig) == len(s.tasks)
  for t in s.tasks:
    assert t.y_train.max() < t.num_classes and t.x_train.dtype == np.float32
    assert 0.0 <= t.x_train.min() and t.x_train.max() <= 1.0


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_pools_are_disjoint_and_pretraining_never_touches_test_data(name, row_hashes):
  s = data.get_suite(name, 0)
  pre = row_hashes(s.x_pretrain)
  for t in s.tasks:
    tr, te, gh = row_hashes(t.x_train), row_hashes(t.x_test), row_hashes(t.x_ghost)
    assert not (tr & te) and not (tr & gh) and not (te & gh), t.name
    assert not (pre & te), t.name
  if name == "default":  # untransformed MNIST pool vs pretraining: disjoint source images
    mnist = s.tasks[s.index("mnist")]
    assert not (pre & (row_hashes(mnist.x_train) | row_hashes(mnist.x_ghost)))


def test_suite_is_deterministic_and_seed_dependent():
  a = suites.default_suite(0)
  b = suites.default_suite(0)
  c = suites.default_suite(1)
  np.testing.assert_array_equal(a.tasks[7].x_train, b.tasks[7].x_train)
  assert not np.array_equal(a.tasks[0].y_train, c.tasks[0].y_train)


def test_unknown_suite_is_an_error_and_registered_names_are_listed():
  with pytest.raises(ValueError, match="suite: unknown suite 'nope'"):
    data.get_suite("nope")
  assert set(data.suite_names()) >= {"default", "disk", "mnist28", "paper20", "tiny"}


def test_package_reexports_the_public_api():
  for name in data.__all__:
    assert getattr(data, name) is not None, name
  assert data.get_suite("tiny", 0) is suites.get_suite("tiny", 0)  # one registry, one cache
