"""stability.merge: every merge == a per-model numpy reference; properties; bad inputs."""
import functools

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
  want = _ref_linear(x0, stack, GROUPS, w / w.sum(1, keepdims=True), np.zeros(4))
  _assert_tree_close(merge.average(x0, stack, GROUPS, w), want)
  _assert_tree_close(merge.weighted_average(x0, stack, GROUPS, w, chunk_size=3), want)


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


def _ref_lowbias32(x):
  x = x.astype(np.uint64)
  x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
  x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def _ref_dare_taus(x0, stack, row, g, key, p, rescale):
  """Documented contract: member m of group g keeps entry j iff u >= p, u = (h >> 8) / 2^24,
  h = mix(mix(j ^ s0) + s1), (s0, s1) = bits(fold_in(fold_in(key, g), m)) (64-bit numpy here)."""
  taus = _flat_taus(x0, stack, row)
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
  masks = [np.concatenate([np.asarray(a).reshape(M, -1) for a in merge._dare_masks(
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


@pytest.mark.parametrize("base,rescale", [("average", True), ("task_arithmetic", False),
                                          ("ties", True)])
def test_dare_with_p0_is_its_base(base, rescale):
  x0, stack = _trees()
  got = merge.dare(x0, stack, GROUPS, key=jax.random.key(0), p=0.0, base=base, k=0.5,
                   rescale=rescale)
  want = {"average": lambda: merge.average(x0, stack, GROUPS),
          "task_arithmetic": lambda: merge.task_arithmetic(x0, stack, GROUPS),
          "ties": lambda: merge.ties(x0, stack, GROUPS, k=0.5)}[base]()
  _assert_tree_close(got, want, rtol=1e-5, atol=1e-6)


def test_dare_drop_rate_and_diagnostics_agree():
  x0, stack = _trees(E=7)
  key = jax.random.key(9)
  d = merge.diagnostics(x0, stack, GROUPS, key=key, p=0.3, k=0.3)
  assert abs(float(np.mean(d["dare_sparsity"])) - 0.3) < 0.05
  # Masks are the ones dare() uses: p -> realised zeros of the unrescaled task vectors.
  got = merge.dare(x0, stack, GROUPS, key=key, p=0.3, rescale=False, base="task_arithmetic",
                   lam=1.0, k=0.5, weights=np.eye(3)[[0, 0, 0, 0]])  # member 0 alone
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


def test_solve_matches_numpy_and_pivots():
  rng = np.random.default_rng(12)
  A, B = rng.normal(size=(9, 9)), rng.normal(size=(9, 4))
  A[0, 0] = 0.0                                     # the first pivot must come from another row
  np.testing.assert_allclose(merge.solve(jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)),
                             np.linalg.solve(A, B), rtol=1e-4, atol=1e-4)
  P = np.eye(6)[[3, 0, 5, 1, 2, 4]]                 # zero diagonal: fails without pivoting
  np.testing.assert_allclose(merge.solve(jnp.asarray(P, jnp.float32), jnp.eye(6)), P.T, atol=1e-6)


def test_regmean_lowers_without_lapack_calls():
  # jaxlib 0.10's batched LAPACK kernels deadlock XLA:CPU's thread pool when as many run at
  # once as it has threads (two layers' solves on 2 cores hung within a few calls); RegMean's
  # solve is plain jnp, so its program has no custom calls at all.
  x0, stack = _trees()
  g = jnp.asarray(GROUPS)
  grams = _grams(7, 8)
  layout = tuple(sorted(merge._regmean_layout(x0, grams, 7).items()))
  text = merge._regmean.lower(x0, stack, grams, g, jnp.full(GROUPS.shape, 1 / 3),
                              jnp.float32(0.6), jnp.float32(1e-6), layout, None).as_text()
  assert "custom_call" not in text


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


def _identical():
  """Seven identical experts, shaped like `_trees()` so the compiled merges are reused."""
  x0, stack = _trees()
  return x0, jax.tree.map(lambda s: np.repeat(s[:1], 7, axis=0), stack)


@pytest.mark.parametrize("name,kw", [
    ("average", {}), ("weighted_average", {"weights": np.arange(1.0, 13.0).reshape(4, 3)}),
    ("ties", {"k": 1.0}), ("dare_average", {"key": jax.random.key(0), "p": 0.0, "k": 0.5}),
    ("model_stock", {}), ("uniform_soup", {}), ("fisher", "F"), ("regmean", "G")])
def test_identical_experts_merge_to_that_expert(name, kw):
  x0, stack = _identical()
  if kw == "F":
    kw = {"fishers": _positive_like(stack, 1), "eps": 1e-3}
  elif kw == "G":
    kw = {"grams": _grams(7, 2)}
  got = merge.merge(name, x0, stack, GROUPS, **kw)
  _assert_tree_close(got, jax.tree.map(lambda s: s[:4], stack), rtol=1e-5, atol=1e-5)


def test_identical_experts_slerp_to_that_expert():
  x0, stack = _identical()
  got = merge.slerp(x0, stack, np.array([[0, 1], [2, 5], [0, 6]], np.int32), t=0.3)
  _assert_tree_close(got, jax.tree.map(lambda s: s[:3], stack), rtol=1e-5, atol=1e-6)


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
  d = merge.diagnostics(x0, stack, GROUPS, k=0.3, key=jax.random.key(1))
  d_chunked = merge.diagnostics(x0, stack, GROUPS, k=0.3, key=jax.random.key(1), chunk_size=3)
  for name in d:
    np.testing.assert_allclose(d_chunked[name], d[name], rtol=1e-6, atol=1e-7, err_msg=name)
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


# ---------------------------------------------------------------------------------------------
# Data-dependent merges: Fisher and Gram helpers, AdaMerging, greedy soup, logit ensemble


@functools.lru_cache(maxsize=None)
def _setup(E=5, N=8, seed=0):
  """A tiny MLP, E experts (pretrained backbone + noise, random heads), per-expert data."""
  from stability.models import get_model
  model = get_model("mlp", 3, widths=(6, 5))
  shape = (4, 4, 1)
  k0, k1 = jax.random.split(jax.random.key(seed))
  x0 = jax.jit(model.init_backbone, static_argnums=1)(k0, shape)
  rng = np.random.default_rng(seed)
  stack = jax.tree.map(
      lambda a: (a[None] + 0.3 * rng.normal(size=(E,) + a.shape)).astype(np.float32), x0)
  heads = jax.jit(jax.vmap(lambda k: model.init_head(k, x0, shape)))(jax.random.split(k1, E))
  x = rng.uniform(0, 1, (E, N) + shape).astype(np.float32)
  nc = np.array([2, 3, 3, 2, 3][:E], np.int32)
  y = (rng.integers(0, 6, (E, N)) % nc[:, None]).astype(np.int32)
  mask = np.ones((E, N), np.float32)
  mask[1, -3:] = 0.0  # padding rows
  return model, x0, stack, heads, x, y, nc, mask


def _expert(stack, heads, i):
  return {"backbone": jax.tree.map(lambda a: a[i], stack),
          "head": jax.tree.map(lambda a: a[i], heads)}


def test_diag_fisher_vmapped_matches_per_sample_loop():
  from stability.models import per_sample_loss
  model, x0, stack, heads, x, y, nc, mask = _setup()
  params = {"backbone": stack, "head": heads}
  F = jax.jit(jax.vmap(lambda p, xx, yy, c, m: merge.diag_fisher(model, p, xx, yy, c, m)))(
      params, x, y, nc, mask)

  @jax.jit
  def grad_n(p, xn, yn, c):
    return jax.grad(lambda bb: per_sample_loss(model, {"backbone": bb, "head": p["head"]},
                                               xn[None], yn[None], c)[0][0])(p["backbone"])

  for e in (1,):  # expert 1 has padding rows
    p = _expert(stack, heads, e)
    sq = [jax.tree.map(np.square, grad_n(p, x[e, n], y[e, n], nc[e]))
          for n in range(x.shape[1]) if mask[e, n]]
    want = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *sq)
    _assert_tree_close(jax.tree.map(lambda a: a[e], F), want, rtol=1e-5, atol=1e-7)


def test_gram_matrices_capture_every_dense_input():
  model, x0, stack, heads, x, y, nc, mask = _setup()
  grams = jax.jit(jax.vmap(lambda bb, xx, m: merge.gram_matrices(model, bb, xx, m)))(
      stack, x, mask)
  assert set(grams) == {"Dense_0", "Dense_1"}
  for e in (0, 1):
    m = mask[e].astype(bool)
    h0 = x[e][m].reshape(m.sum(), -1).astype(np.float64)
    k0, b0 = (np.asarray(stack["Dense_0"][n][e], np.float64) for n in ("kernel", "bias"))
    h1 = np.maximum(h0 @ k0 + b0, 0.0)
    np.testing.assert_allclose(grams["Dense_0"][e], h0.T @ h0 / m.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grams["Dense_1"][e], h1.T @ h1 / m.sum(), rtol=1e-5, atol=1e-6)
  merged = merge.regmean(x0, stack, np.array([[0, 1, 2]]), grams=grams)  # runs end to end
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(merged))


def _ref_member_logits(model, backbone, heads, rows, x_rows, nc):
  """Masked logits per member m (its head, its inputs), Python loop over members."""
  from stability.models import masked_logits
  out = []
  for m, i in enumerate(rows):
    params = {"backbone": backbone, "head": jax.tree.map(lambda a: a[i], heads)}
    out.append(masked_logits(model.apply(params, x_rows[m]), nc[i]))
  return out


@pytest.mark.parametrize("granularity,chunk", [("task", None), ("layer", 1)])
def test_adamerging_matches_per_group_loop(granularity, chunk):
  import optax
  model, x0, stack, heads, x, y, nc, mask = _setup()
  groups = np.array([[0, 1], [2, 4]], np.int32)
  key, steps, bs, L = jax.random.key(3), 3, 4, len(jax.tree.leaves(x0))
  kw = dict(model=model, heads=heads, x=x, num_classes=nc, key=key, mask=mask,
            granularity=granularity, steps=steps, batch_size=bs, lr=0.05, chunk_size=chunk)
  lam = merge.adamerging_coefficients(x0, stack, groups, **kw)
  assert lam.shape == ((2, 2) if granularity == "task" else (2, 2, L))

  def entropy(lam_m, kb, rows):
    lam_ml = jnp.broadcast_to(jnp.reshape(lam_m, (2, -1)), (2, L))
    leaves = [a0 + sum(lam_ml[m, l] * (s[rows[m]] - a0) for m in range(2))
              for l, (a0, s) in enumerate(zip(jax.tree.leaves(x0), jax.tree.leaves(stack)))]
    merged = jax.tree.unflatten(jax.tree.structure(x0), leaves)
    keys = jax.random.split(kb, 2)
    total = 0.0
    for m in range(2):
      i = rows[m]
      p_i = jnp.asarray(mask)[i] / jnp.sum(jnp.asarray(mask)[i])
      xb = jnp.asarray(x)[i][jax.random.choice(keys[m], x.shape[1], (bs,), p=p_i)]
      logits = _ref_member_logits(model, merged, heads, [i], [xb], jnp.asarray(nc))[0]
      logp = jax.nn.log_softmax(logits)
      total = total + jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))
    return total

  opt = optax.adam(0.05)

  @jax.jit
  def run_group(g, rows):
    """One group, step by step: Adam on the entropy, then clip to [0, 1]."""
    lam_g = jnp.full((2,) if granularity == "task" else (2, L), 0.3)
    state = opt.init(lam_g)
    for i in range(steps):
      gr = jax.grad(entropy)(lam_g, jax.random.fold_in(jax.random.fold_in(key, g), i), rows)
      upd, state = opt.update(gr, state, lam_g)
      lam_g = jnp.clip(optax.apply_updates(lam_g, upd), 0.0, 1.0)
    return lam_g

  for g, rows in enumerate(groups):
    np.testing.assert_allclose(lam[g], run_group(g, rows), rtol=1e-4, atol=1e-5)
  # The merged backbone is x0 + sum_m lam_m tau_m with those coefficients.
  lam_gml = np.broadcast_to(np.asarray(lam).reshape(2, 2, -1), (2, 2, L))
  want = []
  for g, rows in enumerate(groups):
    want.append({p: a0 + sum(lam_gml[g, m, l] * (s[i] - a0) for m, i in enumerate(rows))
                 for l, ((p, a0), (_, s)) in enumerate(zip(_items(x0), _items(stack)))})
  got = merge.adamerging(x0, stack, groups, **kw)
  _assert_tree_close(got, _stack_ref(want, x0), rtol=1e-5, atol=1e-5)


