"""stability.merge: every merge == a per-model numpy reference; properties; bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merge

TOL = dict(rtol=1e-5, atol=1e-5)


def _trees(seed=0, E=7, scale=0.1):
  """Small random backbone-like tree (x0, stack [E, ...]) in float32."""
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": {"kernel": (5, 4), "bias": (4,)}, "Conv_0": {"kernel": (3, 3, 2, 3)}}
  x0 = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                    is_leaf=lambda s: isinstance(s, tuple))
  stack = jax.tree.map(lambda a: (a + scale * rng.normal(size=(E,) + a.shape)).astype(np.float32),
                       x0)
  return x0, stack


def _items(tree):
  """(path, numpy leaf) pairs in a fixed order, for reference loops."""
  return [(jax.tree_util.keystr(p), np.asarray(a, np.float64))
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _assert_tree_close(got, want, **tol):
  tol = tol or TOL
  for (p, a), (_, b) in zip(_items(got), _items(want)):
    np.testing.assert_allclose(a, b, err_msg=p, **tol)


def _ref_linear(x0, stack, groups, coef, coef0):
  """Per group, per leaf: c0 x0 + sum_m c_m x_m, in float64."""
  out = []
  for g, row in enumerate(groups):
    merged = {}
    for (p, a0), (_, s) in zip(_items(x0), _items(stack)):
      acc = coef0[g] * a0
      for m, i in enumerate(row):
        acc = acc + coef[g][m] * s[i]
      merged[p] = acc
    out.append(merged)
  return _stack_ref(out, x0)


def _stack_ref(per_group, like):
  """List over groups of {path: leaf} -> tree like `like` with leaves [G, ...]."""
  paths = [p for p, _ in _items(like)]
  leaves = [np.stack([d[p] for d in per_group]) for p in paths]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


GROUPS = np.array([[0, 1, 2], [3, 4, 5], [6, 0, 3], [2, 5, 1]], np.int32)


# ---------------------------------------------------------------------------------------------
# average / weighted average / task arithmetic


def test_average_matches_reference():
  x0, stack = _trees()
  got = merge.average(x0, stack, GROUPS)
  want = _ref_linear(x0, stack, GROUPS, np.full(GROUPS.shape, 1 / 3), np.zeros(4))
  _assert_tree_close(got, want)


def test_weighted_average_matches_reference():
  x0, stack = _trees()
  w = np.random.default_rng(1).uniform(0.1, 2.0, GROUPS.shape)
  got = merge.average(x0, stack, GROUPS, w)
  want = _ref_linear(x0, stack, GROUPS, w / w.sum(1, keepdims=True), np.zeros(4))
  _assert_tree_close(got, want)


def test_identical_experts_average_to_that_expert():
  x0, stack = _trees(E=1)
  stack = jax.tree.map(lambda s: jnp.repeat(s, 4, axis=0), stack)
  got = merge.average(x0, stack, np.array([[0, 1, 2, 3]]))
  _assert_tree_close(got, jax.tree.map(lambda s: s[:1], stack), rtol=1e-6, atol=1e-6)


def test_chunked_equals_unchunked():
  x0, stack = _trees(E=9)
  groups = np.random.default_rng(2).integers(0, 9, (37, 4)).astype(np.int32)
  full = merge.average(x0, stack, groups)
  for chunk in (1, 5, 16, 64):
    _assert_tree_close(merge.average(x0, stack, groups, chunk_size=chunk), full,
                       rtol=1e-6, atol=1e-7)
