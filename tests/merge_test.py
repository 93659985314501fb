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


def test_task_arithmetic_matches_reference():
  x0, stack = _trees()
  w = np.random.default_rng(3).uniform(0.5, 1.5, GROUPS.shape)
  want = _ref_linear(x0, stack, GROUPS, 0.7 * w, 1 - 0.7 * w.sum(1))
  for chunk in (None, 3):
    _assert_tree_close(merge.task_arithmetic(x0, stack, GROUPS, w, lam=0.7, chunk_size=chunk),
                       want)


def test_task_arithmetic_with_lam_one_over_m_is_the_average():
  x0, stack = _trees()
  _assert_tree_close(merge.task_arithmetic(x0, stack, GROUPS, lam=1 / 3),
                     merge.average(x0, stack, GROUPS), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# TIES / DARE


def _flat_taus(x0, stack, row):
  """Task vectors of a group's members, flattened over leaves in tree order; float32 tau."""
  taus = [np.concatenate([(np.asarray(s[i], np.float32) - np.asarray(a0, np.float32)).ravel()
                          for a0, s in zip(jax.tree.leaves(x0), jax.tree.leaves(stack))])
          for i in row]
  return np.stack(taus).astype(np.float64)


def _unflat(vec, x0):
  out, i = [], 0
  for a0 in jax.tree.leaves(x0):
    out.append(vec[i:i + a0.size].reshape(a0.shape))
    i += a0.size
  return out


def _ref_trim(tau, k):
  n = int(np.ceil(round(k * tau.size, 6)))
  thr = np.sort(np.abs(tau))[::-1][n - 1]
  return np.where(np.abs(tau) >= thr, tau, 0.0)


def _ref_ties_update(trimmed):
  """Elect sign by total mass (zeros -> majority), disjoint mean over agreeing entries."""
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
  return (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _ref_from_updates(x0, updates, lam):
  per_group = []
  for upd in updates:
    leaves = _unflat(upd, x0)
    per_group.append({p: a0 + lam * d for (p, a0), d in zip(_items(x0), leaves)})
  return _stack_ref(per_group, x0)


def test_ties_matches_reference():
  x0, stack = _trees()
  upd = [_ref_ties_update(np.stack([_ref_trim(t, 0.3) for t in _flat_taus(x0, stack, row)]))
         for row in GROUPS]
  want = _ref_from_updates(x0, upd, 0.9)
  for chunk in (None, 3):
    _assert_tree_close(merge.ties(x0, stack, GROUPS, k=0.3, lam=0.9, chunk_size=chunk), want)


def test_ties_full_keep_without_sign_conflicts_is_the_average():
  x0, stack = _trees()
  stack = jax.tree.map(lambda s, a: a[None] + np.abs(s - a[None]), stack, x0)  # all tau > 0
  _assert_tree_close(merge.ties(x0, stack, GROUPS, k=1.0, lam=1.0),
                     merge.average(x0, stack, GROUPS), rtol=1e-5, atol=1e-6)


def _ref_dare_taus(x0, stack, row, g, key, p, rescale):
  """Documented contract: group g's masks are bernoulli(fold_in(key, g), 1 - p, [M, D])."""
  taus = _flat_taus(x0, stack, row)
  keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, g), 1 - p, taus.shape))
  return np.where(keep, taus / (1 - p) if rescale else taus, 0.0)


@pytest.mark.parametrize("base,rescale", [("average", True), ("task_arithmetic", False),
                                          ("ties", True)])