def _ref_accuracy(model, backbone, heads, rows, x, y, nc, mask):
  accs = []
  for m, logits in enumerate(_ref_member_logits(model, backbone, heads, rows,
                                                [x[i] for i in rows], nc)):
    i = rows[m]
    accs.append(np.sum((np.argmax(logits, -1) == y[i]) * mask[i]) / mask[i].sum())
  return float(np.mean(accs))


def test_greedy_soup_matches_reference_and_never_loses_to_its_best_member():
  model, x0, stack, heads, x, y, nc, mask = _setup()
  groups = np.array([[0, 1, 2], [3, 4, 0], [2, 3, 4], [1, 3, 0]], np.int32)
  soup, info = merge.greedy_soup(x0, stack, groups, model=model, heads=heads, x=x, y=y,
                                 num_classes=nc, mask=mask, return_info=True, chunk_size=2)
  for g, rows in enumerate(groups):
    members = [jax.tree.map(lambda a: np.asarray(a[i], np.float64), stack) for i in rows]
    acc = lambda bb: _ref_accuracy(model, bb, heads, rows, x, y, nc, mask)
    member_acc = [acc(b) for b in members]
    np.testing.assert_allclose(info["member_accuracy"][g], member_acc, atol=1e-6)
    ingredients, best, included = [], -1.0, np.zeros(3, bool)
    for j in np.argsort(-np.asarray(member_acc), kind="stable"):
      cand = jax.tree.map(lambda *a: np.mean(a, 0), *(ingredients + [members[j]]))
      a = acc(cand)
      if not ingredients or a >= best:
        ingredients, best, included[j] = ingredients + [members[j]], a, True
    np.testing.assert_array_equal(info["included"][g], included)
    want = jax.tree.map(lambda *a: np.mean(a, 0), *ingredients)
    _assert_tree_close(jax.tree.map(lambda a: a[g], soup), want)
    got_acc = acc(jax.tree.map(lambda a: np.asarray(a[g]), soup))
    assert got_acc >= max(member_acc) - 1e-9
    assert float(info["accuracy"][g]) == pytest.approx(got_acc)


