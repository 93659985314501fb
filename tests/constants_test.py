"""theory.constants: estimators equal explicit numpy computations; vmapped == per-expert loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import constants

N, D = 40, 6


def sq_loss(params, x, y):
  """0.5 (w.x + c - y)^2: Hessian of the mean is [x 1]^T [x 1] / N."""
  return 0.5 * (jnp.dot(params["w"], x) + params["c"] - y)**2


def _data(seed, n=N):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)) * np.linspace(0.3, 2.0, D)  # a clear top eigenvalue
  y = rng.normal(size=n)
  params = dict(w=rng.normal(size=D).astype(np.float32), c=np.float32(rng.normal()))
  return x.astype(np.float32), y.astype(np.float32), params


# Jitted once per shape; loss_fn is bound by partial so it never becomes a traced argument.
top_eig = jax.jit(functools.partial(constants.top_hessian_eigenvalue, sq_loss),
                  static_argnames="num_iters")
grad_stats = jax.jit(functools.partial(constants.gradient_stats, sq_loss),
                     static_argnames=("quantiles", "chunk"))


def _hessian(x):
  a = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
  return a.T @ a / len(x)


def test_power_iteration_matches_eigvalsh():
  x, y, params = _data(0)
  out = top_eig(params, x, y, jax.random.key(0), num_iters=200)
  lam = np.linalg.eigvalsh(_hessian(x))
  assert float(out["lam"]) == pytest.approx(lam[-1], abs=1e-4, rel=1e-5)
  assert float(out["L"]) == pytest.approx(np.abs(lam).max(), abs=1e-4, rel=1e-5)
  assert float(out["residual"]) < 1e-2


def test_power_iteration_reports_negative_sign():
  A = np.diag([-5.0, 2.0, 1.0, -0.5]).astype(np.float32)
  q = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0].astype(np.float32)
  A = q @ A @ q.T
  loss = lambda p, x, y: 0.5 * p @ (A @ p) + 0.0 * x + 0.0 * y
  out = jax.jit(functools.partial(constants.top_hessian_eigenvalue, loss, num_iters=200))(
      jnp.ones(4), jnp.zeros(3), jnp.zeros(3), jax.random.key(1))
  assert float(out["lam"]) == pytest.approx(-5.0, abs=1e-4)
  assert float(out["L"]) == pytest.approx(5.0, abs=1e-4)


def test_masked_padding_equals_unpadded():
  x, y, params = _data(1)
  pad = 9
  xp = np.concatenate([x, np.zeros((pad, D), np.float32)])
  yp = np.concatenate([y, np.zeros(pad, np.float32)])
  m = np.concatenate([np.ones(N), np.zeros(pad)]).astype(np.float32)
  key = jax.random.key(3)
  a = top_eig(params, x, y, key)
  b = top_eig(params, xp, yp, key, mask=m)
  assert float(a["lam"]) == pytest.approx(float(b["lam"]), rel=1e-5)
  sa = grad_stats(params, x, y)
  sb = grad_stats(params, xp, yp, mask=m)
  for k in ("G_max", "sigma2", "grad_norm"):
    assert float(sa[k]) == pytest.approx(float(sb[k]), rel=1e-5), k
  np.testing.assert_allclose(sa["G_q"], sb["G_q"], rtol=1e-5)


def test_vmapped_over_experts_equals_loop():
  E = 3
  data = [_data(10 + e) for e in range(E)]
  xs = jnp.stack([d[0] for d in data])
  ys = jnp.stack([d[1] for d in data])
  ps = jax.tree.map(lambda *a: jnp.stack(a), *[d[2] for d in data])
  keys = jax.random.split(jax.random.key(0), E)

  def est(p, x, y, k):
    h = constants.top_hessian_eigenvalue(sq_loss, p, x, y, k, num_iters=50)
    g = constants.gradient_stats(sq_loss, p, x, y, chunk=16)
    return h["lam"], g["G_max"], g["sigma2"], g["G_q"]

  got = jax.jit(jax.vmap(est))(ps, xs, ys, keys)
  est_one = jax.jit(est)
  for e in range(E):
    want = est_one(data[e][2], xs[e], ys[e], keys[e])
    for g, w in zip(got, want):
      np.testing.assert_allclose(g[e], w, rtol=1e-5, atol=1e-6)


def test_gradient_stats_equal_numpy():
  x, y, params = _data(2)
  q = (0.5, 0.9, 0.99)
  out = grad_stats(params, x, y, quantiles=q, chunk=7)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  r = x64 @ params["w"].astype(np.float64) + float(params["c"]) - y64
  g = np.concatenate([r[:, None] * x64, r[:, None]], 1)  # per-sample gradients [N, D + 1]
  norms = np.linalg.norm(g, axis=1)
  gbar = g.mean(0)
  np.testing.assert_allclose(out["norms"], norms, rtol=1e-5)
  assert float(out["G_max"]) == pytest.approx(norms.max(), rel=1e-5)
  np.testing.assert_allclose(out["G_q"], np.quantile(norms, q), rtol=1e-5)
  assert float(out["sigma2"]) == pytest.approx(np.mean(np.sum((g - gbar)**2, 1)), rel=1e-5)
  assert float(out["grad_norm"]) == pytest.approx(np.linalg.norm(gbar), rel=1e-5)


def test_task_dispersion_equals_numpy():
  M = 4
  rng = np.random.default_rng(5)
  xs = (rng.normal(size=(M, N, D)) + rng.normal(size=(M, 1, D))).astype(np.float32)
  ys = rng.normal(size=(M, N)).astype(np.float32)
  _, _, params = _data(3)
  w = rng.dirichlet(np.ones(M))
  disp = jax.jit(functools.partial(constants.task_dispersion, sq_loss))
  got = disp(params, xs, ys, w=w)
  gs = []
  for m in range(M):
    x64 = xs[m].astype(np.float64)
    r = x64 @ params["w"] + float(params["c"]) - ys[m]
    gs.append(np.concatenate([r[:, None] * x64, r[:, None]], 1).mean(0))
  gs = np.stack(gs)
  gbar = w @ gs
  assert float(got) == pytest.approx(float(w @ np.sum((gs - gbar)**2, 1)), rel=1e-5)
  # Equal weights by default; identical tasks have no dispersion.
  same = disp(params, np.repeat(xs[:1], M, 0), np.repeat(ys[:1], M, 0))
  assert float(same) == pytest.approx(0.0, abs=1e-8)
