"""Figures, one function per figure type, each taking the results DataFrame.

Bands are +-1 standard error over the group (and seed) replicates, unless a docstring says
otherwise. `bound_vs_measured` and `exponents_vs_predicted` take the theory comparison
(`sweep.theory_comparison(df)`: tables and summaries) instead.
"""
from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _mean_se(df: pd.DataFrame, by: list[str], col: str) -> pd.DataFrame:
  """Mean, s.e. and the +-1 s.e. band (ci_lo, ci_hi, as `_errorbar` reads) of col per `by`."""
  g = df.groupby(by)[col]
  out = g.agg(["mean", "std", "count"]).reset_index()
  out["se"] = out["std"].fillna(0) / np.sqrt(out["count"])
  out["ci_lo"], out["ci_hi"] = out["mean"] - out["se"], out["mean"] + out["se"]
  return out


def _replicates(df: pd.DataFrame, by: list[str], cols: list[str],
                units: list[str]) -> pd.DataFrame:
  """Means of cols per `by` and replicate (`units`, those df has): a replicate's rows at the
  other hyperparameters are averaged first, so `_mean_se` over it counts replicates."""
  return df.groupby(by + [u for u in units if u in df])[cols].mean().reset_index()


def _kind(df: pd.DataFrame, kind: str, study: str) -> pd.DataFrame:
  """The rows of one kind; ValueError when the store has none."""
  rows = df[df["kind"] == kind] if "kind" in df else df.iloc[:0]
  if not len(rows):
    raise ValueError(f"df: needs rows of kind {kind!r} (the {study}); got kinds "
                     f"{', '.join(sorted(map(str, df.get('kind', pd.Series()).unique())))}")
  return rows


def _originals(df: pd.DataFrame) -> pd.DataFrame:
  """Expert rows of the trained experts themselves (the stability study's twins left out)."""
  ex = df[df["kind"] == "expert"]
  return ex[ex["role"] == "original"] if "role" in ex else ex


def merged_vs_K(df: pd.DataFrame, path: str | None = None):
  """Merged model's test loss and gap against K, one line per eta (collapse of over-training).

  Uses `kind == 'merged'` rows (one per group x config x K); each line averages the groups and
  the other hyperparameters (b, data ratio) at that eta; bands are +-1 s.e. over groups.
  """
  merged = df[df["kind"] == "merged"]
  # Average over b and data ratio within each group first, so replicates are the groups.
  per_group = _replicates(merged, ["eta", "K"], ["test_loss", "gap"], ["group"])
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


_HPARAMS = (("eta", "eta"), ("b", "b (batch size)"), ("data_ratio", "data ratio (n / train pool)"))


