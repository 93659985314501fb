"""Task suites: size, disjoint pools, determinism, subsets."""
import hashlib

import numpy as np
import pytest

from stability import tasks


def _hashes(x):
  return {hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in x}


def test_default_suite_has_20_plus_distinct_tasks_with_varied_classes():
  s = tasks.get_suite("default", 0)
  assert len(s.tasks) >= 20 and len(set(s.task_names)) == len(s.tasks)
  assert {t.num_classes for t in s.tasks} >= {2, 3, 5, 10}
  # distinct tasks: no two tasks share both their training images and labels
  sig = {(hashlib.sha1(t.x_train.tobytes()).hexdigest(), t.y_train.tobytes()) for t in s.tasks}
  assert len(sig) == len(s.tasks)
  for t in s.tasks:
    assert t.y_train.max() < t.num_classes and t.x_train.dtype == np.float32
    assert 0.0 <= t.x_train.min() and t.x_train.max() <= 1.0


@pytest.mark.parametrize("name", ["default", "tiny"])
def test_pools_are_disjoint_and_pretraining_never_touches_test_data(name):
  s = tasks.get_suite(name, 0)
  pre = _hashes(s.x_pretrain)
  for t in s.tasks:
    tr, te, gh = _hashes(t.x_train), _hashes(t.x_test), _hashes(t.x_ghost)
    assert not (tr & te) and not (tr & gh) and not (te & gh), t.name
    assert not (pre & te), t.name
  if name == "default":  # untransformed MNIST pool vs pretraining: disjoint source images
    mnist = s.tasks[s.index("mnist")]
    assert not (pre & (_hashes(mnist.x_train) | _hashes(mnist.x_ghost)))


def test_suite_is_deterministic_and_seed_dependent():
  a = tasks.default_suite(0)
  b = tasks.default_suite(0)
  c = tasks.default_suite(1)
  np.testing.assert_array_equal(a.tasks[7].x_train, b.tasks[7].x_train)
  assert not np.array_equal(a.tasks[0].y_train, c.tasks[0].y_train)


def test_subsets_are_deterministic_nested_and_sized():
  s1 = tasks.subset_indices(100, 0.5, seed=3, task_index=2)
  s2 = tasks.subset_indices(100, 0.8, seed=3, task_index=2)
  assert len(s1) == 50 and len(s2) == 80 and len(set(s2)) == 80
  assert set(s1) <= set(s2)
  np.testing.assert_array_equal(s1, tasks.subset_indices(100, 0.5, seed=3, task_index=2))
  with pytest.raises(ValueError, match="data_ratio"):
    tasks.subset_size(100, 1.5)


def test_packed_arrays_hold_train_then_ghost_rows():
  s = tasks.get_suite("tiny", 0)
  a = s.arrays()
  for i, t in enumerate(s.tasks):
    n = t.n_train
    np.testing.assert_array_equal(a.x_pool[i, :n], t.x_train)
    np.testing.assert_array_equal(a.y_pool[i, n:n + len(t.y_ghost)], t.y_ghost)
    assert a.n_test[i] == len(t.y_test)


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="suite: unknown suite 'nope'"):
    tasks.get_suite("nope")
  with pytest.raises(ValueError, match="task: unknown task"):
    tasks.get_suite("tiny").index("mnist")
