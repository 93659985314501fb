"""Figures on small synthetic results frames: what is drawn equals what the frame says."""
import json

import matplotlib.pyplot as plt
from matplotlib.container import BarContainer
import numpy as np
import pandas as pd
import pytest

from stability import plots


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plt.close("all")


def _series(ax, label: str):
  """(x, y) of the line, errorbar or scatter labelled `label` on ax."""
  for c in ax.containers:
    if c.get_label() == label:
      line = c.lines[0]
      return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
  for line in ax.get_lines():
    if line.get_label() == label:
      return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
  for coll in ax.collections:
    if coll.get_label() == label:
      off = np.asarray(coll.get_offsets(), float).reshape(-1, 2)
      return off[:, 0], off[:, 1]
  raise KeyError(label)


def _yerr(ax, label: str) -> np.ndarray:
  """Half-widths (hi - lo) / 2 of the vertical error bars of the errorbar labelled `label`."""
  c = next(c for c in ax.containers if c.get_label() == label)
  seg = np.asarray(c.lines[2][-1].get_segments())
  return (seg[:, 1, 1] - seg[:, 0, 1]) / 2


def main_frame(seed: int = 0) -> pd.DataFrame:
  """A main-study-like frame: experts of 2 eta x 2 b x 2 ratios x 3 tasks at 2 K, and merged
  groups (3 per config) of 2 member tasks, with merged_task rows; random gaps."""
  rng = np.random.default_rng(seed)
  rows, e = [], {}
  grid = [(eta, b, r) for eta in (0.01, 0.1) for b in (4, 8) for r in (0.5, 1.0)]
  for K in (10, 20):
    for c, (eta, b, r) in enumerate(grid):
      hp = dict(eta=eta, b=b, data_ratio=r, seed=0, K=K)
      for t in range(3):
        e[c, t] = 3 * c + t
        rows.append(dict(hp, kind="expert", expert=3 * c + t, task=f"t{t}",
                         gap=rng.normal(0.1 * eta * K, 0.05)))
      for g, tasks in enumerate([(0, 1), (1, 2), (0, 2)]):
        gaps = rng.normal(0.2, 0.1, size=2)
        base = dict(hp, config=c, group=g, M=2)
        rows += [dict(base, kind="merged_task", expert=e[c, t], gap=v)
                 for t, v in zip(tasks, gaps)]
        rows.append(dict(base, kind="merged", gap=gaps.mean(), test_loss=rng.normal(1, 0.1)))
  return pd.DataFrame(rows)


