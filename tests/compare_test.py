"""theory.compare: rows join the right bound, holds/ratio are consistent, CLI prints the summary."""
import itertools

import numpy as np
import pandas as pd
import pytest

from theory import bounds, compare

L, G = 0.25, 1.0


def _grid_df(seed=0, shrink=(0.05, 0.9)):
  rng = np.random.default_rng(seed)
  rows = [dict(eta=e, b=b, K=K, n=n) for e, b, K, n in
          itertools.product((0.01, 0.1, 1.0), (8, 32), (100, 1000), (500, 5000))]
  df = pd.DataFrame(rows)
  df["eps2"] = bounds.eps2_convex(df.eta.to_numpy(), df.b.to_numpy(), df.K.to_numpy(),
                                  df.n.to_numpy(), G) * rng.uniform(*shrink, len(df))
  return df


def test_rows_join_the_bound_and_hold():
  df = _grid_df()
  res = compare.compare(df, L=L, G=G)
  t = res.table
  want = bounds.eps2_convex(df.eta.to_numpy(), df.b.to_numpy(), df.K.to_numpy(), df.n.to_numpy(), G)
  np.testing.assert_allclose(t["bound"], want, rtol=1e-12)
  np.testing.assert_allclose(t["ratio"], t["bound"] / t["measured"])
  assert t["holds"].all() and res.summary["holds"] == 1.0
  assert res.summary["ratio_q"]["min"] > 1.0
  assert res.summary["assumption_ok"] == 1.0  # eta L <= 2 everywhere
  assert set(res.summary["axes"]) == {"eta", "b", "K", "n"}


def test_violations_are_reported():
  df = _grid_df(shrink=(0.5, 2.0))
  t = compare.compare(df, L=L, G=G).table
  np.testing.assert_array_equal(t["holds"], t["bound"] >= t["measured"])
  assert 0 < t["holds"].mean() < 1


def test_column_names_are_parameters():
  df = _grid_df()
  renamed = df.rename(columns=dict(eta="lr", eps2="eps2_mean"))
  a = compare.compare(df, L=L, G=G).table
  b = compare.compare(renamed, L=L, G=G, cols=dict(eta="lr", eps2="eps2_mean")).table
  np.testing.assert_allclose(a["ratio"], b["ratio"])
  # Per-row constants from columns.
  c = compare.compare(df.assign(L=L, G=G)).table
  np.testing.assert_allclose(a["ratio"], c["ratio"])


def test_fitted_exponent_matches_prediction_on_a_power_law():
  df = pd.DataFrame(dict(eta=np.geomspace(1e-3, 1e-1, 9), b=32, K=500, n=5000))
  df["eps2"] = 0.3 * bounds.eps2_convex(df.eta.to_numpy(), 32, 500, 5000, G)  # exactly ~ eta^2
  ax = compare.compare(df, L=L, G=G).summary["axes"]
  assert list(ax) == ["eta"]
  assert ax["eta"]["fit_measured"] == pytest.approx(2.0, abs=1e-9)
  assert ax["eta"]["predicted_local"] == pytest.approx(2.0)
  assert ax["eta"]["spearman_measured"] == pytest.approx(1.0)


def test_gap_rows_use_lei_ying_with_merged_stability():
  df = _grid_df().assign(M=np.tile([1, 6], 12), train_loss=0.1)
  df["gap"] = 0.01
  t = compare.compare(df, L=L, G=G, target="gap").table
  e = bounds.eps2_convex(df.eta.to_numpy(), df.b.to_numpy(), df.K.to_numpy(), df.n.to_numpy(), G)
  np.testing.assert_allclose(t["eps2_bound"], e / df.M.to_numpy()**2, rtol=1e-12)
  np.testing.assert_allclose(t["bound"], bounds.gen_gap_best(t["eps2_bound"].to_numpy(), 0.1, L))
  m = compare.compare(df, L=L, G=G, target="gap", eps2_from="measured").table
  np.testing.assert_allclose(m["bound"], bounds.gen_gap_best(df.eps2.to_numpy(), 0.1, L))


def test_cli_prints_summary(tmp_path, capsys):
  path = tmp_path / "results.csv"
  _grid_df().rename(columns=dict(eta="lr")).to_csv(path, index=False)
  compare.main([str(path), "--L", str(L), "--G", str(G), "--col", "eta=lr"])
  out = capsys.readouterr().out
  assert "holds=1.000" in out and "median=" in out
  assert len(out.splitlines()) <= 10


def test_axis_agreement_ranks_within_slices_with_the_other_axes_fixed():
  from theory.compare import axis_agreement
  rows = []
  for b in (1, 2):
    for eta in (0.1, 0.2, 0.4):
      # bound rises with eta in both slices; measured rises for b=1 and falls for b=2
      rows.append(dict(eta=eta, b=b, bound=eta, measured=eta if b == 1 else -eta))
  out = axis_agreement(pd.DataFrame(rows), "eta", ["b"])
  assert out == dict(spearman_within=0.0, sign_agreement=0.5, slices=2)
  # fewer than 3 values along the axis: no slice counts
  assert axis_agreement(pd.DataFrame(rows), "b", ["eta"])["slices"] == 0