def test_ensemble_averages_member_logits():
  model, x0, stack, heads, x, y, nc, mask = _setup()
  groups = np.array([[0, 1, 2], [4, 3, 1]], np.int32)
  w = np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
  got = np.asarray(merge.ensemble(x0, stack, groups, w, model=model, heads=heads, x=x,
                                  num_classes=nc))
  assert got.shape == (2, 3, x.shape[1], 3)
  for g, rows in enumerate(groups):
    wg = w[g] / w[g].sum()
    per_backbone = [_ref_member_logits(model, jax.tree.map(lambda a: a[j], stack), heads, rows,
                                       [x[i] for i in rows], nc) for j in rows]
    for t, i in enumerate(rows):
      want = sum(wg[j] * np.asarray(per_backbone[j][t], np.float64) for j in range(3))
      np.testing.assert_allclose(got[g, t, :, :nc[i]], want[:, :nc[i]], rtol=1e-5, atol=1e-5)
      assert np.all(got[g, t, :, nc[i]:] < -1e8)


# ---------------------------------------------------------------------------------------------
# Registry and bad inputs


def test_registry_dispatches_and_lists_names():
  x0, stack = _trees()
  assert merge.get("average") is merge.average
  _assert_tree_close(merge.merge("task_arithmetic", x0, stack, GROUPS, lam=0.5),
                     merge.task_arithmetic(x0, stack, GROUPS, lam=0.5), rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"algorithm: unknown merge 'mean'; allowed: .*average"):
    merge.merge("mean", x0, stack, GROUPS)


