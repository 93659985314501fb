"""stability.merging.trajectory and linear.metrics_weighted (issue #21) == plain references."""
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import GROUPS, assert_tree_close, items, stack_ref, trees


def _snaps(K=5, seed=0):
  _, stack = trees(seed=seed, E=K)     # the expert axis stands for the snapshot axis
  return stack


@pytest.mark.parametrize("tail", [1, 3, 5])
def test_tail_average_is_the_mean_of_the_last_snapshots(tail):
  # Rejects: the first `tail` snapshots, a mean over all K.
  snaps = _snaps()
  got = merging.snapshot_average(snaps, tail=tail)
  for (p, g), (_, s) in zip(items(got), items(snaps)):
    np.testing.assert_allclose(g, s[-tail:].mean(0), rtol=1e-5, atol=1e-6, err_msg=p)


def test_ema_is_the_recursion_in_snapshot_order():
  # Rejects: the recursion run backwards (e_1 = x_K), decay and 1 - decay swapped.
  snaps, decay = _snaps(), 0.7
  got = merging.snapshot_ema(snaps, decay=decay)
  for (p, g), (_, s) in zip(items(got), items(snaps)):
    e = s[0]
    for x in s[1:]:
      e = decay * e + (1 - decay) * x
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=p)


def test_trajectory_bad_inputs():
  snaps = _snaps()
  with pytest.raises(ValueError, match="^snapshot_average: tail"):
    merging.snapshot_average(snaps, tail=6)
  with pytest.raises(ValueError, match="^snapshot_ema: decay"):
    merging.snapshot_ema(snaps, decay=1.0)


def test_metrics_weighted_is_a_softmax_weighted_average():
  # Rejects: weights from +loss (the worst member up-weighted), weights normalised over all
  # experts instead of within the group, the temperature ignored.
  x0, stack = trees()
  losses = np.array([0.3, 1.2, 0.8, 0.1, 2.0, 0.5, 0.9])
  got = merging.metrics_weighted(x0, stack, GROUPS, losses=losses, temperature=0.5)
  per_group = []
  for row in GROUPS:
    w = np.exp(-losses[row] / 0.5)
    w /= w.sum()
    per_group.append({p: np.tensordot(w, s[row], 1) for p, s in items(stack)})
  assert_tree_close(got, stack_ref(per_group, x0))
  hot = merging.metrics_weighted(x0, stack, GROUPS, losses=losses, temperature=1e6)
  assert_tree_close(hot, merging.average(x0, stack, GROUPS), rtol=1e-4, atol=1e-5)
