"""Figures, one function per figure type, each taking the results DataFrame.

Bands are +-1 standard error over the group (and seed) replicates.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _mean_se(df: pd.DataFrame, by: list[str], col: str) -> pd.DataFrame:
  g = df.groupby(by)[col]
  out = g.agg(["mean", "std", "count"]).reset_index()
  out["se"] = out["std"].fillna(0) / np.sqrt(out["count"])
  return out


def merged_vs_K(df: pd.DataFrame, path: str | None = None):
  """Merged model's test loss and gap against K, one line per eta (collapse of over-training).

  Uses `kind == 'merged'` rows (one per group x config x K); each line averages the groups and
  the other hyperparameters (b, data ratio) at that eta; bands are +-1 s.e. over groups.
  """
  merged = df[df["kind"] == "merged"]
  # Average over b and data ratio within each group first, so replicates are the groups.
  per_group = merged.groupby(["eta", "K", "group"])[["test_loss", "gap"]].mean().reset_index()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, col, title in zip(axes, ["test_loss", "gap"],
                            ["merged test loss", "merged generalization gap"]):
    for eta, sub in _mean_se(per_group, ["eta", "K"], col).groupby("eta"):
      ax.plot(sub["K"], sub["mean"], marker="o", label=f"eta={eta:g}")
      ax.fill_between(sub["K"], sub["mean"] - sub["se"], sub["mean"] + sub["se"], alpha=0.2)
    ax.set_xlabel("K (steps per expert)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend()
  return _finish(fig, path)


def _finish(fig, path):
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig


def _log_axes(ax, xlabel: str, title: str, *, ylabel: str | None = None, legend: int = 8):
  """Log-log axes with labels, a grid and a legend (the stability figures' common styling)."""
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=legend)


def _errorbar(ax, est: pd.DataFrame, x: str, label: str):
  """Mean with its 95% t-interval (columns of `twins.estimate_table`)."""
  lo = (est["mean"] - est["ci_lo"]).clip(lower=0)
  hi = est["ci_hi"] - est["mean"]
  ax.errorbar(est[x], est["mean"], yerr=[lo, hi], marker="o", capsize=3, label=label)


