"""theory.fit: the log-log fit recovers a known exponent and its CI covers it; Spearman == scipy."""
import numpy as np
import pytest
import scipy.stats

from theory import fit


def _synthetic(rng, n=60, slope=-1.5, c=0.7, noise=0.2):
  x = np.geomspace(1e-3, 1.0, n)
  y = np.exp(c + slope * np.log(x) + noise * rng.normal(size=n))
  return x, y


def test_recovers_exponent_and_ci_covers_it():
  f = fit.loglog_fit(*_synthetic(np.random.default_rng(0)), bootstrap=500, seed=3)
  assert f.slope[0] == pytest.approx(-1.5, abs=3 * f.se_slope[0])
  assert f.ci_slope[0, 0] <= -1.5 <= f.ci_slope[0, 1]
  assert f.ci_intercept[0] <= 0.7 <= f.ci_intercept[1]
  assert f.boot_ci_slope[0, 0] <= -1.5 <= f.boot_ci_slope[0, 1]
  assert f.n == 60 and f.dropped == 0 and 0.9 < f.r2 <= 1.0


def test_t_interval_has_nominal_coverage():
  rng = np.random.default_rng(1)
  covered = [(lambda f: f.ci_slope[0, 0] <= -1.5 <= f.ci_slope[0, 1])(
      fit.loglog_fit(*_synthetic(rng, n=12))) for _ in range(400)]
  assert 0.92 <= np.mean(covered) <= 0.98  # binomial sd at 0.95, 400 trials: 0.011


def test_matches_scipy_linregress_and_drops_invalid_rows():
  x, y = _synthetic(np.random.default_rng(2))
  y[3], x[5] = -1.0, np.nan
  f = fit.loglog_fit(x, y)
  ok = np.isfinite(x) & (y > 0)
  ref = scipy.stats.linregress(np.log(x[ok]), np.log(y[ok]))
  assert f.slope[0] == pytest.approx(ref.slope, rel=1e-10)
  assert f.intercept == pytest.approx(ref.intercept, rel=1e-10)
  assert f.se_slope[0] == pytest.approx(ref.stderr, rel=1e-8)
  assert f.dropped == 2


def test_multivariate_fit_recovers_each_exponent():
  rng = np.random.default_rng(3)
  X = np.exp(rng.uniform(-3, 3, size=(200, 3)))
  y = 2.0 * X[:, 0]**2.0 * X[:, 1]**-1.0 * X[:, 2]**0.5 * np.exp(0.05 * rng.normal(size=200))
  f = fit.loglog_fit(X, y)
  for i, a in enumerate((2.0, -1.0, 0.5)):
    assert abs(f.slope[i] - a) <= 4 * f.se_slope[i]  # each 95% CI misses 1 in 20; 4 se won't
    assert f.se_slope[i] < 0.01


def test_bootstrap_is_keyed_by_seed():
  x, y = _synthetic(np.random.default_rng(4))
  a = fit.loglog_fit(x, y, bootstrap=200, seed=7)
  b = fit.loglog_fit(x, y, bootstrap=200, seed=7)
  c = fit.loglog_fit(x, y, bootstrap=200, seed=8)
  np.testing.assert_array_equal(a.boot_ci_slope, b.boot_ci_slope)
  assert not np.array_equal(a.boot_ci_slope, c.boot_ci_slope)
  with pytest.raises(ValueError):
    fit.loglog_fit(x, y, bootstrap=10)


def test_spearman_matches_scipy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=50)
  y = x**3 + rng.normal(size=50)
  ref = scipy.stats.spearmanr(x, y)
  rho, p = fit.spearman(x, y)
  assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
  assert np.isnan(fit.spearman(np.ones(5), np.arange(5.0))[0])
