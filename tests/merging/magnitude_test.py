"""stability.merging.magnitude (issue #21): Breadcrumbs, MagMax, DELLA and EMR == plain
per-group numpy references written from the papers' equations."""
import jax
import jax.numpy as jnp
import numpy as np

from stability import merging
from tests.merging.helpers import (GROUPS, assert_tree_close, items, ref_ties_update, stack_ref,
                                   trees)
from tests.merging.sparse_test import _ref_lowbias32
from tests.merging.spectral_test import _ref


def ref_breadcrumbs(t, top, bottom):
  out = np.zeros(t.shape[1:])
  for tm in t:
    a = np.sort(np.abs(tm).ravel())
    n = a.size
    nb, nt = int(np.floor(bottom * n + 1e-9)), int(np.floor(top * n + 1e-9))
    keep = np.ones(tm.shape, bool)
    if nb:
      keep &= np.abs(tm) > a[nb - 1]
    if nt:
      keep &= np.abs(tm) < a[n - nt]
    out += np.where(keep, tm, 0.0)
  return out


def test_breadcrumbs_matches_reference():
  # Rejects: one tail only, a global (not per-leaf) ranking, ties at a cut-off kept.
  x0, stack = trees()
  f = lambda t: ref_breadcrumbs(t, 0.1, 0.5)
  got = merging.breadcrumbs(x0, stack, GROUPS, top=0.1, bottom=0.5, lam=0.6)
  assert_tree_close(got, _ref(x0, stack, f, f, 0.6))


def test_magmax_matches_reference():
  # Rejects: max of the signed values, the mean of the selected, lam ignored.
  x0, stack = trees()
  f = lambda t: np.take_along_axis(t, np.argmax(np.abs(t), 0)[None], 0)[0]
  assert_tree_close(merging.magmax(x0, stack, GROUPS, lam=0.9), _ref(x0, stack, f, f, 0.9))


def test_della_matches_reference():
  # Rejects: drop probabilities increasing with magnitude (rank order flipped), no 1/(1 - p_i)
  # rescale, masks keyed by chunk position instead of the group's row, a plain sum instead of
  # the elected disjoint mean.
  x0, stack = trees()
  key, p, eps, lam = jax.random.key(7), 0.4, 0.3, 0.8
  got = merging.della(x0, stack, GROUPS, key=key, p=p, eps=eps, lam=lam)
  shapes = [a0.shape for _, a0 in items(x0)]
  offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
  per_group = []
  for g, row in enumerate(GROUPS):
    pruned = []
    for m, i in enumerate(row):
      s0, s1 = np.asarray(jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, g), m),
                                          (2,), jnp.uint32)).astype(np.uint64)
      parts = []
      for l, ((path, a0), (_, s)) in enumerate(zip(items(x0), items(stack))):
        t = (np.asarray(s[i], np.float32) - np.asarray(a0, np.float32)).astype(np.float64).ravel()
        r = np.empty(t.size)
        r[np.argsort(-np.abs(t), kind="stable")] = np.arange(t.size)
        pi = np.clip(p - eps / 2 + eps * r / t.size, 0, 1)
        j = np.arange(offsets[l], offsets[l + 1], dtype=np.uint64)
        u = (_ref_lowbias32((_ref_lowbias32(j ^ s0) + s1) & 0xFFFFFFFF) >> 8) / 2 ** 24
        parts.append(np.where(u >= pi.astype(np.float32), t / (1 - pi), 0.0))
      pruned.append(np.concatenate(parts))
    upd = ref_ties_update(np.stack(pruned))
    out, o = {}, 0
    for path, a0 in items(x0):
      out[path] = a0 + lam * upd[o:o + a0.size].reshape(a0.shape)
      o += a0.size
    per_group.append(out)
  assert_tree_close(got, stack_ref(per_group, x0), rtol=1e-4, atol=1e-5)
  assert_tree_close(merging.della(x0, stack, GROUPS, key=key, p=p, eps=eps, lam=lam,
                                  chunk_size=3), got, rtol=0, atol=0)


def test_della_drop_rate_and_large_entries_survive_more():
  t = jnp.asarray(np.random.default_rng(0).normal(size=(20_000,)), jnp.float32)
  pi = np.asarray(merging.magnitude.della_drop_probs(t, 0.5, 0.4))
  assert abs(pi.mean() - 0.5) < 1e-3
  big = np.abs(np.asarray(t)) > np.quantile(np.abs(np.asarray(t)), 0.9)
  assert pi[big].max() < pi[~big].min() + 1e-6


def test_emr_matches_reference_and_returns_one_model_per_member():
  # Rejects: a unified vector by the mean (not the max agreeing magnitude), masks from the
  # elected sign only (not tau_m's), rescalers per leaf instead of over the whole backbone.
  x0, stack = trees()
  got = merging.emr(x0, stack, GROUPS)
  for (path, a0), (_, gl) in zip(items(x0), items(got)):
    assert gl.shape == (len(GROUPS), 3) + a0.shape
  for g, row in enumerate(GROUPS):
    taus = {p: s[row] - a0[None] for (p, a0), (_, s) in zip(items(x0), items(stack))}
    uni = {}
    for p, t in taus.items():
      gam = np.sign(t.sum(0))
      uni[p] = gam * np.max(np.where(t * gam > 0, np.abs(t), 0), axis=0)
    for m in range(3):
      num = sum(np.abs(t[m]).sum() for t in taus.values())
      den = sum(np.abs(np.where(taus[p][m] * uni[p] > 0, uni[p], 0)).sum() for p in taus)
      for (p, a0), (_, gl) in zip(items(x0), items(got)):
        want = a0 + num / den * np.where(taus[p][m] * uni[p] > 0, uni[p], 0)
        np.testing.assert_allclose(gl[g, m], want, rtol=1e-5, atol=1e-5, err_msg=p)
