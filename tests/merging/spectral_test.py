"""stability.merging.spectral (issue #21): TSV-M, Iso-C and Iso-CTS == plain per-group numpy
references written from the papers' equations; every new merge's bad hyperparameters; twin
stability of the new merges through the registry == a per-group loop."""
import jax
import numpy as np
import pytest

from stability import merging, twins
from tests.merging.helpers import GROUPS, assert_tree_close, items, stack_ref, trees

TOL = dict(rtol=2e-4, atol=2e-5)   # float32 SVDs against float64 numpy


def _ref(x0, stack, layer_fn, other_fn, scale):
  """x0 + scale * (layer_fn(taus [M, m, n]) for 2-D leaves, other_fn(taus) otherwise)."""
  per_group = []
  for row in GROUPS:
    out = {}
    for (p, a0), (_, s) in zip(items(x0), items(stack)):
      t = s[row] - a0[None]
      out[p] = a0 + scale * (layer_fn(t) if a0.ndim == 2 else other_fn(t))
    per_group.append(out)
  return stack_ref(per_group, x0)


def _polar(A):
  P, _, Qt = np.linalg.svd(A, full_matrices=False)
  return P @ Qt


def ref_tsv(t, fraction=None):
  M, m, n = t.shape
  r = max(1, int(np.floor((1 / M if fraction is None else fraction) * min(m, n) + 1e-9)))
  Us, Ss, Vs = [], [], []
  for tm in t:
    U, S, Vt = np.linalg.svd(tm, full_matrices=False)
    Us.append(U[:, :r]), Ss.append(S[:r]), Vs.append(Vt[:r].T)
  return _polar(np.concatenate(Us, 1)) @ np.diag(np.concatenate(Ss)) @ _polar(
      np.concatenate(Vs, 1)).T


def ref_iso(t):
  U, S, Vt = np.linalg.svd(t.sum(0), full_matrices=False)
  return S.mean() * U @ Vt


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_tsv_m_matches_reference(fraction):
  # Rejects: no orthogonalisation (plain low-rank sum), rank from max(m, n), 1-D leaves summed.
  x0, stack = trees()
  got = merging.tsv_m(x0, stack, GROUPS, alpha=0.8, fraction=fraction)
  assert_tree_close(got, _ref(x0, stack, lambda t: ref_tsv(t, fraction), lambda t: t.mean(0),
                              0.8), **TOL)


def test_tsv_m_with_orthogonal_tasks_is_their_truncated_sum():
  # Tasks on disjoint singular subspaces need no orthogonalisation: TSV-M = sum of rank-r parts.
  rng = np.random.default_rng(0)
  Q1, Q2 = np.linalg.qr(rng.normal(size=(6, 6)))[0], np.linalg.qr(rng.normal(size=(4, 4)))[0]
  taus = np.stack([3.0 * np.outer(Q1[:, i], Q2[:, i]) + 0.1 * np.outer(Q1[:, i + 2], Q2[:, i + 2])
                   for i in range(2)])
  x0 = {"w": np.zeros((6, 4), np.float32)}
  stack = {"w": taus.astype(np.float32)}
  got = np.asarray(merging.tsv_m(x0, stack, np.array([[0, 1]]), fraction=0.25)["w"][0])
  np.testing.assert_allclose(got, 3.0 * (np.outer(Q1[:, 0], Q2[:, 0]) + np.outer(Q1[:, 1], Q2[:, 1])),
                             atol=1e-5)


def test_iso_c_matches_reference_and_flattens_the_spectrum():
  # Rejects: mean over max(m, n) values, the spectrum kept (task arithmetic), alpha ignored,
  # 1-D leaves summed (FusionBench and the authors average them).
  x0, stack = trees()
  got = merging.iso_c(x0, stack, GROUPS, alpha=0.7)
  assert_tree_close(got, _ref(x0, stack, ref_iso, lambda t: t.mean(0), 0.7), **TOL)
  d = np.asarray(got["Dense_0"]["kernel"][0]) - np.asarray(x0["Dense_0"]["kernel"])
  s = np.linalg.svd(d, compute_uv=False)
  np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-4)


