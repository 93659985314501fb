"""Fits of measured results on log-log axes, and rank correlation.

  log y = c + sum_k a_k log x_k + noise,  fitted by ordinary least squares (numpy float64).
  Standard errors from s^2 (X^T X)^-1 with s^2 = RSS / (N - P - 1); CIs from the t distribution
  with N - P - 1 degrees of freedom. Optional bootstrap (resample rows with replacement, percentile
  CI) keyed by an explicit seed. Rows with a non-positive or non-finite value are dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class LogLogFit:
  """OLS fit of log y on log x; arrays over the P regressors (slope) or scalars (intercept)."""
  slope: np.ndarray
  intercept: float
  se_slope: np.ndarray
  se_intercept: float
  ci_slope: np.ndarray  # [P, 2]
  ci_intercept: np.ndarray  # [2]
  r2: float
  n: int  # rows used
  dropped: int  # rows dropped as non-positive / non-finite
  boot_ci_slope: np.ndarray | None = None  # [P, 2]
  boot_ci_intercept: np.ndarray | None = None  # [2]


def _ols(X: np.ndarray, y: np.ndarray) -> np.ndarray:
  return np.linalg.lstsq(X, y, rcond=None)[0]


def loglog_fit(x: Any, y: Any, *, level: float = 0.95, bootstrap: int = 0,
               seed: int | None = None) -> LogLogFit:
  """Fit log y = c + a . log x; x [N] or [N, P], y [N]; `bootstrap` resamples need `seed`."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  x2 = x[:, None] if x.ndim == 1 else x
  with np.errstate(divide="ignore", invalid="ignore"):
    ok = np.all(np.isfinite(x2) & (x2 > 0), axis=1) & np.isfinite(y) & (y > 0)
  lx, ly = np.log(x2[ok]), np.log(y[ok])
  N, P = lx.shape
  if N < P + 2:
    raise ValueError(f"need at least {P + 2} valid rows for a fit with {P} regressors, got {N}")
  X = np.concatenate([np.ones((N, 1)), lx], axis=1)
  beta = _ols(X, ly)
  resid = ly - X @ beta
  dof = N - P - 1
  s2 = resid @ resid / dof
  cov = s2 * np.linalg.pinv(X.T @ X)
  se = np.sqrt(np.diag(cov))
  t = scipy.stats.t.ppf(0.5 + level / 2, dof)
  ci = np.stack([beta - t * se, beta + t * se], axis=-1)
  ss_tot = np.sum((ly - ly.mean())**2)
  r2 = 1.0 - resid @ resid / ss_tot if ss_tot > 0 else 1.0

  boot = None
  if bootstrap:
    if seed is None:
      raise ValueError("bootstrap needs an explicit seed")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, N, size=(bootstrap, N))
    betas = np.stack([_ols(X[i], ly[i]) for i in idx])
    alpha = 100 * (1 - level) / 2
    boot = np.percentile(betas, [alpha, 100 - alpha], axis=0).T  # [P + 1, 2]

  return LogLogFit(
      slope=beta[1:], intercept=float(beta[0]), se_slope=se[1:], se_intercept=float(se[0]),
      ci_slope=ci[1:], ci_intercept=ci[0], r2=float(r2), n=int(N), dropped=int((~ok).sum()),
      boot_ci_slope=None if boot is None else boot[1:],
      boot_ci_intercept=None if boot is None else boot[0])


def spearman(x: Any, y: Any) -> tuple[float, float]:
  """(rho, p-value) of Spearman's rank correlation, ignoring rows with a nan."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  ok = ~(np.isnan(x) | np.isnan(y))
  if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
    return float("nan"), float("nan")
  res = scipy.stats.spearmanr(x[ok], y[ok])
  return float(res.statistic), float(res.pvalue)
