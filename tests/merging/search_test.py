"""stability.merging.search (issue #21): grid, random, ES and MAP coefficient search on known
objectives, the task-loss objective == a per-group loop, and the stability term of task
arithmetic scales as lam^2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging, twins
from stability.merging import search
from tests.merging.helpers import ref_member_logits, setup

G, P = 3, 2
OPT = jnp.array([[0.2, 0.7], [0.5, 0.1], [0.9, 0.4]])      # a different optimum per group


def quad(lam):
  """Two objectives per group: ||lam - opt||^2 and ||lam - opt - 0.1||^2 (+ a group offset)."""
  d = lam - OPT
  return jnp.stack([jnp.sum(d * d, -1), jnp.sum((d - 0.1) ** 2, -1)], axis=1)


def test_grid_search_picks_each_groups_argmin():
  # Rejects: one lam for all groups (argmin of the mean over groups), argmax.
  grid = jnp.stack(jnp.meshgrid(jnp.linspace(0, 1, 11), jnp.linspace(0, 1, 11)), -1).reshape(
      -1, 2)
  lam, v = search.grid_search(quad, grid, G)
  np.testing.assert_allclose(lam, OPT + 0.05, atol=0.051)   # the mean's optimum, 0.1 grid
  vals = np.asarray(jax.vmap(lambda c: quad(jnp.broadcast_to(c, (G, P))).mean(1))(grid))
  np.testing.assert_allclose(v, vals.min(0), rtol=1e-6)


def test_random_search_returns_the_best_draw():
  lam, v = search.random_search(quad, jax.random.key(0), 200, (P,), G)
  np.testing.assert_allclose(v, np.asarray(quad(lam)).mean(1), rtol=1e-6)
  assert np.all(np.asarray(v) < 0.02)
  with pytest.raises(ValueError, match="^random_search: n"):
    search.random_search(quad, jax.random.key(0), 0, (P,), G)


def test_es_search_converges_to_each_groups_optimum():
  # Rejects: a gradient estimate with the wrong sign (ascends), groups sharing perturbations'
  # fitness (ranks over the population must be per group).
  lam, v = search.es_search(quad, jax.random.key(1), jnp.full((G, P), 0.5), steps=150,
                            sigma=0.05, popsize=8, lr=0.03, lo=0.0, hi=1.0)
  np.testing.assert_allclose(lam, OPT + 0.05, atol=0.05)


A = np.array([[2.0, 1.0], [1.0, 2.0]])
B = np.array([[1.0, -0.6], [-0.6, 1.0]])


def coupled(lam):
  """Two quadratics with cross terms: Q1 = d'A d, Q2 = (d - 0.1)'B(d - 0.1), d = lam - opt."""
  d = lam - OPT
  return jnp.stack([jnp.einsum("gi,ij,gj->g", d, A, d),
                    jnp.einsum("gi,ij,gj->g", d - 0.1, B, d - 0.1)], axis=1)


def test_map_pareto_recovers_the_exact_front_of_quadratic_objectives():
  # Quadratic objectives: the surrogate is exact, so the front's lam for weight w is the
  # minimiser of w_1 Q_1 + w_2 Q_2: d = (w_1 A + w_2 B)^-1 w_2 B 0.1 (inside the box). Rejects:
  # surrogate features without the cross terms lam_i lam_j or the linear ones, weights applied
  # to the wrong objective.
  prefs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
  lam, sur, true = search.map_pareto(coupled, jax.random.key(2), 40, P, G, prefs, iters=800,
                                     lr=0.02)
  d = [np.linalg.solve(w[0] * A + w[1] * B, w[1] * B @ np.full(2, 0.1)) for w in prefs]
  want = np.asarray(OPT)[None] + np.stack(d)[:, None, :]
  np.testing.assert_allclose(lam, want, atol=2e-3)
  np.testing.assert_allclose(sur, true, atol=1e-4)
  for g in range(G):
    assert search.pareto_mask(np.asarray(true)[:, g]).all()


def test_task_losses_equals_a_per_group_loop():
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1, 2], [3, 4, 1]], np.int32)
  f = search.task_losses(x0, stack, groups, model=model, heads=heads, x=x, y=y,
                         num_classes=nc, mask=mask)
  lam = np.array([[0.2, 0.5, 0.9], [1.0, 0.3, 0.0]], np.float32)
  got = np.asarray(f(jnp.asarray(lam)))
  for g, row in enumerate(groups):
    merged = merging.task_arithmetic(x0, stack, row[None], weights=lam[g][None], lam=1.0)
    bb = jax.tree.map(lambda a: a[0], merged)
    for m, lg in enumerate(ref_member_logits(model, bb, heads, row, x[row], nc)):
      logp = np.asarray(jax.nn.log_softmax(lg))
      nll = -logp[np.arange(len(y[row[m]])), y[row[m]]]
      want = (nll * mask[row[m]]).sum() / mask[row[m]].sum()
      np.testing.assert_allclose(got[g, m], want, rtol=1e-4, atol=1e-5)


def test_stability_term_of_task_arithmetic_scales_as_lam_squared():
  # The merged twin distance ||x(g) - x(g')||^2 = lam^2 ||tau_i - tau_i'||^2: tripling lam
  # multiplies it by 9. Rejects a merge (or twin path) whose distance is linear in lam or does
  # not depend on it (e.g. lam normalised away).
  from tests.twins_test import ARRAYS, BACKBONE, originals
  both = twins.make_twins(originals(), ARRAYS, m=1)
  E = both.origin.shape[0]
  rng = np.random.default_rng(0)
  bb = jax.tree.map(lambda a: (a[None] + 0.1 * rng.normal(size=(E,) + a.shape)).astype(
      np.float32), BACKBONE)
  heads = {"w": np.zeros((E, 2), np.float32)}
  groups = np.array([[0, 1, 2], [1, 2, 3]])
  d = [twins.merged_sq_distances(twins.merge_fn("task_arithmetic", lam=lam), BACKBONE, bb,
                                 heads, groups, both)["backbone"] for lam in (0.2, 0.6)]
  moved = d[0] > 0
  assert moved.sum() >= 4
  np.testing.assert_allclose(d[1][moved] / d[0][moved], 9.0, rtol=1e-3)
