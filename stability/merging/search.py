"""Coefficient search for task arithmetic: lam per task (or per task and layer) chosen against a
validation objective, vmapped over groups.

The merged model of coefficients lam [M] (or [M, L]) is x = x0 + sum_m lam_m tau_m. An objective
maps lam for every group at once, [G, *shape] -> losses [G, T] (T objectives: one per task for
the Pareto front; any number for the scalar searches, which minimise their mean).
`task_losses(...)` builds the standard one: each member's held-out cross-entropy with its own
head under the merged backbone (the labelled data of the greedy soup).

  grid_search(f, candidates)             every candidate [C, *shape] for every group
  random_search(f, key, n, shape, lo, hi)  n uniform draws per group
  es_search(f, key, init, ...)           OpenAI-ES (antithetic Gaussian perturbations, rank-
                                         normalised fitness, Adam), vmapped over groups
  map_pareto(f, key, n, shape, lo, hi, prefs)  MAP (Li et al., 2024): a quadratic surrogate of
                                         each task's loss in lam fitted by least squares on n
                                         samples, then the minimiser of sum_t w_t Q_t over the box
                                         per preference w: the amortised Pareto front

All return the chosen lam [G, *shape] and its objective; a larger lam multiplies the merge's
twin distance (the stability term) by lam^2 for task arithmetic (tests/merging/search_test.py).
evosax 0.3.2 installs from the package index and imports with this jax (0.10.2) in a scratch
venv, but it is not a project dependency (pyproject.toml and the shared .venv are the lead's):
this ~30-line ES is the same algorithm as its `Open_ES` (docs/merging.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stability.merging.base import (check_data, check_scalar, flatten_stack, gather_tree,
                                    member_logits, prepare)
from stability.sharding import on_one_device

Objective = Callable[[jax.Array], jax.Array]   # lam [G, *shape] -> losses [G, T]


def task_losses(x0, stack, groups, *, model, heads, x, y, num_classes, mask=None,
                tasks=None) -> Objective:
  """lam [G, M] or [G, M, L] -> each member's masked cross-entropy [G, M] of x0 + sum_m lam_m
  tau_m with its own head on its own labelled rows (held-out data for a validation search)."""
  E, g, _ = prepare(x0, stack, groups, tasks, None)
  x, nc, mk, y = check_data(E, x, num_classes, mask, heads, y)
  if y is None:
    raise ValueError("y: task_losses needs labels")
  x0, stack = on_one_device(x0), on_one_device(stack)
  g = jnp.asarray(g)
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)

  def one(idx_M, lam):
    lam_ML = lam.reshape(lam.shape[0], -1)
    merged = treedef.unflatten([
        a0.astype(jnp.float32) + jnp.tensordot(lam_ML[:, min(l, lam_ML.shape[1] - 1)],
                                               s[idx_M].astype(jnp.float32) - a0[None], 1)
        for l, (a0, s) in enumerate(zip(leaves0, leaves_s))])
    logp = jax.nn.log_softmax(member_logits(model, merged, gather_tree(heads, idx_M), x[idx_M],
                                            nc[idx_M]))
    nll = -jnp.take_along_axis(logp, y[idx_M][..., None], axis=-1)[..., 0]     # [M, N]
    return jnp.sum(nll * mk[idx_M], 1) / jnp.sum(mk[idx_M], 1)

  return jax.jit(lambda lam: jax.vmap(one)(g, lam))


def _best(values_CxG, cands_CxG):
  i = jnp.argmin(values_CxG, axis=0)
  pick = jnp.take_along_axis(cands_CxG, i.reshape((1, -1) + (1,) * (cands_CxG.ndim - 2)),
                             axis=0)[0]
  return pick, jnp.min(values_CxG, axis=0)


def grid_search(f: Objective, candidates: Any, G: int):
  """Every candidate lam [C, *shape] for every group: (best lam [G, *shape], its mean loss [G])."""
  c = jnp.asarray(candidates, jnp.float32)
  if c.ndim < 2 or not np.all(np.isfinite(np.asarray(c))):
    raise ValueError(f"grid_search: candidates must be finite [C, *shape], got shape {c.shape}")
  cands = jnp.broadcast_to(c[:, None], (c.shape[0], G) + c.shape[1:])
  vals = jax.lax.map(lambda lam: jnp.mean(f(lam), axis=1), cands)
  return _best(vals, cands)


def random_search(f: Objective, key: Any, n: int, shape: tuple, G: int, lo: float = 0.0,
                  hi: float = 1.0):
  """n uniform draws of lam in [lo, hi]^shape per group (independent across groups)."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"random_search: n must be a positive int, got {n!r}")
  lo = check_scalar("random_search: lo", lo, -math.inf, math.inf)
  hi = check_scalar("random_search: hi", hi, lo, math.inf, lo_open=True)
  cands = jax.random.uniform(key, (n, G) + tuple(shape), jnp.float32, lo, hi)
  vals = jax.lax.map(lambda lam: jnp.mean(f(lam), axis=1), cands)
  return _best(vals, cands)