def _bad_cases():
  """(id, merge function, positional args, keyword args, expected message)."""
  x0, stack = _trees()
  other = {**x0, "extra": np.zeros(2, np.float32)}
  wrong_shape = jax.tree.map(lambda s: s[..., :1] if s.ndim > 2 else s, stack)
  short_e = {**stack, "Conv_0": {"kernel": stack["Conv_0"]["kernel"][:3]}}
  key = jax.random.key(0)
  tasks = np.array([0, 1, 2, 0, 1, 2, 3])
  G = _grams(7, 0)["Dense_0"]
  base = (x0, stack, GROUPS)
  pairs = (x0, stack, GROUPS[:, :2])
  avg, ties, dare, regmean = merge.average, merge.ties, merge.dare, merge.regmean
  return [
      ("structure", avg, (other, stack, GROUPS), {}, r"stack: tree structure"),
      ("shape", avg, (x0, wrong_shape, GROUPS), {}, r"stack: leaf .* has shape"),
      ("E", avg, (x0, short_e, GROUPS), {}, r"stack: leaves disagree on the expert axis E"),
      ("M=0", avg, (x0, stack, np.zeros((2, 0), np.int32)), {}, r"groups: empty group \(M=0\)"),
      ("1-D", avg, (x0, stack, np.array([0, 1])), {}, r"groups: must be a 2-D integer"),
      ("float", avg, (x0, stack, GROUPS * 1.0), {}, r"groups: must be a 2-D integer"),
      ("range", avg, (x0, stack, GROUPS + 1), {}, r"groups: indices must lie in \[0, E=7\)"),
      ("negative", ties, (x0, stack, -GROUPS), {}, r"groups: indices must lie"),
      ("repeat", avg, base, {"tasks": tasks}, r"groups: group 2 repeats a task"),
      ("tasks", avg, base, {"tasks": tasks[:3]}, r"tasks: must be an int array of shape"),
      ("weights", avg, base, {"weights": np.ones((4, 2))}, r"weights: must have shape"),
      ("weights<0", avg, base, {"weights": -np.ones((4, 3))}, r"weights: an average needs"),
      ("lam", merge.task_arithmetic, base, {"lam": -0.1}, r"lam: must be in \[0"),
      ("lam nan", ties, base, {"lam": float("nan")}, r"lam: must be"),
      ("k=0", ties, base, {"k": 0.0}, r"k: must be in \(0.0, 1.0\]"),
      ("k=20", ties, base, {"k": 20}, r"k: must be in \(0.0, 1.0\]"),
      ("p=1", dare, base, {"key": key, "p": 1.0}, r"p: must be in \[0.0, 1.0\)"),
      ("p<0", dare, base, {"key": key, "p": -0.1}, r"p: must be in"),
      ("key", dare, base, {"key": None}, r"key: .*explicit jax.random key"),
      ("base", dare, base, {"key": key, "base": "fisher"},
       r"base: unknown DARE base merge 'fisher'; allowed: average, task_arithmetic, ties"),
      ("t", merge.slerp, pairs, {"t": 1.5}, r"t: must be in \[0.0, 1.0\]"),
      ("pairs", merge.slerp, base, {}, r"groups: slerp merges pairs \(M=2\)"),
      ("stock M", merge.model_stock, (x0, stack, GROUPS[:, :1]), {},
       r"groups: model_stock needs M >= 2"),
      ("alpha", regmean, base, {"grams": {"Dense_0": G}, "alpha": 2.0}, r"alpha: must be in"),
      ("grams", regmean, base, {"grams": {"Dense_9": G}}, r"grams: Dense_9 names no Dense"),
      ("gram shape", regmean, base, {"grams": {"Dense_0": G[:, :3, :3]}},
       r"grams: Dense_0 has shape"),
      ("fishers", merge.fisher, base, {"fishers": jax.tree.map(lambda s: -s, stack)},
       r"fishers: must be finite and >= 0"),
      ("chunk", avg, base, {"chunk_size": 0}, r"chunk_size: must be a positive int or None"),
      ("name", merge.merge, ("mean",) + base, {}, r"algorithm: unknown merge 'mean'; allowed:"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_cases())),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_a_clear_value_error(case, monkeypatch):
  _, fn, args, kwargs, message = _bad_cases()[case]
  # Validation happens before any compute: nothing may be jitted on the way to the error.
  for private in ("_linear", "_ties", "_dare", "_fisher", "_regmean", "_slerp", "_model_stock"):
    monkeypatch.setattr(merge, private, lambda *a, **k: pytest.fail("computed before validating"))
  with pytest.raises(ValueError, match=message):
    fn(*args, **kwargs)


