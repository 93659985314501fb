"""Task / Suite / TaskArrays: packing into padded arrays, task lookup."""
import numpy as np
import pytest

from stability import data


def test_packed_arrays_hold_train_then_ghost_rows():
  s = data.get_suite("tiny", 0)
  a = s.arrays()
  for i, t in enumerate(s.tasks):
    n = t.n_train
    np.testing.assert_array_equal(a.x_pool[i, :n], t.x_train)
    np.testing.assert_array_equal(a.y_pool[i, n:n + len(t.y_ghost)], t.y_ghost)
    assert a.n_test[i] == len(t.y_test)


def test_unknown_task_name_is_an_error():
  with pytest.raises(ValueError, match="task: unknown task"):
    data.get_suite("tiny").index("mnist")