def test_dare_matches_reference(base, rescale):
  x0, stack = _trees()
  key, p = jax.random.key(5), 0.4
  w = np.random.default_rng(4).uniform(0.5, 1.5, GROUPS.shape)
  kw = {} if base == "ties" else {"weights": w}
  got = merge.dare(x0, stack, GROUPS, key=key, p=p, rescale=rescale, base=base, k=0.5, **kw)
  upd, lam = [], {"average": 1.0, "task_arithmetic": 0.3, "ties": 1.0}[base]
  for g, row in enumerate(GROUPS):
    taus = _ref_dare_taus(x0, stack, row, g, key, p, rescale)
    if base == "ties":
      upd.append(_ref_ties_update(np.stack([_ref_trim(t, 0.5) for t in taus])))
    else:
      wg = w[g] / w[g].sum() if base == "average" else w[g]
      upd.append((wg[:, None] * taus).sum(0))
  _assert_tree_close(got, _ref_from_updates(x0, upd, lam))
  if base == "ties":  # masks keyed by the group's row, not its position in a chunk
    _assert_tree_close(merge.dare(x0, stack, GROUPS, key=key, p=p, rescale=rescale, base=base,
                                  k=0.5, chunk_size=3), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", ["average", "task_arithmetic", "ties"])
def test_dare_with_p0_is_its_base(base):
  x0, stack = _trees()
  got = merge.dare(x0, stack, GROUPS, key=jax.random.key(0), p=0.0, base=base)
  want = {"average": lambda: merge.average(x0, stack, GROUPS),
          "task_arithmetic": lambda: merge.task_arithmetic(x0, stack, GROUPS),
          "ties": lambda: merge.ties(x0, stack, GROUPS)}[base]()
  _assert_tree_close(got, want, rtol=1e-5, atol=1e-6)


def test_dare_drop_rate_and_diagnostics_agree():
  x0, stack = _trees(E=7)
  key = jax.random.key(9)
  d = merge.diagnostics(x0, stack, GROUPS, key=key, p=0.3)
  assert abs(float(np.mean(d["dare_sparsity"])) - 0.3) < 0.05
  # Masks are the ones dare() uses: p -> realised zeros of the unrescaled task vectors.
  got = merge.dare(x0, stack, GROUPS, key=key, p=0.3, rescale=False, base="task_arithmetic",
                   lam=1.0, weights=np.eye(3)[[0, 0, 0, 0]])  # member 0 alone
  tau = np.concatenate([(np.asarray(a) - np.asarray(b)[None]).reshape(4, -1)
                        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(x0))], axis=1)
  np.testing.assert_allclose((tau == 0).mean(1), np.asarray(d["dare_sparsity"])[:, 0],
                             atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fisher, RegMean


def _positive_like(stack, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.uniform(0.0, 2.0, s.shape).astype(np.float32), stack)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_reference(normalize):
  x0, stack = _trees()
  F = _positive_like(stack, 6)
  w = np.random.default_rng(7).uniform(0.5, 1.5, GROUPS.shape)
  got = merge.fisher(x0, stack, GROUPS, w, fishers=F, eps=1e-3, normalize=normalize)
  norms = np.sqrt(sum((np.asarray(f, np.float64) ** 2).reshape(7, -1).sum(1)
                      for f in jax.tree.leaves(F)))
  per_group = []
  for g, row in enumerate(GROUPS):
    wg = w[g] / w[g].sum()
    c = wg / (norms[row] + 1e-3) if normalize else wg
    merged = {}
    for (p, s), (_, f) in zip(_items(stack), _items(F)):
      num = sum(c[m] * (f[i] + 1e-3) * s[i] for m, i in enumerate(row))
      den = sum(c[m] * (f[i] + 1e-3) for m, i in enumerate(row))
      merged[p] = num / den
    per_group.append(merged)
  _assert_tree_close(got, _stack_ref(per_group, x0))
  _assert_tree_close(merge.fisher(x0, stack, GROUPS, w, fishers=F, eps=1e-3, normalize=normalize,
                                  chunk_size=3), got, rtol=1e-6, atol=1e-6)


def _grams(E, seed, d_in=5):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(E, 12, d_in))
  return {"Dense_0": (np.einsum("eni,enj->eij", A, A) / 12 + 0.5 * np.eye(d_in)).astype(np.float32)}