def _hparam_axis(ax, var: str, values) -> None:
  """Log x for eta and b (ticks at the swept values), linear for the data ratio."""
  if var != "data_ratio":
    ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def gap_vs_hparams(df: pd.DataFrame, path: str | None = None):
  """Generalization gap against eta, against b and against the data ratio (the other two pooled),
  for the experts (top row) and the merged models (bottom row, when stored), one line per K.

  Error bars: +-1 s.e. over replicates (experts: tasks x seeds; merged: groups x seeds), each
  replicate first averaged over the pooled hyperparameters. The stability study's twins are
  left out (originals only).
  """
  sets = [(name, rows, units) for name, rows, units in (
      ("experts", _originals(df), ["task", "seed"]),
      ("merged models", df[df["kind"] == "merged"], ["group", "seed"])) if len(rows)]
  if not sets:
    raise ValueError("df: needs rows of kind 'expert' or 'merged' (the main or stability study)")
  fig, axes = plt.subplots(len(sets), 3, figsize=(15, 3.6 * len(sets)), squeeze=False)
  for row, (name, rows, units) in zip(axes, sets):
    for ax, (var, label) in zip(row, _HPARAMS):
      t = _mean_se(_replicates(rows, [var, "K"], ["gap"], units), [var, "K"], "gap")
      for K, est in t.groupby("K"):
        _errorbar(ax, est, var, f"K={K:g}")
      _hparam_axis(ax, var, sorted(t[var].unique()))
      ax.set_xlabel(label)
      ax.set_ylabel("generalization gap")
      ax.set_title(f"{name}: gap by {var}", fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  return _finish(fig, path)


_HP = [var for var, _ in _HPARAMS]


def _merge_groups(df: pd.DataFrame) -> pd.DataFrame:
  """One row per stored merge group and K: the merged value, its members' mean value and whether
  the members' (eta, b, data ratio) differ. Quantity 'gap': the main study's merged_task rows
  (the merged model on each member task) against the members' own expert rows; 'eps2': the
  stability study's merged_twin rows of the simple average (backbone), twins only."""
  key = ["K", "M", "config", "group"]
  parts = []
  mt = df[df["kind"] == "merged_task"]
  if len(mt):
    own = _originals(df).set_index(["K", "expert"])[_HP + ["gap"]].add_suffix("_member")
    j = mt[key + ["expert", "gap"]].join(own, on=["K", "expert"])
    parts.append(j.rename(columns={"gap": "merged", "gap_member": "members"}).assign(
        quantity="gap", **{h: j[f"{h}_member"] for h in _HP}))
  tw = df[(df["kind"] == "merged_twin") & (df.get("algorithm") == "average")]
  if "role" in tw:
    tw = tw[tw["role"] == "twin"]
  if len(tw):
    parts.append(tw[key + _HP].assign(quantity="eps2", merged=tw["sq_backbone"],
                                      members=tw["member_sq_backbone"]))
  if not parts:
    raise ValueError("df: needs rows of kind 'merged_task' (the main study) or 'merged_twin' of "
                     "the simple average (the stability study)")
  rows = pd.concat(parts, ignore_index=True)
  by = rows.groupby(["quantity"] + key)
  out = by[["merged", "members"]].mean()
  out["heterogeneous"] = by[_HP].nunique().max(axis=1) > 1
  out["eta"] = by["eta"].first()
  return out.reset_index()


def heterogeneous_vs_homogeneous(df: pd.DataFrame, path: str | None = None):
  """Merged against the mean of its members, per merge group and K: homogeneous groups (members
  share eta, b and data ratio; one colour per eta) against heterogeneous ones (black crosses).

  Panels, for what the store holds: the generalization gap (main study: y = x line) and the
  simple average's eps^2 (stability study, backbone: the line member / M^2). Each title counts
  the heterogeneous groups; the configured studies merge within one config, so there they
  show only homogeneous groups, and the title says so.
  """
  groups = _merge_groups(df)
  quantities = [q for q in ("gap", "eps2") if (groups["quantity"] == q).any()]
  fig, axes = plt.subplots(1, len(quantities), figsize=(5.5 * len(quantities), 4.3),
                           squeeze=False)
  for ax, q in zip(axes[0], quantities):
    g = groups[groups["quantity"] == q]
    for eta, s in g[~g["heterogeneous"]].groupby("eta"):
      ax.scatter(s["members"], s["merged"], s=14, alpha=0.7, label=f"homogeneous, eta={eta:g}")
    het = g[g["heterogeneous"]]
    ax.scatter(het["members"], het["merged"], s=30, marker="x", color="k",
               label="heterogeneous")
    n = f"{len(het)} heterogeneous of {len(g)} groups" + (" (none stored)" if not len(het) else "")
    if q == "gap":
      lo, hi = (float(min(g[c].min() for c in ("members", "merged"))),
                float(max(g[c].max() for c in ("members", "merged"))))
      ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="merged = members")
      ax.set_xlabel("members' mean generalization gap")
      ax.set_ylabel("merged generalization gap")
      ax.set_title(f"gap: {n}", fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    else:
      x = np.geomspace(g["members"].min(), g["members"].max(), 10)
      for M in sorted(g["M"].unique()):
        ax.plot(x, x / M ** 2, "k--", lw=1, label=f"member / M^2 (M={int(M)})")
      _log_axes(ax, "members' mean eps^2 (backbone)", f"simple average eps^2: {n}",
                ylabel="merged eps^2", legend=7)
  return _finish(fig, path)


def _finish(fig, path):
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return fig


def _log_axes(ax, xlabel: str, title: str, *, ylabel: str | None = None, legend: int = 8,
              scale: str | None = "log"):
  """Log-log axes (or `scale`: 'symlog', None for linear) with labels, a grid and a legend (the
  stability and theory figures' common styling)."""
  if scale:
    ax.set_xscale(scale)
    ax.set_yscale(scale)
  ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=legend)


def _errorbar(ax, est: pd.DataFrame, x: str, label: str):
  """Mean with its interval: columns mean, ci_lo, ci_hi (a 95% t-interval from
  `twins.estimate_table`, or +-1 s.e. from `_mean_se`)."""
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