def test_data_dependent_bad_inputs():
  model, x0, stack, heads, x, y, nc, mask = _setup()
  groups = np.array([[0, 1]], np.int32)
  kw = dict(model=model, heads=heads, num_classes=nc, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"x: must be per-expert inputs \[E=5, N, ...\]"):
    merge.adamerging(x0, stack, groups, x=x[:2], **kw)
  with pytest.raises(ValueError, match=r"granularity: unknown 'block'; allowed: task, layer"):
    merge.adamerging(x0, stack, groups, x=x, granularity="block", **kw)
  with pytest.raises(ValueError, match=r"mask: every expert needs at least one real sample"):
    merge.adamerging(x0, stack, groups, x=x, mask=np.zeros_like(mask), **kw)
  with pytest.raises(ValueError, match=r"y: must be int labels"):
    merge.greedy_soup(x0, stack, groups, model=model, heads=heads, x=x, y=y[:, :2],
                      num_classes=nc)


@pytest.mark.parametrize("name,hp", [("average", {}), ("ties", dict(k=0.3)),
                                     ("dare_average", dict(key=jax.random.key(1), p=0.3))])
def test_stack_sharded_over_8_devices_merges_like_unsharded(name, hp):
  """The trainer returns stacks sharded over the expert axis; merges gather them first."""
  from stability import sharding
  x0, stack = _trees(E=8)
  mesh = sharding.expert_mesh(jax.devices()[:8])
  sharded = sharding.shard(stack, mesh)
  assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
  want = merge.merge(name, x0, stack, GROUPS, **hp)
  got = merge.merge(name, x0, sharded, GROUPS, **hp)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