def test_regmean_matches_reference():
  x0, stack = _trees()
  grams = _grams(7, 8)
  alpha, w = 0.4, np.random.default_rng(9).uniform(0.5, 1.5, GROUPS.shape)
  got = merge.regmean(x0, stack, GROUPS, w, grams=grams, alpha=alpha, ridge=0.0)
  per_group = []
  for g, row in enumerate(GROUPS):
    wg = w[g] / w[g].sum()
    merged = {p: sum(wg[m] * s[i] for m, i in enumerate(row)) for p, s in _items(stack)}
    A = np.zeros((5, 5))
    B = np.zeros((5, 4))
    for m, i in enumerate(row):
      Gm = np.asarray(grams["Dense_0"][i], np.float64)
      Gm = Gm * alpha + np.diag(np.diag(Gm)) * (1 - alpha)
      A += wg[m] * Gm
      B += wg[m] * Gm @ np.asarray(stack["Dense_0"]["kernel"][i], np.float64)
    merged["['Dense_0']['kernel']"] = np.linalg.solve(A, B)
    per_group.append(merged)
  _assert_tree_close(got, _stack_ref(per_group, x0), rtol=1e-4, atol=1e-5)
  _assert_tree_close(merge.regmean(x0, stack, GROUPS, w, grams=grams, alpha=alpha, ridge=0.0,
                                   chunk_size=3), got, rtol=1e-6, atol=1e-6)


def test_regmean_with_identical_grams_is_the_average():
  x0, stack = _trees()
  grams = {"Dense_0": np.repeat(_grams(1, 10)["Dense_0"], 7, axis=0)}
  _assert_tree_close(merge.regmean(x0, stack, GROUPS, grams=grams),
                     merge.average(x0, stack, GROUPS), rtol=1e-4, atol=1e-5)