def ref_iso_cts(t, common=0.8):
  M, m, n = t.shape
  q = min(m, n)
  k = int(np.floor(common * q + 1e-9))
  s = int(round((q - k) / M))
  k = q - M * s
  U, S, Vt = np.linalg.svd(t.sum(0), full_matrices=False)
  Us, Ss, Vs = [U[:, :k]], [S[:k]], [Vt[:k].T]
  for tm in t:
    u, sv, vt = np.linalg.svd(tm - U[:, :k] @ U[:, :k].T @ tm, full_matrices=False)
    Us.append(u[:, :s]), Ss.append(sv[:s]), Vs.append(vt[:s].T)
  return np.concatenate(Ss).mean() * _polar(np.concatenate(Us, 1)) @ _polar(
      np.concatenate(Vs, 1)).T


@pytest.mark.parametrize("common", [0.8, 0.25])
def test_iso_cts_matches_reference(common):
  # Rejects: the common subspace not projected out of the task parts, sigma_bar over the common
  # values only, no orthogonalisation. (5 x 4 layers, M = 3: common 0.8 -> k = 4, s = 0 (Iso-C
  # on the common subspace); 0.25 -> k = 1, s = 1.)
  x0, stack = trees()
  got = merging.iso_cts(x0, stack, GROUPS, alpha=0.9, common=common)
  assert_tree_close(got, _ref(x0, stack, lambda t: ref_iso_cts(t, common), lambda t: t.mean(0),
                              0.9), **TOL)
  if common == 0.8:
    assert_tree_close(got, merging.iso_c(x0, stack, GROUPS, alpha=0.9), **TOL)


@pytest.mark.parametrize("name,hp,field", [
    ("tsv_m", dict(alpha=float("nan")), "tsv_m: alpha"),
    ("tsv_m", dict(fraction=0.0), "tsv_m: fraction"),
    ("tsv_m", dict(fraction=1.5), "tsv_m: fraction"),
    ("tsv_m", dict(fraction=0.5), "tsv_m: fraction"),     # M = 3 tasks: at most 1/3 each
    ("iso_c", dict(alpha=-1.0), "iso_c: alpha"),
    ("iso_cts", dict(common=0.0), "iso_cts: common"),
    ("breadcrumbs", dict(top=0.5, bottom=0.6), "breadcrumbs: top \\+ bottom"),
    ("breadcrumbs", dict(bottom=1.0), "breadcrumbs: bottom"),
    ("magmax", dict(lam=float("inf")), "magmax: lam"),
    ("della", dict(key=jax.random.key(0), p=1.0), "della: p"),
    ("della", dict(key=jax.random.key(0), p=0.1, eps=0.3), "della: eps"),
    ("metrics_weighted", dict(losses=np.ones(6)), "metrics_weighted: losses"),
    ("metrics_weighted", dict(losses=np.ones(7), temperature=0.0),
     "metrics_weighted: temperature")])
def test_bad_hyperparameters_name_the_algorithm_and_field(name, hp, field):
  x0, stack = trees()
  with pytest.raises(ValueError, match=f"^{field}"):
    merging.merge(name, x0, stack, GROUPS, **hp)


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "breadcrumbs", "magmax", "della"])
def test_twin_stability_of_new_merges_equals_a_per_group_loop(name):
  # twins.merged_sq_distances through the registry (twins.merge_fn) == the squared distance of
  # each original group's merge and its twin group's merge, merged one group at a time.
  from tests.twins_test import ARRAYS, BACKBONE, originals
  both = twins.make_twins(originals(), ARRAYS, m=1)
  E = both.origin.shape[0]
  rng = np.random.default_rng(0)
  bb = jax.tree.map(lambda a: (a[None] + 0.1 * rng.normal(size=(E,) + a.shape)).astype(
      np.float32), BACKBONE)
  heads = {"w": rng.normal(size=(E, 3)).astype(np.float32)}
  groups = np.array([[0, 1, 2], [1, 2, 3]])
  hp = {"key": jax.random.key(4)} if name == "della" else {}
  out = twins.merged_sq_distances(twins.merge_fn(name, **hp), BACKBONE, bb, heads, groups, both)
  fn = merging.get(name)
  ids = lambda g: {"group_ids": np.array([g])} if name == "della" else {}
  for t, (g, p, r) in enumerate(zip(out["base"], out["pos"], out["row"])):
    twin = groups[g].copy()
    twin[p] = r
    a = fn(BACKBONE, bb, groups[g][None], **hp, **ids(g))
    c = fn(BACKBONE, bb, twin[None], **hp, **ids(g))   # the twin shares its original's draws
    ref = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    np.testing.assert_allclose(out["backbone"][t], ref, rtol=1e-3, atol=1e-9)
