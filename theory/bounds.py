"""Analytic bounds for merged SGD experts: stability, generalization, merges, trade-off, exponents.

Every function is pure and elementwise over broadcastable arrays of hyperparameters. Inputs that
are all numpy/Python numbers are evaluated in numpy float64 (growth factors such as
(1 + eta*L)^(2K) overflow float32 early); if any input is a jax.Array (or a tracer under jit/vmap)
the jax.numpy path is used. Statements, assumptions, proofs and the tests that check them are in
docs/theory.md; the short form:

Per-expert stability of plain minibatch SGD (momentum 0, weight decay 0), twins sharing the init
and the batch-index sequence, sample j replaced by an independent ghost (HRS 2016 style, ours):
    delta_{k+1} <= alpha * delta_k + (2 eta G / b) * 1[j in B_k],
    alpha = 1 (convex, eta <= 2/L: the step is non-expansive),  alpha = 1 + eta L (non-convex),
    => delta_K <= (2 eta G / b) * sum_{k: j in B_k} alpha^(K-1-k)
    => eps2 <= (4 eta^2 G^2 / b^2) * E[(sum_{k: j in B_k} alpha^(K-1-k))^2]       (`eps2_convex`,
                                                                                  `eps2_nonconvex`)
            <= 4 eta^2 G^2 K / (n b) * alpha^(2(K-1)) * (1 + b K / n)               (`*_simple`).
The expectation is exact for the epoch sampler (reshuffle each epoch, drop_last, s = n // b steps
per epoch): with p = b/n and c_k = alpha^(K-1-k),
    E[(sum c_k 1[j in B_k])^2] = p sum_k c_k^2 + p^2 [(sum_k c_k)^2 - sum_epochs (sum_{k in e} c_k)^2].
Convex, self-bounded (Lei & Ying 2020 Thm 3 style, ours; nonnegative loss, epoch sampler):
    eps2 <= 8 L eta^2 ceil(K/s) / (n b) * sum_{k<K} E[F_{B_k}(x_k)]           (`eps2_convex_selfbounded`).

Generalization (Lei & Ying 2020, Thm 2(b); nonnegative L-smooth loss), for every gamma > 0:
    E[F(A(S)) - F_S(A(S))] <= (L/gamma) E[F_S] + ((L + gamma)/2) eps2,
    best gamma* = sqrt(2 L E[F_S] / eps2),  value  L eps2 / 2 + sqrt(2 L E[F_S] eps2).

Merges (ours): x0 + sum_i w_i m_i * tau_i with a mask m_i shared by the twins moves only expert i,
    eps2_merged = sum_i p_i w_i^2 kappa_i eps2_i,  kappa = 1 (no mask; upper bound for any fixed 0/1
    mask), = 1/(1 - p_drop) in expectation for DARE with rescale, = density in expectation for an
    unrescaled data-independent random mask. TIES masks depend on the data: not covered.

Optimization side (ours, standard smoothness): for sum_i w_i = 1 and x_bar = sum_i w_i x_i,
    F_S(x_bar) <= sum_i w_i F_S(x_i) + (L/2) sum_i w_i ||x_i - x_bar||^2,  ||tau_i|| <= eta_i K_i G.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray | jax.Array | float


def _xp(*args: Any):
  return jnp if any(isinstance(a, jax.Array) for a in args) else np


def _floats(*args: Any):
  """Array namespace and the inputs as float arrays of its default float dtype."""
  xp = _xp(*args)
  dt = jnp.result_type(float) if xp is jnp else np.float64
  return xp, tuple(xp.asarray(a, dtype=dt) for a in args)


def _quiet(fn: Callable) -> Callable:
  # inf is a legitimate answer for an astronomically loose growth factor; no numpy warning spam.
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
      return fn(*args, **kwargs)
  return wrapped


def _geom_down(xp, l, m):
  """sum_{i<m} exp(-l i) for l >= 0: a geometric sum with ratio <= 1, so it never overflows."""
  pos = l > 0
  ls = xp.where(pos, l, 1.0)
  return xp.where(pos, xp.expm1(-m * ls) / xp.expm1(-ls), m)


def _steps_per_epoch(xp, b, n):
  return xp.maximum(xp.floor(n / b), 1.0)


def _weighted_moment2(xp, b, K, n, h, sampler: str, scale=1.0):
  """scale * E[(sum_{k<K} (1+h)^(K-1-k) 1[j in B_k])^2]; exact for 'epoch', a bound otherwise.

  With p = b/n, c_k = (1+h)^(K-1-k) and S_e = sum_{k in epoch e} c_k (epochs independent, each
  holding j at most once, each step holding j with probability p):
      E[...] = p sum_k c_k^2 + p^2 sum_{e != e'} S_e S_e'.
  Everything is computed relative to (1+h)^(K-1), i.e. with ratios beta = 1/(1+h) <= 1, and the
  growth factor is applied in log space, so the result overflows only if its true value does.
  """
  p = b / n
  l = xp.log1p(h)
  A2 = _geom_down(xp, 2 * l, K)  # sum_k beta^(2k)
  if sampler == "replacement":
    # Independent draws per step: Var(count_k) <= p and E[count_k] = p.
    inner = p * A2 + p**2 * _geom_down(xp, l, K)**2
  elif sampler == "epoch":
    s = _steps_per_epoch(xp, b, n)
    E = xp.floor(K / s)  # full epochs
    r = K - E * s  # steps of the final, partial epoch
    g_s, g_r = _geom_down(xp, l, s), _geom_down(xp, l, r)  # epoch sums / their first term
    q = xp.exp(-s * l)  # ratio between successive full-epoch sums
    G_E, G_E1 = _geom_down(xp, s * l, E), _geom_down(xp, s * l, xp.maximum(E - 1, 0.0))
    # sum_{e != e'} S_e S_e' without cancellation: full-full pairs, then full-partial pairs.
    cross = 2 * g_s**2 * q * G_E * G_E1 / (1 + q) + 2 * g_s * g_r * xp.exp(-E * s * l) * G_E
    inner = p * A2 + p**2 * cross
  else:
    raise ValueError(f"sampler must be 'epoch' or 'replacement', got {sampler!r}")
  log_growth = 2 * xp.maximum(K - 1, 0.0) * l
  return xp.where(l > 0, xp.exp(log_growth + xp.log(scale * inner)), scale * inner)


# ----------------------------------------------------------------------------- per-expert stability


@_quiet
def draws_moment2(b: Array, K: Array, n: Array, sampler: str = "epoch") -> Array:
  """E[N_j^2], N_j = number of the K steps whose batch holds sample j.

  epoch: p K + p^2 (K^2 - E s^2 - r^2), with p = b/n, s = n//b, E = K//s, r = K - E s (exact).
  replacement: p K + p^2 K^2 (upper bound for any sampler with independent steps).
  """
  xp, (b, K, n) = _floats(b, K, n)
  return _weighted_moment2(xp, b, K, n, xp.zeros_like(K), sampler)


@_quiet
def draws_moment2_simple(b: Array, K: Array, n: Array) -> Array:
  """(K b / n)(1 + K b / n) >= E[N_j^2] for both samplers."""
  xp, (b, K, n) = _floats(b, K, n)
  u = K * b / n
  return u * (1.0 + u)


@_quiet
def eps2_convex(eta: Array, b: Array, K: Array, n: Array, G: Array,
                sampler: str = "epoch") -> Array:
  """(4 eta^2 G^2 / b^2) E[N_j^2]. Convex, L-smooth, G-Lipschitz, eta <= 2/L."""
  xp, (eta, b, K, n, G) = _floats(eta, b, K, n, G)
  return _weighted_moment2(xp, b, K, n, xp.zeros_like(K), sampler, 4.0 * eta**2 * G**2 / b**2)


@_quiet
def eps2_nonconvex(eta: Array, b: Array, K: Array, n: Array, G: Array, L: Array,
                   sampler: str = "epoch") -> Array:
  """(4 eta^2 G^2 / b^2) E[(sum_{k: j in B_k} (1+eta L)^(K-1-k))^2]. L-smooth, G-Lipschitz."""
  xp, (eta, b, K, n, G, L) = _floats(eta, b, K, n, G, L)
  return _weighted_moment2(xp, b, K, n, eta * L, sampler, 4.0 * eta**2 * G**2 / b**2)


@_quiet
def eps2_convex_simple(eta: Array, b: Array, K: Array, n: Array, G: Array) -> Array:
  """4 eta^2 G^2 K / (n b) * (1 + b K / n). Convex, L-smooth, G-Lipschitz, eta <= 2/L."""
  xp, (eta, b, K, n, G) = _floats(eta, b, K, n, G)
  return 4.0 * eta**2 * G**2 * K / (n * b) * (1.0 + b * K / n)


@_quiet
def eps2_nonconvex_simple(eta: Array, b: Array, K: Array, n: Array, G: Array,
                          L: Array) -> Array:
  """4 eta^2 G^2 K / (n b) * (1 + eta L)^(2(K-1)) * (1 + b K / n). L-smooth, G-Lipschitz."""
  xp, (eta, b, K, n, G, L) = _floats(eta, b, K, n, G, L)
  rest = 4.0 * eta**2 * G**2 * K / (n * b) * (1.0 + b * K / n)
  return xp.exp(2.0 * xp.maximum(K - 1.0, 0.0) * xp.log1p(eta * L) + xp.log(rest))


@_quiet
def eps2_convex_selfbounded(eta: Array, b: Array, K: Array, n: Array, L: Array,
                            loss_sum: Array) -> Array:
  """8 L eta^2 ceil(K/s) / (n b) * loss_sum, loss_sum = sum_{k<K} E[F_{B_k}(x_k)].

  Convex, nonnegative, L-smooth, eta <= 2/L, epoch sampler; no Lipschitz constant needed.
  F_{B_k}(x_k) is the minibatch loss at the iterate the step starts from (what a trainer logs).
  """
  xp, (eta, b, K, n, L, loss_sum) = _floats(eta, b, K, n, L, loss_sum)
  epochs_touched = xp.ceil(K / _steps_per_epoch(xp, b, n))
  return 8.0 * L * eta**2 * epochs_touched / (n * b) * loss_sum


@_quiet
def effective_eta(eta: Array, momentum: Array) -> Array:
  """eta / (1 - momentum): heuristic heavy-ball substitute for eta in the plain-SGD bounds."""
  xp, (eta, momentum) = _floats(eta, momentum)
  return eta / (1.0 - momentum)


# ----------------------------------------------------------------------------- generalization


@_quiet
def gen_gap(eps2: Array, train_loss: Array, L: Array, gamma: Array) -> Array:
  """(L/gamma) E[F_S] + ((L + gamma)/2) eps2 (Lei & Ying 2020, Thm 2(b))."""
  xp, (eps2, train_loss, L, gamma) = _floats(eps2, train_loss, L, gamma)
  return L / gamma * train_loss + 0.5 * (L + gamma) * eps2


@_quiet
def best_gamma(eps2: Array, train_loss: Array, L: Array) -> Array:
  """sqrt(2 L E[F_S] / eps2), the minimiser of `gen_gap` over gamma (inf when eps2 = 0)."""
  xp, (eps2, train_loss, L) = _floats(eps2, train_loss, L)
  return xp.sqrt(2.0 * L * train_loss / eps2)


@_quiet
def gen_gap_best(eps2: Array, train_loss: Array, L: Array) -> Array:
  """min_gamma gen_gap = L eps2 / 2 + sqrt(2 L E[F_S] eps2)."""
  xp, (eps2, train_loss, L) = _floats(eps2, train_loss, L)
  return 0.5 * L * eps2 + xp.sqrt(2.0 * L * train_loss * eps2)


# ----------------------------------------------------------------------------- merges


@_quiet
def merged_eps2(eps2_M: Array, w_M: Array, p_M: Array | None = None, kappa_M: Array = 1.0,
                axis: int = -1) -> Array:
  """sum_i p_i w_i^2 kappa_i eps2_i for the merge x0 + sum_i w_i tau_i (p_i defaults to 1/M).

  kappa_i is the mask factor of expert i (1 without a mask; see `dare_factor`, `mask_factor`).
  """
  xp, (eps2_M, w_M, kappa_M) = _floats(eps2_M, w_M, kappa_M)
  if p_M is None:
    p_M = xp.ones_like(eps2_M) / eps2_M.shape[axis]
  p_M = xp.asarray(p_M, dtype=eps2_M.dtype)
  return xp.sum(p_M * w_M**2 * kappa_M * eps2_M, axis=axis)


@_quiet
def average_eps2(eps2_M: Array, axis: int = -1) -> Array:
  """(1/M^2) mean_i eps2_i: simple average, equal task weights."""
  xp, (eps2_M,) = _floats(eps2_M)
  return xp.mean(eps2_M, axis=axis) / eps2_M.shape[axis]**2


@_quiet
def task_arithmetic_eps2(eps2_M: Array, lam: Array, axis: int = -1) -> Array:
  """lam^2 mean_i eps2_i: x0 + lam sum_i tau_i, equal task weights."""
  xp, (eps2_M, lam) = _floats(eps2_M, lam)
  return lam**2 * xp.mean(eps2_M, axis=axis)


@_quiet
def dare_factor(p_drop: Array) -> Array:
  """1/(1 - p): E_m ||m * delta / (1 - p)||^2 / ||delta||^2, m_c ~ Bernoulli(1 - p) iid, shared."""
  xp, (p_drop,) = _floats(p_drop)
  return 1.0 / (1.0 - p_drop)


@_quiet
def mask_factor(density: Array, kind: str = "fixed") -> Array:
  """Squared-difference factor of an unrescaled 0/1 mask chosen independently of the data.

  'fixed': 1, an upper bound for any fixed mask (||m * delta|| <= ||delta||);
  'random': density, exact in expectation when coordinates are kept iid with that probability;
  'fixed_heuristic': density, a fixed mask on a difference spread evenly over coordinates.
  """
  xp, (density,) = _floats(density)
  if kind == "fixed":
    return xp.ones_like(density)
  if kind in ("random", "fixed_heuristic"):
    return density
  raise ValueError(f"unknown mask kind {kind!r}")


# ----------------------------------------------------------------------------- optimization side


@_quiet
def merged_loss_bound(loss_M: Array, sqdist_M: Array, w_M: Array, L: Array,
                      axis: int = -1) -> Array:
  """sum_i w_i F_S(x_i) + (L/2) sum_i w_i ||x_i - x_bar||^2 >= F_S(x_bar), sum_i w_i = 1."""
  xp, (loss_M, sqdist_M, w_M, L) = _floats(loss_M, sqdist_M, w_M, L)
  return xp.sum(w_M * loss_M, axis=axis) + 0.5 * L * xp.sum(w_M * sqdist_M, axis=axis)


@_quiet
def task_vector_norm_bound(eta: Array, K: Array, G: Array) -> Array:
  """eta K G >= ||tau|| = ||x_K - x_0|| for plain SGD with G-bounded gradients."""
  xp, (eta, K, G) = _floats(eta, K, G)
  return eta * K * G


@_quiet
def sgd_opt_error(eta: Array, K: Array, D2: Array, G: Array) -> Array:
  """D2 / (2 eta K) + eta G^2 / 2: convex SGD rate for the averaged iterate, D2 = ||x0 - x*||^2."""
  xp, (eta, K, D2, G) = _floats(eta, K, D2, G)
  return D2 / (2.0 * eta * K) + 0.5 * eta * G**2


@_quiet
def tradeoff(eta: Array, K: Array, *, b: Array, n: Array, M: Array, L: Array, G: Array,
             D2: Array, zeta2: Array | None = None, f_star: Array = 0.0,
             include_gen: bool = True) -> dict[str, Array]:
  """Excess-risk model of the simple average of M experts sharing (eta, b, K, n). Heuristic.

  train = f_star + D2/(2 eta K) + eta G^2/2 + (L/2) (eta K)^2 Gamma2,   Gamma2 = G^2 (proved
  dispersion bound) or zeta2 (linearised tau_i ~ -eta K grad F_i(x0), heuristic);
  gen = gen_gap_best(eps2_convex(eta, b, K, n, G) / M^2, train, L);  total = train + gen.
  """
  xp, (eta, K, b, n, M, L, G, D2, f_star) = _floats(eta, K, b, n, M, L, G, D2, f_star)
  Gamma2 = G**2 if zeta2 is None else xp.asarray(zeta2, dtype=eta.dtype)
  opt = sgd_opt_error(eta, K, D2, G)
  disp = 0.5 * L * (eta * K)**2 * Gamma2
  train = f_star + opt + disp
  eps2 = eps2_convex(eta, b, K, n, G) / M**2
  gen = gen_gap_best(eps2, train, L) if include_gen else xp.zeros_like(train)
  return dict(total=train + gen, train=train, opt=opt, dispersion=disp, gen=gen, eps2=eps2)


@_quiet
def K_star_opt(eta: Array, L: Array, D2: Array, Gamma2: Array) -> Array:
  """(D2 / (2 L eta^3 Gamma2))^(1/3): argmin_K of D2/(2 eta K) + (L/2)(eta K)^2 Gamma2."""
  xp, (eta, L, D2, Gamma2) = _floats(eta, L, D2, Gamma2)
  return (D2 / (2.0 * L * eta**3 * Gamma2))**(1.0 / 3.0)


def argmin_grid(curve: Array, grid: Array) -> Array:
  """grid[argmin(curve)] along the last axis (nan entries are ignored)."""
  xp = _xp(curve, grid)
  curve = xp.where(xp.isnan(curve), xp.inf, curve)
  return xp.asarray(grid)[xp.argmin(curve, axis=-1)]


def best_K(K_grid: Array, eta: Array, **kw: Any) -> tuple[Array, Array]:
  """(K*, total curve over K_grid) for the `tradeoff` model at a scalar eta."""
  curve = tradeoff(eta, K_grid, **kw)["total"]
  return argmin_grid(curve, K_grid), curve


def best_eta(eta_grid: Array, K: Array, **kw: Any) -> tuple[Array, Array]:
  """(eta*, total curve over eta_grid) for the `tradeoff` model at a scalar K."""
  curve = tradeoff(eta_grid, K, **kw)["total"]
  return argmin_grid(curve, eta_grid), curve


# ----------------------------------------------------------------------------- scaling exponents


@_quiet
def scaling_exponents(eta: Array, b: Array, K: Array, n: Array, *, L: Array = 0.0,
                      G: Array = 1.0, M: Array = 1.0, train_loss: Array = 0.0,
                      convex: bool = True) -> dict[str, dict[str, Array]]:
  """Local exponents d log(.)/d log x of eps2 and of the best-gamma gap, from the simple forms.

  eps2 = 4 eta^2 G^2 K/(n b) alpha^(2(K-1)) (1 + u) / M^2 with u = bK/n, alpha = 1 + eta L
  (alpha = 1 if convex). The gap exponent is w * (eps2 exponent), w = d log gap / d log eps2 =
  (L eps2/2 + sqrt(2 L F eps2)/2) / gap, holding the training loss F fixed.
  """
  xp, (eta, b, K, n, L, G, M, F) = _floats(eta, b, K, n, L, G, M, train_loss)
  u = b * K / n
  q = u / (1.0 + u)
  hL = xp.zeros_like(eta * L) if convex else eta * L / (1.0 + eta * L)
  la = xp.zeros_like(eta * L) if convex else xp.log1p(eta * L)
  e = dict(eta=2.0 + 2.0 * (K - 1.0) * hL, b=-1.0 + q, K=1.0 + q + 2.0 * K * la, n=-1.0 - q,
           M=-2.0 + 0.0 * q)
  eps2 = (eps2_convex_simple(eta, b, K, n, G) if convex else
          eps2_nonconvex_simple(eta, b, K, n, G, L)) / M**2
  gap = gen_gap_best(eps2, F, L)
  w = xp.where(gap > 0, (0.5 * L * eps2 + 0.5 * xp.sqrt(2.0 * L * F * eps2)) / gap, 1.0)
  return dict(eps2=e, gap={k: w * v for k, v in e.items()})


def local_exponent(fn: Callable[[jax.Array], jax.Array], x: Array) -> jax.Array:
  """d log fn(x) / d log x by autodiff, elementwise over x (fn scalar -> scalar, jax-traceable)."""
  g = jax.grad(lambda lx: jnp.log(fn(jnp.exp(lx))))
  x = jnp.asarray(x, dtype=jnp.result_type(float))
  return jax.vmap(g)(jnp.log(x).ravel()).reshape(x.shape)
