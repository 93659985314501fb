"""stability.merging.select: the exact k-th largest without sorting, and TIES bit-identical to
the previous implementation (32-pass bisection, kept in benchmarks/merge_bench.py)."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging
from stability.merging.select import kth_largest
from tests.merging.helpers import GROUPS, trees


def _bench():
  path = pathlib.Path(__file__).parents[2] / "benchmarks" / "merge_bench.py"
  spec = importlib.util.spec_from_file_location("merge_bench", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _adversarial(rng, D=3000):
  """Rows with many equal magnitudes, zeros, denormals, +-0, inf and NaN, a huge range."""
  tiny = np.float32(1e-45)
  rows = [
      np.zeros(D),                                              # all zeros
      np.full(D, 0.5),                                          # all equal
      np.round(rng.normal(size=D) * 2) / 2,                     # few distinct values
      rng.normal(size=D) * 10.0 ** rng.integers(-40, 30, D),    # huge range, denormals
      np.where(rng.random(D) < 0.7, 0.0, rng.normal(size=D)),   # mostly zeros
      tiny * rng.integers(0, 4, D),                             # denormals only
      np.concatenate([np.full(D // 2, 3.0), rng.normal(size=D - D // 2)]),
      np.where(rng.random(D) < 0.01, np.inf, rng.normal(size=D)),
      np.where(rng.random(D) < 0.3, np.nan, rng.normal(size=D)),
      -np.zeros(D),                                             # negative zeros
  ]
  return np.abs(np.stack(rows).astype(np.float32))


@pytest.mark.parametrize("n", [1, 2, 7, 600, 2999, 3000])
def test_kth_largest_is_exact_on_adversarial_rows(n):
  # Rejects: an off-by-one rank (n vs n+1), a threshold that is not an entry (interpolated), a
  # result that differs from bisection on NaN/inf rows, ties at the threshold mishandled.
  a = _adversarial(np.random.default_rng(n))
  got = np.asarray(jax.jit(jax.vmap(lambda r: kth_largest(r, n)))(a))
  bisect = _bench()._kth_largest_bisect
  old = np.asarray(jax.jit(jax.vmap(lambda r: bisect(r, n)))(a))
  np.testing.assert_array_equal(got.view(np.int32), old.view(np.int32))
  finite = ~np.isnan(a).any(1)
  want = -np.sort(-a[finite], axis=1)[:, n - 1]
  np.testing.assert_array_equal(got[finite], want)


def test_kth_largest_on_smooth_data_matches_sort():
  a = np.abs(np.random.default_rng(0).normal(size=(4, 20_000)).astype(np.float32)) * 0.01
  for n in (1, 4000, 19_999):
    got = np.asarray(jax.vmap(lambda r: kth_largest(r, n))(a))
    np.testing.assert_array_equal(got, -np.sort(-a, 1)[:, n - 1])


@pytest.mark.parametrize("kind", ["normal", "equal", "zeros"])
def test_ties_is_bit_identical_to_the_counting_implementation(kind):
  # Rejects any change to the trimmed set: ties at the threshold dropped (> instead of >=), an
  # off-by-one rank, trimming per leaf. (The merge step after trimming is `sparse.ties_merge`
  # in both, unchanged: a hand-fused member loop would add in another order than XLA's
  # reduction, 4 members then 2 for M = 6, and differ in the last bit.)
  x0, stack = trees(seed=3)
  if kind == "equal":   # many equal magnitudes: ties at the threshold
    stack = jax.tree.map(lambda s, a: a[None] + np.round((s - a[None]) * 20) / 20, stack, x0)
  if kind == "zeros":   # most entries unchanged
    rng = np.random.default_rng(1)
    stack = jax.tree.map(lambda s, a: np.where(rng.random(s.shape) < 0.8, a[None], s), stack, x0)
  bench = _bench()
  for groups in (GROUPS, np.array([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]], np.int32)):
    for k in (0.05, 0.3, 1.0):   # M = 6: XLA sums 4 members, then 2: not a sequential loop
      got = merging.ties(x0, stack, groups, k=k, lam=0.7)
      want = bench.ties_counting(x0, jax.tree.map(jnp.asarray, stack), groups, k=k, lam=0.7)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
