"""stability.merging.batch_stats on a synthetic BatchNorm-like tree: 'average' replaces the
statistics by the members' mean, 'frozen' by x0's, parameters stay as merged; bad inputs.
(`recompute`, which needs a BatchNorm model, is tested in tests/backbones_test.py.)"""
import jax
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import GROUPS, trees


def _bn_trees():
  """x0 and a stack [7, ...] with 'params' and 'batch_stats' collections."""
  x0, stack = trees()
  s0, ss = trees(seed=1, scale=0.5)
  return {"params": x0, "batch_stats": s0}, {"params": stack, "batch_stats": ss}


def test_average_and_frozen_statistics_leave_the_parameters_as_merged():
  x0, stack = _bn_trees()
  # Task arithmetic treats the statistics as parameters: they are not the members' mean.
  merged = merging.task_arithmetic(x0, stack, GROUPS, lam=1.0)
  mean = merging.average(x0["batch_stats"], stack["batch_stats"], GROUPS)
  avg = merging.merge_batch_stats(merged, x0, stack, GROUPS)
  frozen = merging.merge_batch_stats(merged, x0, stack, GROUPS, mode="frozen")
  for a, b in zip(jax.tree.leaves(avg["batch_stats"]), jax.tree.leaves(mean)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(merged["batch_stats"]),
                                                   jax.tree.leaves(mean)))
  for a, b in zip(jax.tree.leaves(frozen["batch_stats"]), jax.tree.leaves(x0["batch_stats"])):
    np.testing.assert_array_equal(a, np.broadcast_to(b, (len(GROUPS),) + b.shape))
  for out in (avg, frozen):
    for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(merged["params"])):
      np.testing.assert_array_equal(a, b)


def test_bad_inputs():
  x0, stack = _bn_trees()
  merged = merging.average(x0, stack, GROUPS)
  with pytest.raises(ValueError, match=r"mode: unknown 'ema'; allowed: average, frozen, "
                                       r"recompute"):
    merging.merge_batch_stats(merged, x0, stack, GROUPS, mode="ema")
  with pytest.raises(ValueError, match=r"x0: has no 'batch_stats' collection"):
    merging.merge_batch_stats(merged["params"], x0["params"], stack["params"], GROUPS)
  with pytest.raises(ValueError, match=r"merged: must be x0's tree with a leading axis G=4"):
    merging.merge_batch_stats(jax.tree.map(lambda a: a[:2], merged), x0, stack, GROUPS)
  with pytest.raises(ValueError, match=r"model: recompute needs the Model"):
    merging.merge_batch_stats(merged, x0, stack, GROUPS, mode="recompute")