def es_search(f: Objective, key: Any, init: Any, *, sigma: float = 0.1, popsize: int = 8,
              steps: int = 50, lr: float = 0.05, lo: float = 0.0, hi: float = 2.0):
  """OpenAI-ES (Salimans et al., 2017) per group: popsize/2 antithetic pairs lam +- sigma eps,
  fitness rank-normalised to [-0.5, 0.5], gradient estimate sum_i r_i eps_i / (popsize sigma),
  Adam steps, lam clipped to [lo, hi]. Returns the best lam evaluated along the run."""
  sigma = check_scalar("es_search: sigma", sigma, 0.0, math.inf, lo_open=True)
  lr = check_scalar("es_search: lr", lr, 0.0, math.inf, lo_open=True)
  if not isinstance(popsize, int) or popsize < 2 or popsize % 2:
    raise ValueError(f"es_search: popsize must be an even int >= 2, got {popsize!r}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"es_search: steps must be a positive int, got {steps!r}")
  lam0 = jnp.asarray(init, jnp.float32)
  opt = optax.adam(lr)
  h = popsize // 2

  def step(carry, k):
    lam, st, best, best_v = carry
    eps = jax.random.normal(k, (h,) + lam.shape)
    pop = jnp.concatenate([lam[None] + sigma * eps, lam[None] - sigma * eps])  # [P, G, ...]
    v = jax.lax.map(lambda l: jnp.mean(f(jnp.clip(l, lo, hi)), axis=1), pop)   # [P, G]
    r = jnp.argsort(jnp.argsort(v, axis=0), axis=0) / (popsize - 1) - 0.5
    e2 = jnp.concatenate([eps, -eps])
    grad = jnp.einsum("pg,pg...->g...", r, e2) / (popsize * sigma)
    upd, st = opt.update(grad, st)
    lam = jnp.clip(optax.apply_updates(lam, upd), lo, hi)
    cand, cv = _best(jnp.concatenate([v, best_v[None]]),
                     jnp.concatenate([jnp.clip(pop, lo, hi), best[None]]))
    return (lam, st, cand, cv), None

  v0 = jnp.mean(f(lam0), axis=1)
  carry = (lam0, opt.init(lam0), lam0, v0)
  (_, _, best, best_v), _ = jax.lax.scan(step, carry, jax.random.split(key, steps))
  return best, best_v


def _features(lam_NxP):
  """[1, lam_i, lam_i lam_j (i <= j)] per row: the quadratic surrogate's design matrix."""
  P = lam_NxP.shape[1]
  iu = np.triu_indices(P)
  quad = (lam_NxP[:, :, None] * lam_NxP[:, None, :])[:, iu[0], iu[1]]
  return jnp.concatenate([jnp.ones((lam_NxP.shape[0], 1)), lam_NxP, quad], axis=1)


def fit_quadratic(lam_NxP, loss_NxT, ridge: float = 1e-6):
  """Least-squares coefficients [T, F] of each objective's quadratic surrogate in lam."""
  X = _features(lam_NxP)
  A = X.T @ X + ridge * jnp.eye(X.shape[1])
  return jnp.linalg.solve(A, X.T @ loss_NxT).T


def eval_quadratic(coef_TxF, lam_P):
  return coef_TxF @ _features(lam_P[None])[0]


def map_pareto(f: Objective, key: Any, n: int, P: int, G: int, prefs: Any, *,
               lo: float = 0.0, hi: float = 1.0, iters: int = 300, lr: float = 0.05):
  """MAP: sample n lam ~ U[lo, hi]^P per group, evaluate the T task losses, fit one quadratic
  surrogate per task and group, then per preference w [W, T] (rows on the simplex) minimise
  sum_t w_t Q_t(lam) over the box by projected Adam. Returns lam [W, G, P], the surrogate losses
  [W, G, T] (the amortised front) and the true losses at lam [W, G, T] (for checking it)."""
  w = np.asarray(prefs, np.float64)
  if w.ndim != 2 or np.any(w < 0) or not np.allclose(w.sum(1), 1):
    raise ValueError("map_pareto: prefs must be [W, T] rows on the simplex (>= 0, sum 1)")
  lam = jax.random.uniform(key, (n, G, P), jnp.float32, lo, hi)
  loss = jax.lax.map(f, lam)                                            # [n, G, T]
  if loss.shape[2] != w.shape[1]:
    raise ValueError(f"map_pareto: prefs have {w.shape[1]} columns, the objective {loss.shape[2]}")
  coef = jax.vmap(fit_quadratic, (1, 1))(lam, loss)                     # [G, T, F]
  w = jnp.asarray(w, jnp.float32)

  def solve(c_TxF, w_T):
    obj = lambda l: w_T @ eval_quadratic(c_TxF, l)
    opt = optax.adam(lr)

    def body(carry, _):
      l, st = carry
      upd, st = opt.update(jax.grad(obj)(l), st)
      return (jnp.clip(optax.apply_updates(l, upd), lo, hi), st), None

    l0 = jnp.full((P,), (lo + hi) / 2, jnp.float32)
    return jax.lax.scan(body, (l0, opt.init(l0)), None, length=iters)[0][0]

  lam_WxGxP = jax.vmap(lambda wt: jax.vmap(lambda c: solve(c, wt))(coef))(w)
  surrogate = jax.vmap(lambda L: jax.vmap(eval_quadratic)(coef, L))(lam_WxGxP)
  return lam_WxGxP, surrogate, jax.lax.map(f, lam_WxGxP)


def pareto_mask(losses_WxT) -> np.ndarray:
  """True for the rows no other row dominates (<= in every objective, < in one)."""
  L = np.asarray(losses_WxT)
  le = np.all(L[:, None] <= L[None], axis=2) & np.any(L[:, None] < L[None], axis=2)
  return ~le.any(0)
