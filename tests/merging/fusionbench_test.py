"""Agreement with the published equations as FusionBench implements them (issue #21, item 5),
on fixed random tensors: TIES (and where FusionBench's keep count differs), DARE's expectation,
task arithmetic; TSV-M and Iso-C are in spectral_test.py (same equations as FusionBench's
`TSVM_utils` / `iso_utils`, written from the papers)."""
import jax
import numpy as np

from stability import merging
from tests.merging.helpers import (GROUPS, assert_tree_close, flat_taus, items, ref_ties_update,
                                   stack_ref, trees)
from tests.merging.sparse_test import _ref_from_updates


def fusionbench_trim(tau, K):
  """FusionBench `topk_values_mask`: threshold = the (d - int(d K))-th smallest |tau|, keep
  |tau| >= threshold, i.e. int(d K) + 1 entries when magnitudes are distinct."""
  d = tau.size
  kth = np.sort(np.abs(tau))[d - int(d * K) - 1]
  return np.where(np.abs(tau) >= kth, tau, 0.0)


def test_ties_equals_fusionbench_when_k_times_d_is_not_an_integer():
  # D = 20 + 4 + 54 = 78 coordinates; k = 0.3 -> kD = 23.4: both keep 24 entries.
  x0, stack = trees()
  upd = [ref_ties_update(np.stack([fusionbench_trim(t, 0.3) for t in flat_taus(x0, stack, r)]))
         for r in GROUPS]
  assert_tree_close(merging.ties(x0, stack, GROUPS, k=0.3), _ref_from_updates(x0, upd, 1.0))


def test_ties_keeps_one_entry_fewer_than_fusionbench_when_k_times_d_is_an_integer():
  # k = 0.5 -> kD = 39: we keep ceil(kD) = 39 entries (the paper's "top-k%"), FusionBench keeps
  # int(kD) + 1 = 40 (its kthvalue index counts the threshold entry itself). docs/merging.md.
  x0, stack = trees()
  got = merging.ties(x0, stack, GROUPS[:1], k=0.5, lam=1.0)
  taus = flat_taus(x0, stack, GROUPS[0])
  ours = [int(np.sum(np.abs(t) >= np.sort(np.abs(t))[::-1][38])) for t in taus]
  fb = [int(np.sum(fusionbench_trim(t, 0.5) != 0)) for t in taus]
  assert ours == [39] * 3 and fb == [40] * 3
  upd = [ref_ties_update(np.stack([fusionbench_trim(t, 0.5) for t in taus]))]
  fb_tree = _ref_from_updates(x0, upd, 1.0)
  diff = sum(int(np.sum(~np.isclose(a, b, atol=1e-6)))
             for (_, a), (_, b) in zip(items(got), items(fb_tree)))
  assert 1 <= diff <= 3


def test_dare_expectation_is_its_base():
  # E[m / (1 - p)] = 1 per entry, so the mean over keys of DARE + task arithmetic is task
  # arithmetic (FusionBench `dare/task_arithmetic` with rescale=True); 4 standard errors.
  # Rejects no rescale (mean = (1 - p) x base) or rescaling by 1 / p.
  x0, stack = trees()
  p, n = 0.5, 400
  runs = [merging.dare(x0, stack, GROUPS, key=jax.random.key(s), p=p, lam=0.3) for s in range(n)]
  base = merging.task_arithmetic(x0, stack, GROUPS, lam=0.3)
  for l, (path, b) in enumerate(items(base)):
    xs = np.stack([np.asarray(jax.tree.leaves(r)[l], np.float64) for r in runs])
    se = xs.std(0) / np.sqrt(n) + 1e-7
    assert np.all(np.abs(xs.mean(0) - b) <= 4.5 * se), path


def test_task_arithmetic_equals_the_published_equation():
  x0, stack = trees()
  per = [{p: a0 + 0.4 * (s[r] - a0[None]).sum(0)
          for (p, a0), (_, s) in zip(items(x0), items(stack))} for r in GROUPS]
  assert_tree_close(merging.task_arithmetic(x0, stack, GROUPS, lam=0.4), stack_ref(per, x0))