def test_gap_vs_hparams_plots_replicate_means_and_standard_errors():
  df = main_frame()
  # Twins (stability study) must not enter the experts' means.
  twins = df[df.kind == "expert"].assign(role="twin", gap=100.0)
  df = pd.concat([df.assign(role=np.where(df.kind == "expert", "original", None)), twins])
  fig = plots.gap_vs_hparams(df)
  axes = np.asarray(fig.axes).reshape(2, 3)
  ex, mg = df[(df.kind == "expert") & (df.role == "original")], df[df.kind == "merged"]
  for row, rows, unit in ((0, ex, "task"), (1, mg, "group")):
    for col, var in enumerate(("eta", "b", "data_ratio")):
      for K in (10, 20):
        x, y = _series(axes[row, col], f"K={K}")
        at = rows[rows.K == K]
        # balanced design: the mean of replicate means is the plain mean
        np.testing.assert_allclose(y, at.groupby(var).gap.mean().to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(x, sorted(at[var].unique()))
        per = at.groupby([var, unit]).gap.mean().groupby(var)
        np.testing.assert_allclose(_yerr(axes[row, col], f"K={K}"),
                                   (per.std() / np.sqrt(per.count())).to_numpy(), rtol=1e-9)


def test_gap_vs_hparams_without_merged_rows_draws_experts_only():
  df = main_frame()
  fig = plots.gap_vs_hparams(df[df.kind == "expert"])
  assert len(fig.axes) == 3 and fig.axes[0].get_title() == "experts: gap by eta"
  with pytest.raises(ValueError, match="df: needs rows of kind 'expert' or 'merged'"):
    plots.gap_vs_hparams(df[df.kind == "merged_task"])


def test_merged_vs_K_lines_are_means_over_groups():
  df = main_frame()
  fig = plots.merged_vs_K(df)
  mg = df[df.kind == "merged"]
  per = mg.groupby(["eta", "K", "group"]).test_loss.mean().groupby(["eta", "K"]).mean()
  x, y = _series(fig.axes[0], "eta=0.1")
  np.testing.assert_allclose(x, [10, 20])
  np.testing.assert_allclose(y, per.loc[0.1].to_numpy())


def test_heterogeneous_vs_homogeneous_splits_groups_by_member_hyperparameters():
  df = main_frame()
  # One extra group merging experts of two configs (eta 0.01 and 0.1): heterogeneous.
  ex = df[(df.kind == "expert") & (df.K == 20)].set_index("expert")
  a, b = 0, 3 * 7 + 1  # config 0 (eta 0.01), config 7 (eta 0.1)
  het = [dict(kind="merged_task", K=20, config=99, group=0, M=2, expert=e, gap=v, eta=0.01,
              b=4, data_ratio=0.5) for e, v in ((a, 0.5), (b, 0.7))]
  fig = plots.heterogeneous_vs_homogeneous(pd.concat([df, pd.DataFrame(het)]))
  ax = fig.axes[0]
  assert ax.get_title() == "gap: 1 heterogeneous of 49 groups"
  x, y = _series(ax, "heterogeneous")
  np.testing.assert_allclose(x, [ex.gap[[a, b]].mean()])
  np.testing.assert_allclose(y, [0.6])
  # A homogeneous point: the merged gap (mean over members) against the members' own gaps.
  mt = df[(df.kind == "merged_task") & (df.eta == 0.1)]
  own = df[df.kind == "expert"].set_index(["K", "expert"]).gap
  mt = mt.assign(own=own.loc[list(zip(mt.K, mt.expert))].to_numpy())
  by = mt.groupby(["K", "M", "config", "group"])[["gap", "own"]].mean()
  x, y = _series(ax, "homogeneous, eta=0.1")
  np.testing.assert_allclose(np.sort(x), np.sort(by.own.to_numpy()))
  np.testing.assert_allclose(np.sort(y), np.sort(by.gap.to_numpy()))
  x, y = _series(ax, "merged = members")
  np.testing.assert_array_equal(x, y)
  title = plots.heterogeneous_vs_homogeneous(df).axes[0].get_title()
  assert title == "gap: 0 heterogeneous of 48 groups (none stored)"


def merged_twin_frame(seed: int = 0) -> pd.DataFrame:
  """merged_twin rows: M in {2, 4}, 3 groups, 2 members x 2 twins each, average and ties."""
  rng = np.random.default_rng(seed)
  rows = []
  for M in (2, 4):
    for g in range(3):
      for i in range(2):
        for t in range(2):
          member = float(rng.uniform(0.5, 2.0))
          base = dict(kind="merged_twin", K=20, M=M, config=0, group=g, expert=i, twin=t,
                      role="twin", eta=0.01, b=4, data_ratio=1.0, member_sq_backbone=member)
          rows.append(dict(base, algorithm="average", sq_backbone=member / M ** 2))
          rows.append(dict(base, algorithm="ties", sq_backbone=member * rng.uniform(1, 5)))
  return pd.DataFrame(rows)


def test_merged_stability_vs_M_draws_the_one_over_M_squared_references():
  df = merged_twin_frame()
  fig = plots.merged_stability_vs_M(df)
  x, y = _series(fig.axes[1], "1/M^2")
  np.testing.assert_allclose(y, 1 / x ** 2)
  np.testing.assert_allclose(x, [2, 4])
  member = df.groupby("M").member_sq_backbone.mean()
  _, y = _series(fig.axes[0], "member mean / M^2")
  np.testing.assert_allclose(y, member.to_numpy() / np.array([4, 16]))
  # The simple average lies on its reference, exactly.
  _, r = _series(fig.axes[1], "average")
  np.testing.assert_allclose(r, [1 / 4, 1 / 16])


def test_heterogeneous_vs_homogeneous_on_merged_twins_uses_the_average():
  fig = plots.heterogeneous_vs_homogeneous(merged_twin_frame())
  ax = fig.axes[0]
  assert ax.get_title() == "simple average eps^2: 0 heterogeneous of 6 groups (none stored)"
  x, y = _series(ax, "homogeneous, eta=0.01")
  # average: merged = member / M^2 for every group, so every point lies on one of the lines
  ok = np.isclose(y, x / 4) | np.isclose(y, x / 16)
  assert ok.all() and len(x) == 6
  x4, y4 = _series(ax, "member / M^2 (M=4)")
  np.testing.assert_allclose(y4, x4 / 16)
  with pytest.raises(ValueError, match="df: needs rows of kind 'merged_task'"):
    plots.heterogeneous_vs_homogeneous(merged_twin_frame().assign(algorithm="ties"))


def compare_frame(seed: int = 0) -> pd.DataFrame:
  """merge_compare rows (average at 1/M^2, ties, the ensemble without stability) and
  diagnostics, 4 groups of M = 3 at K = 10, 20."""
  rng = np.random.default_rng(seed)
  rows = []
  for K in (10, 20):
    for g in range(4):
      member = float(rng.uniform(1, 2))
      for name, ratio in (("average", 1 / 9), ("ties", float(rng.uniform(2, 8))),
                          ("ensemble", np.nan)):
        rows.append(dict(kind="merge_compare", algorithm=name, K=K, M=3, group=g, config=0,
                         gap=float(rng.normal(0.05, 0.01)), test_acc=float(rng.uniform(0.5, 1)),
                         member_eps2=member if name != "ensemble" else np.nan,
                         merged_eps2=member * ratio))
      rows.append(dict(kind="diagnostics", K=K, M=3, group=g, config=0,
                       cosine=float(rng.uniform(0, 0.2)), sign_conflict=float(rng.uniform(0.5, 1)),
                       ties_sign_conflict=float(rng.uniform(0, 0.3)), ties_sparsity=0.8,
                       ties_merged_sparsity=float(rng.uniform(0.3, 0.5)), dare_sparsity=0.5))
  return pd.DataFrame(rows)


def test_algorithms_vs_bound_terms_points_are_group_means_at_the_last_K():
  df = compare_frame()
  fig = plots.algorithms_vs_bound_terms(df)
  last = df[(df.kind == "merge_compare") & (df.K == 20)]
  for name in ("average", "ties"):
    s = last[last.algorithm == name]
    for ax, col in ((fig.axes[0], "gap"), (fig.axes[1], "test_acc")):
      x, y = _series(ax, name)
      np.testing.assert_allclose(x, [(s.merged_eps2 / s.member_eps2).mean()])
      np.testing.assert_allclose(y, [s[col].mean()])
      np.testing.assert_allclose(_yerr(ax, name), [s[col].std() / 2])  # 4 groups
  with pytest.raises(KeyError):
    _series(fig.axes[0], "ensemble")  # no parameters, no stability ratio
  x, _ = _series(fig.axes[0], "1/M^2 (average, M=3)")
  np.testing.assert_allclose(x, 1 / 9)
  x, _ = _series(fig.axes[0], "average")
  np.testing.assert_allclose(x, 1 / 9)
  dg = df[df.kind == "diagnostics"]
  bars = [c for c in fig.axes[2].containers if isinstance(c, BarContainer)]
  assert [c.get_label() for c in bars] == ["K=10", "K=20"]
  heights = [p.get_height() for p in bars[0].patches]
  np.testing.assert_allclose(heights, dg[dg.K == 10][list(plots._DIAGNOSTICS)].mean().to_numpy())
  with pytest.raises(ValueError, match="df: needs rows of kind 'merge_compare'"):
    plots.algorithms_vs_bound_terms(main_frame())


def test_bound_vs_measured_draws_y_equals_x_and_every_finite_bound():
  # Bounds near the float64 maximum (the non-convex bounds reach 1e304) must stay in view.
  t = pd.DataFrame(dict(measured=[1e-3, 1e-2, 1e-1, 0.5], bound=[1.0, 10.0, 3e304, np.inf],
                        eta=[0.1, 0.1, 0.2, 0.2]))
  fig = plots.bound_vs_measured({"eps2": t}, None)
  ax = fig.axes[0]
  x, y = _series(ax, "y = x")
  np.testing.assert_array_equal(x, y)
  assert ax.get_title() == "eps2: 3 of 4 bounds finite"
  pts = np.concatenate([_series(ax, f"eta={e:g}")[1] for e in (0.1, 0.2)])  # log10 values
  np.testing.assert_allclose(np.sort(pts), np.log10([1.0, 10.0, 3e304]))
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  assert x0 < -3 and x1 > -1 and y0 < 0 and y1 > 304
  fig.canvas.draw()  # ticks and limits render


SUMMARY = {"eps2": {"axes": {
    "eta": dict(fit_measured=1.77, fit_measured_ci=[1.68, 1.85], fit_bound=58.6,
                predicted_local=36.8),
    "b": dict(fit_measured=-0.58, fit_measured_ci=[-0.78, -0.38], fit_bound=4.0,
              predicted_local=-0.17),
    "K": dict(fit_measured=1.33, fit_measured_ci=[1.18, 1.47], fit_bound=81.5,
              predicted_local=float("nan"))}}}


def test_exponents_vs_predicted_plots_fits_against_predictions():
  # The same summary straight from theory.compare (tuples) and from summary.json (lists).
  for summaries in (SUMMARY, json.loads(json.dumps(SUMMARY))):
    fig = plots.exponents_vs_predicted(summaries)
    ax = fig.axes[0]
    x, y = _series(ax, "fitted to measured (95% CI)")
    np.testing.assert_allclose(x, [36.8, -0.17])  # K has no finite prediction: left out
    np.testing.assert_allclose(y, [1.77, -0.58])
    np.testing.assert_allclose(_yerr(ax, "fitted to measured (95% CI)"), [0.085, 0.2], atol=1e-9)
    _, yb = _series(ax, "fitted to the bound")
    np.testing.assert_allclose(yb, [58.6, 4.0])
    x, y = _series(ax, "y = x")
    np.testing.assert_array_equal(x, y)
    assert [t.get_text() for t in ax.texts] == ["eta", "b"]
  for bad in ({}, {"eps2": {"axes": {}}}):
    with pytest.raises(ValueError, match="summaries: "):
      plots.exponents_vs_predicted(bad)


def test_figures_save_to_png(tmp_path):
  path = tmp_path / "f.png"
  plots.algorithms_vs_bound_terms(compare_frame(), str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not plt.get_fignums()  # saved figures are closed


def test_hetero_spread_draws_means_over_groups_and_counts_finite_predictions():
  """The spread lines are the per-s means of the spread groups of that axis (rejects pooling
  the axes or the modes); the scatter drops non-finite predictions and says how many."""
  rows = []
  for axis in ("lr", "K"):
    for s, base in ((1.0, 1.0), (3.0, 2.0)):
      for g in range(3):
        rows.append(dict(kind="hetero_group", algorithm="average", mode="spread", axis=axis, s=s,
                         group=g, test_loss=base + g + (axis == "K"), gap=0.1 * base,
                         merged_eps2=1e-3 * (g + 1), pred_eps2_nonconvex=1e-2 * (g + 1)))
  for mode, loss in (("homogeneous", 5.0), ("mixed", 7.0)):
    rows.append(dict(kind="hetero_group", algorithm="average", mode=mode, axis=None, s=1.0,
                     group=0, test_loss=loss, gap=0.5, merged_eps2=1e-3,
                     pred_eps2_nonconvex=np.inf))
  fig = plots.hetero_spread(pd.DataFrame(rows))
  ax = fig.axes[0]
  x, y = _series(ax, "spread along lr")
  np.testing.assert_allclose(x, [1, 3])
  np.testing.assert_allclose(y, [2.0, 3.0])
  _, y = _series(ax, "spread along K")
  np.testing.assert_allclose(y, [3.0, 4.0])
  _, y = _series(ax, "mixed")
  np.testing.assert_allclose(y, [7.0, 7.0])
  assert fig.axes[2].get_title() == "12 of 14 groups with a finite prediction"