def stability_vs_hparams(df: pd.DataFrame, path: str | None = None):
  """Expert L2 stability eps^2 = E_j ||x_K - x_K^(j)||^2 (full parameters) against K, one panel
  per hyperparameter (eta, b, data ratio: the others pooled), and the loss stability against K
  per eta. Error bars: 95% t-intervals over the twins (tasks x seeds x sampled j)."""
  from stability import twins  # plots import the estimator, never the other way round
  tw = df[(df["kind"] == "expert") & (df["role"] == "twin")]
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  panels = [("eta", "sq_full", "eps^2 by eta"), ("b", "sq_full", "eps^2 by b"),
            ("data_ratio", "sq_full", "eps^2 by data ratio (n)"),
            ("eta", "loss_stab", "test loss stability |f(x)-f(x')| by eta")]
  for ax, (var, col, title) in zip(axes, panels):
    for v, est in twins.estimate_table(tw, [var, "K"], col).groupby(var):
      _errorbar(ax, est, "K", f"{var}={v:g}")
    ax.set_yscale("log")
    ax.set_xlabel("K (steps)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return _finish(fig, path)


def merged_stability_vs_M(df: pd.DataFrame, path: str | None = None):
  """Merged-model stability E ||x_avg - x_avg^(i,j)||^2 (backbone) against the number of merged
  experts M, one line per merge, with the member mean / M^2 reference (the simple average's
  prediction); right: the ratio merged / member against M. Log-log; 95% t-intervals."""
  from stability import twins
  mt = df[(df["kind"] == "merged_twin") & (df["role"] == "twin")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  Kmax = mt["K"].max()
  mt = mt[mt["K"] == Kmax]
  for name, sub in mt.groupby("algorithm"):
    _errorbar(axes[0], twins.estimate_table(sub, ["M"], "sq_backbone"), "M", name)
    r = sub.groupby("M").sq_backbone.mean() / sub.groupby("M").member_sq_backbone.mean()
    axes[1].plot(r.index, r.values, marker="o", label=name)
  member = mt.groupby("M").member_sq_backbone.mean()
  Ms = member.index.to_numpy(float)
  axes[0].plot(Ms, member.values / Ms ** 2, "k--", label="member mean / M^2")
  axes[1].plot(Ms, 1 / Ms ** 2, "k--", label="1/M^2")
  for ax, t in zip(axes, [f"merged eps^2 (backbone), K={Kmax}", "merged / member eps^2"]):
    _log_axes(ax, "M (experts merged)", t)
    ax.set_xticks(Ms, [f"{m:g}" for m in Ms])
    ax.minorticks_off()
  return _finish(fig, path)


def merged_vs_members(df: pd.DataFrame, path: str | None = None):
  """Per merge group (config x group x K): merged-model eps^2 against the mean eps^2 of its
  members' twins (backbone), one panel per merge, with the line merged = member / M^2."""
  mt = df[(df["kind"] == "merged_twin") & (df["role"] == "twin")]
  per = mt.groupby(["algorithm", "M", "config", "group", "K"])[
      ["sq_backbone", "member_sq_backbone"]].mean().reset_index()
  names = sorted(per["algorithm"].unique())
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    sub = per[per["algorithm"] == name]
    for K, s in sub.groupby("K"):
      ax.scatter(s["member_sq_backbone"], s["sq_backbone"], s=12, alpha=0.7, label=f"K={K}")
    x = np.geomspace(sub["member_sq_backbone"].min(), sub["member_sq_backbone"].max(), 10)
    for M in sorted(sub["M"].unique()):
      ax.plot(x, x / M ** 2, "k--", lw=1, label=f"member / M^2 (M={int(M)})")
    _log_axes(ax, "mean member eps^2", name, ylabel="merged eps^2", legend=7)
  return _finish(fig, path)


def merge_comparison(df: pd.DataFrame, path: str | None = None):
  """Every merge on the same groups: merged test accuracy per algorithm at the last K (bars:
  mean +-1 s.e. over groups; the logit ensemble as the non-merged reference), and the merged
  generalization gap against the merged-model stability (one point per algorithm and K)."""
  mc = df[df["kind"] == "merge_compare"]
  Kmax = mc["K"].max()
  last = _mean_se(mc[mc["K"] == Kmax], ["algorithm"], "test_acc").sort_values("mean")
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  axes[0].barh(last["algorithm"], last["mean"], xerr=last["se"], color="tab:blue", alpha=0.8)
  axes[0].set_xlabel(f"merged test accuracy (mean over member tasks), K={Kmax}")
  axes[0].grid(alpha=0.3, axis="x")
  axes[1].set_prop_cycle(color=plt.cm.tab20.colors)
  per = mc.dropna(subset=["merged_eps2"]).groupby(["algorithm", "K"])[
      ["merged_eps2", "gap"]].mean().reset_index()
  for name, sub in per.groupby("algorithm"):
    axes[1].plot(sub["merged_eps2"], sub["gap"], marker="o", label=name)
  axes[1].set_xscale("log")
  axes[1].set_xlabel("merged-model stability eps^2 (backbone)")
  axes[1].set_ylabel("merged generalization gap")
  axes[1].grid(alpha=0.3, which="both")
  axes[1].legend(fontsize=7, ncol=2)
  return _finish(fig, path)


def bound_vs_measured(tables: dict[str, pd.DataFrame], path: str | None = None):
  """Predicted bound against the measured value, one panel per target (`theory.compare`
  tables: columns bound, measured, eta), log-log with y = x; infinite bounds are dropped."""
  fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.3), squeeze=False)
  for ax, (target, t) in zip(axes[0], tables.items()):
    ok = np.isfinite(t["bound"]) & (t["measured"] > 0) & (t["bound"] > 0)
    for eta, s in t[ok].groupby("eta"):
      ax.scatter(s["measured"], s["bound"], s=10, alpha=0.7, label=f"eta={eta:g}")
    lo = float(t.loc[ok, "measured"].min())
    hi = float(max(t.loc[ok, "bound"].max(), t.loc[ok, "measured"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    _log_axes(ax, f"measured {target}", f"{target}: {int(ok.sum())} of {len(t)} bounds finite",
              ylabel=f"non-convex bound on {target}", legend=7)
  return _finish(fig, path)
