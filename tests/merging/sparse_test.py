"""stability.merging.sparse: TIES and DARE == numpy references of their documented contracts;
DARE's hash masks are independent Bernoulli draws and agree with the diagnostics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging
from stability.merging import sparse
from tests.merging.helpers import (GROUPS, assert_tree_close, flat_taus, items, ref_ties_update,
                                   ref_trim, stack_ref, trees)


def _unflat(vec, x0):
  out, i = [], 0
  for a0 in jax.tree.leaves(x0):
    out.append(vec[i:i + a0.size].reshape(a0.shape))
    i += a0.size
  return out


def _ref_from_updates(x0, updates, lam):
  per_group = []
  for upd in updates:
    leaves = _unflat(upd, x0)
    per_group.append({p: a0 + lam * d for (p, a0), d in zip(items(x0), leaves)})
  return stack_ref(per_group, x0)


def test_ties_matches_reference():
  x0, stack = trees()
  upd = [ref_ties_update(np.stack([ref_trim(t, 0.3) for t in flat_taus(x0, stack, row)]))
         for row in GROUPS]
  want = _ref_from_updates(x0, upd, 0.9)
  for chunk in (None, 3):
    assert_tree_close(merging.ties(x0, stack, GROUPS, k=0.3, lam=0.9, chunk_size=chunk), want)


def test_ties_full_keep_without_sign_conflicts_is_the_average():
  x0, stack = trees()
  stack = jax.tree.map(lambda s, a: a[None] + np.abs(s - a[None]), stack, x0)  # all tau > 0
  assert_tree_close(merging.ties(x0, stack, GROUPS, k=1.0, lam=1.0),
                    merging.average(x0, stack, GROUPS), rtol=1e-5, atol=1e-6)


def _ref_lowbias32(x):
  x = x.astype(np.uint64)
  x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
  x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _ref_dare_taus(x0, stack, row, g, key, p, rescale):
  """Documented contract: member m of group g keeps entry j iff u >= p, u = (h >> 8) / 2^24,
  h = mix(mix(j ^ s0) + s1), (s0, s1) = bits(fold_in(fold_in(key, g), m)) (64-bit numpy here)."""
  taus = flat_taus(x0, stack, row)
  j = np.arange(taus.shape[1], dtype=np.uint64)
  keep = []
  for m in range(len(row)):
    s0, s1 = np.asarray(jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, g), m), (2,),
                                        jnp.uint32)).astype(np.uint64)
    h = _ref_lowbias32((_ref_lowbias32(j ^ s0) + s1) & 0xFFFFFFFF)
    keep.append((h >> 8).astype(np.float64) / 2 ** 24 >= p)
  return np.where(np.stack(keep), taus / (1 - p) if rescale else taus, 0.0)


def test_dare_masks_are_independent_bernoulli():
  # Large D: realised keep rate per member within 4 sigma of 1 - p, members and groups
  # uncorrelated, and neighbouring coordinates uncorrelated (the hash has no visible stride).
  shapes, p, M = [(300, 200), (1000,)], 0.3, 4
  D = 61_000
  masks = [np.concatenate([np.asarray(a).reshape(M, -1) for a in sparse.dare_masks(
      jax.random.key(3), jnp.int32(g), M, shapes, jnp.float32(p))], axis=1) for g in (0, 1)]
  X = np.concatenate(masks).astype(np.float64)                  # [2M, D]
  assert np.all(np.abs(X.mean(1) - (1 - p)) < 4 * np.sqrt(p * (1 - p) / D))
  C = np.corrcoef(X)
  assert np.max(np.abs(C[~np.eye(2 * M, dtype=bool)])) < 4 / np.sqrt(D)
  lag = [np.corrcoef(x[:-s], x[s:])[0, 1] for x in X for s in (1, 2, 200)]
  assert np.max(np.abs(lag)) < 4 / np.sqrt(D)


@pytest.mark.parametrize("base,rescale", [("average", True), ("task_arithmetic", False),
                                          ("ties", True)])
def test_dare_matches_reference(base, rescale):
  x0, stack = trees()
  key, p = jax.random.key(5), 0.4
  w = np.random.default_rng(4).uniform(0.5, 1.5, GROUPS.shape)
  kw = {} if base == "ties" else {"weights": w}
  got = merging.dare(x0, stack, GROUPS, key=key, p=p, rescale=rescale, base=base, k=0.5, **kw)
  upd, lam = [], {"average": 1.0, "task_arithmetic": 0.3, "ties": 1.0}[base]
  for g, row in enumerate(GROUPS):
    taus = _ref_dare_taus(x0, stack, row, g, key, p, rescale)
    if base == "ties":
      upd.append(ref_ties_update(np.stack([ref_trim(t, 0.5) for t in taus])))
    else:
      wg = w[g] / w[g].sum() if base == "average" else w[g]
      upd.append((wg[:, None] * taus).sum(0))
  assert_tree_close(got, _ref_from_updates(x0, upd, lam))
  if base == "ties":  # masks keyed by the group's row, not its position in a chunk
    assert_tree_close(merging.dare(x0, stack, GROUPS, key=key, p=p, rescale=rescale, base=base,
                                   k=0.5, chunk_size=3), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base,rescale", [("average", True), ("task_arithmetic", False),
                                          ("ties", True)])
def test_dare_with_p0_is_its_base(base, rescale):
  x0, stack = trees()
  got = merging.dare(x0, stack, GROUPS, key=jax.random.key(0), p=0.0, base=base, k=0.5,
                     rescale=rescale)
  want = {"average": lambda: merging.average(x0, stack, GROUPS),
          "task_arithmetic": lambda: merging.task_arithmetic(x0, stack, GROUPS),
          "ties": lambda: merging.ties(x0, stack, GROUPS, k=0.5)}[base]()
  assert_tree_close(got, want, rtol=1e-5, atol=1e-6)


def test_dare_drop_rate_and_diagnostics_agree():
  x0, stack = trees(E=7)
  key = jax.random.key(9)
  d = merging.diagnostics(x0, stack, GROUPS, key=key, p=0.3, k=0.3)
  assert abs(float(np.mean(d["dare_sparsity"])) - 0.3) < 0.05
  # Masks are the ones dare() uses: p -> realised zeros of the unrescaled task vectors.
  got = merging.dare(x0, stack, GROUPS, key=key, p=0.3, rescale=False, base="task_arithmetic",
                     lam=1.0, k=0.5, weights=np.eye(3)[[0, 0, 0, 0]])  # member 0 alone
  tau = np.concatenate([(np.asarray(a) - np.asarray(b)[None]).reshape(4, -1)
                        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(x0))], axis=1)
  np.testing.assert_allclose((tau == 0).mean(1), np.asarray(d["dare_sparsity"])[:, 0],
                             atol=1e-6)