def test_regmean_dead_inputs_fall_back_to_the_average():
  x0, stack = _trees()
  G = _grams(7, 11)["Dense_0"]
  G[:, 2, :] = 0.0
  G[:, :, 2] = 0.0                                   # input 2 dead for every expert
  got = merge.regmean(x0, stack, GROUPS, grams={"Dense_0": G})
  avg = merge.average(x0, stack, GROUPS)
  assert np.all(np.isfinite(np.asarray(got["Dense_0"]["kernel"])))
  np.testing.assert_allclose(got["Dense_0"]["kernel"][:, 2], avg["Dense_0"]["kernel"][:, 2],
                             rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SLERP, Model Stock


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
  x0, stack = _trees()
  # Expert 6 = expert 0 scaled: parallel task vectors -> lerp.
  stack = jax.tree.map(lambda s, a: np.concatenate([s[:6], (a + 2.0 * (s[0] - a))[None]]),
                       stack, x0)
  pairs = np.array([[0, 1], [2, 5], [0, 6]], np.int32)
  got = merge.slerp(x0, stack, pairs, t=0.3)
  per_group = []
  for a, b in pairs:
    per_group.append({p: a0 + _ref_slerp(s[a] - a0, s[b] - a0, 0.3)
                      for (p, a0), (_, s) in zip(_items(x0), _items(stack))})
  _assert_tree_close(got, _stack_ref(per_group, x0))
  _assert_tree_close(merge.slerp(x0, stack, pairs, t=0.3, chunk_size=2), got, rtol=1e-6,
                     atol=1e-6)


def test_model_stock_matches_reference():
  x0, stack = _trees(scale=0.1)
  stack = jax.tree.map(lambda s, a: s + 0.1 * (s.mean(0) - a), stack, x0)  # positive cosines
  got = merge.model_stock(x0, stack, GROUPS)
  per_group = []
  for row in GROUPS:
    merged = {}
    for (p, a0), (_, s) in zip(_items(x0), _items(stack)):
      taus = [s[i] - a0 for i in row]
      angles = [np.arccos(np.clip(np.sum(taus[i] * taus[j]) / (
          np.sqrt(np.sum(taus[i] ** 2) * np.sum(taus[j] ** 2)) + 1e-8), -1, 1))
                for i in range(3) for j in range(i + 1, 3)]
      c = np.cos(np.mean(angles))
      t = 3 * c / (2 * c + 1 + 1e-8)
      merged[p] = t * np.mean([s[i] for i in row], 0) + (1 - t) * a0
    per_group.append(merged)
  _assert_tree_close(got, _stack_ref(per_group, x0))
  _assert_tree_close(merge.model_stock(x0, stack, GROUPS, chunk_size=3), got, rtol=1e-6,
                     atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Identical experts, chunking, sharding


def _identical(M=3):
  x0, stack = _trees(E=1)
  return x0, jax.tree.map(lambda s: jnp.repeat(s, M, axis=0), stack), np.array([[0, 1, 2]])


@pytest.mark.parametrize("name,kw", [
    ("average", {}), ("weighted_average", {"weights": np.array([[1.0, 2.0, 3.0]])}),
    ("ties", {"k": 1.0}), ("dare_average", {"key": jax.random.key(0), "p": 0.0}),
    ("model_stock", {}), ("uniform_soup", {})])
def test_identical_experts_merge_to_that_expert(name, kw):
  x0, stack, groups = _identical()
  got = merge.merge(name, x0, stack, groups, **kw)
  _assert_tree_close(got, jax.tree.map(lambda s: s[:1], stack), rtol=1e-5, atol=1e-6)


def test_identical_experts_fisher_regmean_slerp():
  x0, stack, groups = _identical()
  want = jax.tree.map(lambda s: s[:1], stack)
  F = _positive_like(stack, 1)
  _assert_tree_close(merge.fisher(x0, stack, groups, fishers=F), want, rtol=1e-5, atol=1e-6)
  _assert_tree_close(merge.regmean(x0, stack, groups, grams=_grams(3, 2)), want,
                     rtol=1e-4, atol=1e-5)
  _assert_tree_close(merge.slerp(x0, stack, groups[:, :2]), want, rtol=1e-5, atol=1e-6)


def test_many_groups_chunked_average():
  x0, stack = _trees(E=50)
  groups = np.random.default_rng(13).integers(0, 50, (2000, 6)).astype(np.int32)
  got = merge.average(x0, stack, groups, chunk_size=256)
  want = _ref_linear(x0, stack, groups[::97], np.full((len(groups[::97]), 6), 1 / 6),
                     np.zeros(len(groups[::97])))
  _assert_tree_close(jax.tree.map(lambda a: a[::97], got), want)


def test_sharded_stack_gives_the_same_average():
  if jax.device_count() < 2:
    pytest.skip("needs several devices")
  n = jax.device_count()
  x0, stack = _trees(E=2 * n)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("expert",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  sharded = jax.device_put(stack, sharding)
  groups = np.random.default_rng(14).integers(0, 2 * n, (10, 3)).astype(np.int32)
  _assert_tree_close(merge.average(x0, sharded, groups), merge.average(x0, stack, groups),
                     rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Diagnostics


def test_diagnostics_match_reference():
  x0, stack = _trees()
  d = merge.diagnostics(x0, stack, GROUPS, k=0.3)
  assert "dare_sparsity" not in d
  for g, row in enumerate(GROUPS):
    taus = _flat_taus(x0, stack, row)
    norms = np.linalg.norm(taus, axis=1)
    np.testing.assert_allclose(d["tau_norm"][g], norms, rtol=1e-5)
    np.testing.assert_allclose(d["cosine"][g], taus @ taus.T / np.outer(norms, norms),
                               rtol=1e-5, atol=1e-6)
    conflict = lambda t: np.mean(np.any(t > 0, 0) & np.any(t < 0, 0))
    trimmed = np.stack([_ref_trim(t, 0.3) for t in taus])
    np.testing.assert_allclose(d["sign_conflict"][g], conflict(taus), atol=1e-6)
    np.testing.assert_allclose(d["ties_sign_conflict"][g], conflict(trimmed), atol=1e-6)
    np.testing.assert_allclose(d["ties_sparsity"][g], (trimmed == 0).mean(1), atol=1e-6)
    np.testing.assert_allclose(d["ties_merged_sparsity"][g],
                               np.mean(_ref_ties_update(trimmed) == 0), atol=1e-6)