_DIAGNOSTICS = ("cosine", "sign_conflict", "ties_sign_conflict", "ties_sparsity",
                "ties_merged_sparsity", "dare_sparsity")


def algorithms_vs_bound_terms(df: pd.DataFrame, path: str | None = None):
  """What each merge does to the terms of the merged model's bound (compare study, last K).

  Left, middle: per algorithm, the merged / member eps^2 ratio of each group (the factor on the
  stability term: 1/M^2 for the simple average, 1 for a single member) against the merged
  generalization gap and the merged test accuracy; mean +-1 s.e. over groups on both axes (the
  logit ensemble has no parameters, hence no ratio, and is left out). Right: the task-vector
  diagnostics that TIES and DARE act on (mean pairwise cosine, sign conflicts before and after
  the TIES trim, sparsities), mean +-1 s.e. over groups, one bar per K.
  """
  mc = _kind(df, "merge_compare", "compare study")
  Kmax = mc["K"].max()
  last = mc[mc["K"] == Kmax].assign(eps2_ratio=mc["merged_eps2"] / mc["member_eps2"])
  last = last.dropna(subset=["eps2_ratio"])
  fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
  x = _mean_se(last, ["algorithm"], "eps2_ratio").set_index("algorithm")
  for ax, col, label in ((axes[0], "gap", "merged generalization gap"),
                         (axes[1], "test_acc", "merged test accuracy")):
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    y = _mean_se(last, ["algorithm"], col).set_index("algorithm")
    for name in x.index:
      ax.errorbar(x.loc[name, "mean"], y.loc[name, "mean"], xerr=x.loc[name, "se"],
                  yerr=y.loc[name, "se"], fmt="o", capsize=3, label=name)
    for M in sorted(last["M"].unique()):
      ax.axvline(1 / M ** 2, color="k", ls="--", lw=1, label=f"1/M^2 (average, M={int(M)})")
    ax.axvline(1.0, color="k", ls=":", lw=1, label="1 (one member)")
    ax.set_xscale("log")
    ax.set_xlabel("merged / member eps^2 (per group)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against the stability factor, K={Kmax:g}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7, ncol=2)
  dg = df[df["kind"] == "diagnostics"]
  cols = [c for c in _DIAGNOSTICS if c in dg]
  Ks = sorted(dg["K"].unique())
  w = 0.8 / max(len(Ks), 1)
  for i, K in enumerate(Ks):
    d = dg[dg["K"] == K]
    est = [_mean_se(d.assign(_all=0), ["_all"], c).iloc[0] for c in cols]
    axes[2].bar(np.arange(len(cols)) + (i - (len(Ks) - 1) / 2) * w, [e["mean"] for e in est],
                w, yerr=[e["se"] for e in est], capsize=2, label=f"K={K:g}")
  axes[2].set_xticks(np.arange(len(cols)), cols, rotation=30, ha="right", fontsize=8)
  axes[2].set_title("task-vector diagnostics (what TIES / DARE act on)", fontsize=10)
  axes[2].grid(alpha=0.3, axis="y")
  if Ks:
    axes[2].legend(fontsize=8)
  return _finish(fig, path)


def bound_vs_measured(tables: dict[str, pd.DataFrame], path: str | None = None):
  """Predicted bound against the measured value, one panel per target (`theory.compare`
  tables: columns bound, measured, eta), log-log with y = x; infinite bounds are dropped.

  Drawn as log10 values on linear axes: the non-convex bounds reach 1e304, where matplotlib's
  log scale overflows (its margins and decade ticks pass the float64 maximum, and the axes
  fall back to [1, 10] with every point out of view).
  """
  fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.3), squeeze=False)
  for ax, (target, t) in zip(axes[0], tables.items()):
    ok = np.isfinite(t["bound"]) & (t["measured"] > 0) & (t["bound"] > 0)
    lt = np.log10(t.loc[ok, ["measured", "bound"]].astype(float)).assign(eta=t.loc[ok, "eta"])
    for eta, s in lt.groupby("eta"):
      ax.scatter(s["measured"], s["bound"], s=10, alpha=0.7, label=f"eta={eta:g}")
    lo, hi = float(lt["measured"].min()), float(lt["measured"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")  # over the measured range
    _log_axes(ax, f"log10 measured {target}",
              f"{target}: {int(ok.sum())} of {len(t)} bounds finite",
              ylabel=f"log10 non-convex bound on {target}", legend=7, scale=None)
  return _finish(fig, path)


def exponents_vs_predicted(summaries: Mapping[str, Mapping], path: str | None = None):
  """Fitted against predicted scaling exponents, one panel per target (`theory.compare`
  summaries, e.g. summary.json["theory"]): per hyperparameter axis, the joint log-log exponent
  fitted to the measurements (95% CI) and to the bound's values, against the bound's local
  exponent (`theory.bounds.scaling_exponents`, median over rows), with y = x. Symlog axes:
  the non-convex bound's exponents run to tens."""
  if not summaries or any(not s.get("axes") for s in summaries.values()):
    raise ValueError("summaries: needs one theory.compare summary with fitted 'axes' per target")
  fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.5),
                           squeeze=False)
  for ax, (target, s) in zip(axes[0], summaries.items()):
    t = pd.DataFrame(s["axes"]).T
    pred, meas = t["predicted_local"].astype(float), t["fit_measured"].astype(float)
    ok = np.isfinite(pred) & np.isfinite(meas)
    t, pred, meas = t[ok], pred[ok], meas[ok]
    ci = np.array([list(c) for c in t["fit_measured_ci"]], float).reshape(-1, 2)
    ax.errorbar(pred, meas, yerr=[(meas - ci[:, 0]).clip(lower=0), (ci[:, 1] - meas).clip(lower=0)],
                fmt="o", capsize=3, label="fitted to measured (95% CI)")
    ax.scatter(pred, t["fit_bound"].astype(float), marker="s", facecolors="none",
               edgecolors="tab:red", label="fitted to the bound")
    for axis, px, py in zip(t.index, pred, meas):
      ax.annotate(axis, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=9)
    vals = np.concatenate([pred, meas, t["fit_bound"].astype(float), ci.ravel()])
    vals = vals[np.isfinite(vals)]
    if len(vals):
      lo, hi = float(min(vals.min(), 0)), float(vals.max())
      ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    _log_axes(ax, "predicted exponent (bound, local)",
              f"{target}: fitted against predicted" + ("" if ok.any() else " (no finite fit)"),
              ylabel="fitted exponent", legend=7, scale="symlog")
  return _finish(fig, path)


