"""stability.merging.linear: average, weighted average, task arithmetic == per-model numpy
references; chunking over many groups; sharded stacks."""
import jax
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import GROUPS, assert_tree_close, items, stack_ref, trees


def _ref_linear(x0, stack, groups, coef, coef0):
  """Per group, per leaf: c0 x0 + sum_m c_m x_m, in float64."""
  out = []
  for g, row in enumerate(groups):
    merged = {}
    for (p, a0), (_, s) in zip(items(x0), items(stack)):
      acc = coef0[g] * a0
      for m, i in enumerate(row):
        acc = acc + coef[g][m] * s[i]
      merged[p] = acc
    out.append(merged)
  return stack_ref(out, x0)


def test_average_matches_reference():
  x0, stack = trees()
  got = merging.average(x0, stack, GROUPS)
  want = _ref_linear(x0, stack, GROUPS, np.full(GROUPS.shape, 1 / 3), np.zeros(4))
  assert_tree_close(got, want)


def test_weighted_average_matches_reference():
  x0, stack = trees()
  w = np.random.default_rng(1).uniform(0.1, 2.0, GROUPS.shape)
  want = _ref_linear(x0, stack, GROUPS, w / w.sum(1, keepdims=True), np.zeros(4))
  assert_tree_close(merging.average(x0, stack, GROUPS, w), want)
  assert_tree_close(merging.weighted_average(x0, stack, GROUPS, w, chunk_size=3), want)


def test_task_arithmetic_matches_reference():
  x0, stack = trees()
  w = np.random.default_rng(3).uniform(0.5, 1.5, GROUPS.shape)
  want = _ref_linear(x0, stack, GROUPS, 0.7 * w, 1 - 0.7 * w.sum(1))
  for chunk in (None, 3):
    assert_tree_close(merging.task_arithmetic(x0, stack, GROUPS, w, lam=0.7, chunk_size=chunk),
                      want)


def test_task_arithmetic_with_lam_one_over_m_is_the_average():
  x0, stack = trees()
  assert_tree_close(merging.task_arithmetic(x0, stack, GROUPS, lam=1 / 3),
                    merging.average(x0, stack, GROUPS), rtol=1e-5, atol=1e-6)


def test_many_groups_chunked_average():
  x0, stack = trees(E=50)
  groups = np.random.default_rng(13).integers(0, 50, (2000, 6)).astype(np.int32)
  got = merging.average(x0, stack, groups, chunk_size=256)
  want = _ref_linear(x0, stack, groups[::97], np.full((len(groups[::97]), 6), 1 / 6),
                     np.zeros(len(groups[::97])))
  assert_tree_close(jax.tree.map(lambda a: a[::97], got), want)


def test_sharded_stack_gives_the_same_average():
  if jax.device_count() < 2:
    pytest.skip("needs several devices")
  n = jax.device_count()
  x0, stack = trees(E=2 * n)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("expert",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  sharded = jax.device_put(stack, sharding)
  groups = np.random.default_rng(14).integers(0, 2 * n, (10, 3)).astype(np.int32)
  assert_tree_close(merging.average(x0, sharded, groups), merging.average(x0, stack, groups),
                    rtol=1e-6, atol=1e-7)
