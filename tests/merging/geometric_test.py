"""stability.merging.geometric: SLERP and Model Stock == numpy references."""
import jax
import numpy as np

from stability import merging
from tests.merging.helpers import GROUPS, assert_tree_close, identical, items, stack_ref, trees


def _ref_slerp(v0, v1, t, thr=0.9995, eps=1e-8):
  n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
  u0 = v0 / n0 if n0 > eps else v0
  u1 = v1 / n1 if n1 > eps else v1
  dot = np.sum(u0 * u1)
  if abs(dot) > thr:
    return (1 - t) * v0 + t * v1
  th = np.arccos(dot)
  return np.sin(th - t * th) / np.sin(th) * v0 + np.sin(t * th) / np.sin(th) * v1


def test_slerp_matches_reference_and_falls_back_to_lerp():
  x0, stack = trees()
  # Expert 6 = expert 0 scaled: parallel task vectors -> lerp.
  stack = jax.tree.map(lambda s, a: np.concatenate([s[:6], (a + 2.0 * (s[0] - a))[None]]),
                       stack, x0)
  pairs = np.array([[0, 1], [2, 5], [0, 6]], np.int32)
  got = merging.slerp(x0, stack, pairs, t=0.3)
  per_group = []
  for a, b in pairs:
    per_group.append({p: a0 + _ref_slerp(s[a] - a0, s[b] - a0, 0.3)
                      for (p, a0), (_, s) in zip(items(x0), items(stack))})
  assert_tree_close(got, stack_ref(per_group, x0))
  assert_tree_close(merging.slerp(x0, stack, pairs, t=0.3, chunk_size=2), got, rtol=1e-6,
                    atol=1e-6)


def test_model_stock_matches_reference():
  x0, stack = trees(scale=0.1)
  stack = jax.tree.map(lambda s, a: s + 0.1 * (s.mean(0) - a), stack, x0)  # positive cosines
  got = merging.model_stock(x0, stack, GROUPS)
  per_group = []
  for row in GROUPS:
    merged = {}
    for (p, a0), (_, s) in zip(items(x0), items(stack)):
      taus = [s[i] - a0 for i in row]
      angles = [np.arccos(np.clip(np.sum(taus[i] * taus[j]) / (
          np.sqrt(np.sum(taus[i] ** 2) * np.sum(taus[j] ** 2)) + 1e-8), -1, 1))
                for i in range(3) for j in range(i + 1, 3)]
      c = np.cos(np.mean(angles))
      t = 3 * c / (2 * c + 1 + 1e-8)
      merged[p] = t * np.mean([s[i] for i in row], 0) + (1 - t) * a0
    per_group.append(merged)
  assert_tree_close(got, stack_ref(per_group, x0))
  assert_tree_close(merging.model_stock(x0, stack, GROUPS, chunk_size=3), got, rtol=1e-6,
                    atol=1e-6)


def test_identical_experts_slerp_to_that_expert():
  x0, stack = identical()
  got = merging.slerp(x0, stack, np.array([[0, 1], [2, 5], [0, 6]], np.int32), t=0.3)
  assert_tree_close(got, jax.tree.map(lambda s: s[:3], stack), rtol=1e-5, atol=1e-6)
