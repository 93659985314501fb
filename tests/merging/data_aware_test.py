"""stability.merging.data_aware: Fisher merging and RegMean == numpy references; the pivoted
solve; diag_fisher and gram_matrices == per-sample loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging
from stability.merging import data_aware
from tests.merging.helpers import (GROUPS, assert_tree_close, items, positive_like,
                                   random_grams, setup, stack_ref, trees)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_reference(normalize):
  x0, stack = trees()
  F = positive_like(stack, 6)
  w = np.random.default_rng(7).uniform(0.5, 1.5, GROUPS.shape)
  got = merging.fisher(x0, stack, GROUPS, w, fishers=F, eps=1e-3, normalize=normalize)
  norms = np.sqrt(sum((np.asarray(f, np.float64) ** 2).reshape(7, -1).sum(1)
                      for f in jax.tree.leaves(F)))
  per_group = []
  for g, row in enumerate(GROUPS):
    wg = w[g] / w[g].sum()
    c = wg / (norms[row] + 1e-3) if normalize else wg
    merged = {}
    for (p, s), (_, f) in zip(items(stack), items(F)):
      num = sum(c[m] * (f[i] + 1e-3) * s[i] for m, i in enumerate(row))
      den = sum(c[m] * (f[i] + 1e-3) for m, i in enumerate(row))
      merged[p] = num / den
    per_group.append(merged)
  assert_tree_close(got, stack_ref(per_group, x0))
  assert_tree_close(merging.fisher(x0, stack, GROUPS, w, fishers=F, eps=1e-3, normalize=normalize,
                                   chunk_size=3), got, rtol=1e-6, atol=1e-6)


def test_regmean_matches_reference():
  x0, stack = trees()
  grams = random_grams(7, 8)
  alpha, w = 0.4, np.random.default_rng(9).uniform(0.5, 1.5, GROUPS.shape)
  got = merging.regmean(x0, stack, GROUPS, w, grams=grams, alpha=alpha, ridge=0.0)
  per_group = []
  for g, row in enumerate(GROUPS):
    wg = w[g] / w[g].sum()
    merged = {p: sum(wg[m] * s[i] for m, i in enumerate(row)) for p, s in items(stack)}
    A = np.zeros((5, 5))
    B = np.zeros((5, 4))
    for m, i in enumerate(row):
      Gm = np.asarray(grams["Dense_0"][i], np.float64)
      Gm = Gm * alpha + np.diag(np.diag(Gm)) * (1 - alpha)
      A += wg[m] * Gm
      B += wg[m] * Gm @ np.asarray(stack["Dense_0"]["kernel"][i], np.float64)
    merged["['Dense_0']['kernel']"] = np.linalg.solve(A, B)
    per_group.append(merged)
  assert_tree_close(got, stack_ref(per_group, x0), rtol=1e-4, atol=1e-5)
  assert_tree_close(merging.regmean(x0, stack, GROUPS, w, grams=grams, alpha=alpha, ridge=0.0,
                                    chunk_size=3), got, rtol=1e-6, atol=1e-6)


def test_regmean_with_identical_grams_is_the_average():
  x0, stack = trees()
  grams = {"Dense_0": np.repeat(random_grams(1, 10)["Dense_0"], 7, axis=0)}
  assert_tree_close(merging.regmean(x0, stack, GROUPS, grams=grams),
                    merging.average(x0, stack, GROUPS), rtol=1e-4, atol=1e-5)


def test_regmean_dead_inputs_fall_back_to_the_average():
  x0, stack = trees()
  G = random_grams(7, 11)["Dense_0"]
  G[:, 2, :] = 0.0
  G[:, :, 2] = 0.0                                   # input 2 dead for every expert
  got = merging.regmean(x0, stack, GROUPS, grams={"Dense_0": G})
  avg = merging.average(x0, stack, GROUPS)
  assert np.all(np.isfinite(np.asarray(got["Dense_0"]["kernel"])))
  np.testing.assert_allclose(got["Dense_0"]["kernel"][:, 2], avg["Dense_0"]["kernel"][:, 2],
                             rtol=1e-4, atol=1e-5)


def test_solve_matches_numpy_and_pivots():
  rng = np.random.default_rng(12)
  A, B = rng.normal(size=(9, 9)), rng.normal(size=(9, 4))
  A[0, 0] = 0.0                                     # the first pivot must come from another row
  np.testing.assert_allclose(
      merging.solve(jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)),
      np.linalg.solve(A, B), rtol=1e-4, atol=1e-4)
  P = np.eye(6)[[3, 0, 5, 1, 2, 4]]                 # zero diagonal: fails without pivoting
  np.testing.assert_allclose(merging.solve(jnp.asarray(P, jnp.float32), jnp.eye(6)), P.T, atol=1e-6)


def test_regmean_lowers_without_lapack_calls():
  # jaxlib 0.10's batched LAPACK kernels deadlock XLA:CPU's thread pool when as many run at
  # once as it has threads (two layers' solves on 2 cores hung within a few calls); RegMean's
  # solve is plain jnp, so its program has no custom calls at all.
  x0, stack = trees()
  g = jnp.asarray(GROUPS)
  grams = random_grams(7, 8)
  layout = tuple(sorted(data_aware._regmean_layout(x0, grams, 7).items()))
  text = data_aware._regmean.lower(x0, stack, grams, g, jnp.full(GROUPS.shape, 1 / 3),
                                   jnp.float32(0.6), jnp.float32(1e-6), layout, None).as_text()
  assert "custom_call" not in text


def _expert(stack, heads, i):
  return {"backbone": jax.tree.map(lambda a: a[i], stack),
          "head": jax.tree.map(lambda a: a[i], heads)}


def test_diag_fisher_vmapped_matches_per_sample_loop():
  from stability.models import per_sample_loss
  model, x0, stack, heads, x, y, nc, mask = setup()
  params = {"backbone": stack, "head": heads}
  F = jax.jit(jax.vmap(lambda p, xx, yy, c, m: merging.diag_fisher(model, p, xx, yy, c, m)))(
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
    assert_tree_close(jax.tree.map(lambda a: a[e], F), want, rtol=1e-5, atol=1e-7)


def test_gram_matrices_capture_every_dense_input():
  model, x0, stack, heads, x, y, nc, mask = setup()
  grams = jax.jit(jax.vmap(lambda bb, xx, m: merging.gram_matrices(model, bb, xx, m)))(
      stack, x, mask)
  assert set(grams) == {"Dense_0", "Dense_1"}
  for e in (0, 1):
    m = mask[e].astype(bool)
    h0 = x[e][m].reshape(m.sum(), -1).astype(np.float64)
    k0, b0 = (np.asarray(stack["Dense_0"][n][e], np.float64) for n in ("kernel", "bias"))
    h1 = np.maximum(h0 @ k0 + b0, 0.0)
    np.testing.assert_allclose(grams["Dense_0"][e], h0.T @ h0 / m.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grams["Dense_1"][e], h1.T @ h1 / m.sum(), rtol=1e-5, atol=1e-6)
  merged = merging.regmean(x0, stack, np.array([[0, 1, 2]]), grams=grams)  # runs end to end
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(merged))


def test_regmean_plusplus_matches_a_layer_by_layer_reference():
  # numpy, float64, on the tiny MLP (flatten -> Dense_0 -> relu -> Dense_1): Dense_0 from the
  # raw inputs' Grams, then Dense_1 from the Grams of relu(x W0* + b0_avg), the MERGED first
  # layer's activations. Rejects: each member's own activations (plain RegMean with member
  # Grams), the layers merged in reverse order (Dense_1's Grams under the averaged Dense_0), the
  # merged Dense_0 not used for Dense_1's inputs.
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups, alpha = np.array([[0, 1, 2], [3, 4, 1]], np.int32), 0.5
  got = merging.regmean_plusplus(x0, stack, groups, model=model, x=x, mask=mask, alpha=alpha,
                                 ridge=0.01)   # a ReLU unit can be dead: ridge to the average
  per_group = []
  for row in groups:
    merged = {p: s[row].mean(0) for p, s in items(stack)}
    h = [x[i].reshape(len(x[i]), -1).astype(np.float64) for i in row]
    for layer in ("Dense_0", "Dense_1"):
      key = f"['{layer}']['kernel']"
      A, B = 0.0, 0.0
      for m, i in enumerate(row):
        keep = mask[i].astype(bool)
        G = h[m][keep].T @ h[m][keep] / keep.sum()
        G = G * alpha + np.diag(np.diag(G)) * (1 - alpha)
        A, B = A + G / 3, B + G @ np.asarray(stack[layer]["kernel"][i], np.float64) / 3
      r = 0.01 * np.trace(A) / len(A)
      merged[key] = np.linalg.solve(A + r * np.eye(len(A)), B + r * merged[key])
      b = merged[f"['{layer}']['bias']"]
      h = [np.maximum(hm @ merged[key] + b, 0.0) for hm in h]
    per_group.append(merged)
  assert_tree_close(got, stack_ref(per_group, x0), rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="^regmean_plusplus: alpha"):
    merging.regmean_plusplus(x0, stack, groups, model=model, x=x, alpha=1.5)