def hetero_spread(df: pd.DataFrame, path: str | None = None):
  """Heterogeneous merge groups (`studies.hetero`), first merge: left and middle, the merged
  test loss and gap against the spread factor s of the spread groups, one line per axis (mean
  +-1 s.e. over groups), with the mixed and homogeneous groups as horizontal references; right,
  measured merged eps^2 against the non-convex prediction from the members' own
  hyperparameters, one point per group (non-finite predictions left out, counted in the title)."""
  hg = _kind(df, "hetero_group", "heterogeneous-group study")
  hg = hg[hg["algorithm"] == sorted(hg["algorithm"].unique())[0]]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  spread = hg[hg["mode"] == "spread"]
  for ax, col in zip(axes[:2], ("test_loss", "gap")):
    for axis, sub in spread.groupby("axis"):
      _errorbar(ax, _mean_se(sub, ["s"], col), "s", f"spread along {axis}")
    for i, mode in enumerate(("homogeneous", "mixed")):
      if (hg["mode"] == mode).any():
        ax.axhline(hg[hg["mode"] == mode][col].mean(), color=f"C{6 + i}", ls="--", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("spread factor s (members at c/s, c, c*s)")
    ax.set_ylabel(f"merged {col.replace('_', ' ')}")
    ax.set_title(f"merged {col.replace('_', ' ')} against the spread", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  ax = axes[2]
  ok = np.isfinite(hg["pred_eps2_nonconvex"]) & (hg["merged_eps2"] > 0)
  for mode, sub in hg[ok].groupby("mode"):
    ax.scatter(sub["pred_eps2_nonconvex"], sub["merged_eps2"], s=12, alpha=0.7, label=mode)
  if ok.any():
    lim = [min(hg[ok]["merged_eps2"].min(), hg[ok]["pred_eps2_nonconvex"].min()),
           max(hg[ok]["merged_eps2"].max(), hg[ok]["pred_eps2_nonconvex"].max())]
    ax.plot(lim, lim, "k--", lw=1, label="y = x")
  _log_axes(ax, "predicted merged eps^2 (non-convex bound)",
            f"{int(ok.sum())} of {len(hg)} groups with a finite prediction",
            ylabel="measured merged eps^2 (backbone)", legend=7)
  return _finish(fig, path)
