"""Splits: train / test / ghost pools and expert subsets, keyed and disjoint."""
import numpy as np
import pytest

from stability.data import splits


def test_subsets_are_deterministic_nested_and_sized():
  s1 = splits.subset_indices(100, 0.5, seed=3, task_index=2)
  s2 = splits.subset_indices(100, 0.8, seed=3, task_index=2)
  assert len(s1) == 50 and len(s2) == 80 and len(set(s2)) == 80
  assert set(s1) <= set(s2)
  np.testing.assert_array_equal(s1, splits.subset_indices(100, 0.5, seed=3, task_index=2))
  with pytest.raises(ValueError, match="data_ratio"):
    splits.subset_size(100, 1.5)


def test_split_task_cuts_disjoint_test_ghost_and_train_pools():
  x = np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1)
  y = np.arange(40, dtype=np.int32) % 4
  t = splits.split_task("t", x, y, 4, seed=0, key=7, test_frac=0.25, ghost_frac=0.1)
  assert (len(t.y_test), len(t.y_ghost), t.n_train, t.num_classes) == (10, 4, 26, 4)
  rows = np.concatenate([t.x_test, t.x_ghost, t.x_train]).ravel()
  np.testing.assert_array_equal(np.sort(rows), x.ravel())  # a partition of the rows
  np.testing.assert_array_equal(t.y_train, t.x_train.ravel().astype(np.int32) % 4)
  again = splits.split_task("t", x, y, 4, seed=0, key=7, test_frac=0.25, ghost_frac=0.1)
  np.testing.assert_array_equal(again.x_train, t.x_train)
  other = splits.split_task("t", x, y, 4, seed=0, key=8, test_frac=0.25, ghost_frac=0.1)
  assert not np.array_equal(other.x_train, t.x_train)
  assert len(splits.split_task("t", x, y, 4, 0, 7, 0.0, 0.001).y_ghost) == 1  # at least one
