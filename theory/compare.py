"""Join the bounds of `theory.bounds` with measured results and summarise the agreement.

Input: a DataFrame, one row per measurement. Required columns (names are parameters, see
`DEFAULT_COLS`):
  eta, b, K, n           hyperparameters of the expert(s) behind the row (plain-SGD bounds);
  eps2                   target 'eps2': measured l2 on-average stability of the row's model;
  gap, train_loss        target 'gap': measured E[F(x) - F_S(x)] and the training loss F_S(x);
optional: M (the row is a simple average of M experts that share the hyperparameters; the bound is
divided by M^2), L and G (per-row constants, used when `L`/`G` name a column or are left None).

Per row: bound, measured, ratio = bound / measured, holds = bound >= measured, and assumption_ok
(eta L <= 2 for the convex bounds; always True for the non-convex ones).
Summary: fraction holding, ratio quantiles, Spearman(bound, measured), and per hyperparameter axis
that varies: Spearman of the axis with measured and with bound, the rank agreement of bound and
measured along the axis with the other axes fixed (`axis_agreement`), the exponent fitted
jointly over the varying axes (log-log OLS, with CI) for measured and for bound, and the median
local exponent predicted by `bounds.scaling_exponents`.

CLI:  python -m theory.compare RESULTS.csv|.parquet --L 0.25 --G 1 [--target gap] [--nonconvex]
      [--col eta=lr --col eps2=eps2_mean ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from theory import bounds, fit

DEFAULT_COLS: dict[str, str] = dict(eta="eta", b="b", K="K", n="n", M="M", eps2="eps2", gap="gap",
                                    train_loss="train_loss", L="L", G="G")
AXES: tuple[str, ...] = ("eta", "b", "K", "n", "M")


@dataclasses.dataclass(frozen=True)
class Comparison:
  table: pd.DataFrame
  summary: dict[str, Any]


def _const(df: pd.DataFrame, value: float | str | None, key: str,
           cols: Mapping[str, str]) -> np.ndarray:
  if value is None:
    value = cols[key]
    if value not in df:
      raise ValueError(f"pass {key}= or provide a column {value!r}")
  if isinstance(value, str):
    return df[value].to_numpy(np.float64)
  return np.full(len(df), float(value))


def predict(df: pd.DataFrame, *, L: float | str | None = None, G: float | str | None = None,
            target: str = "eps2", convex: bool = True, form: str = "exact",
            sampler: str = "epoch", eps2_from: str = "bound",
            cols: Mapping[str, str] | None = None) -> pd.DataFrame:
  """Columns eps2_bound and bound for each row (see module docstring)."""
  c = {**DEFAULT_COLS, **(cols or {})}
  g = lambda k: df[c[k]].to_numpy(np.float64)
  eta, b, K, n = g("eta"), g("b"), g("K"), g("n")
  Gv = _const(df, G, "G", c)
  Lv = _const(df, L, "L", c) if (L is not None or c["L"] in df or not convex or
                                 target == "gap") else np.full(len(df), np.nan)
  M = g("M") if c["M"] in df else np.ones(len(df))
  if form == "exact":
    e = (bounds.eps2_convex(eta, b, K, n, Gv, sampler) if convex else
         bounds.eps2_nonconvex(eta, b, K, n, Gv, Lv, sampler))
  elif form == "simple":
    e = (bounds.eps2_convex_simple(eta, b, K, n, Gv) if convex else
         bounds.eps2_nonconvex_simple(eta, b, K, n, Gv, Lv))
  else:
    raise ValueError(f"form must be 'exact' or 'simple', got {form!r}")
  out = pd.DataFrame(index=df.index)
  out["eps2_bound"] = e / M**2
  # 1/0 where decidable, nan where L is unknown.
  out["assumption_ok"] = (np.where(np.isnan(Lv), np.nan, (eta * Lv <= 2.0).astype(float))
                          if convex else np.ones(len(df)))
  if target == "eps2":
    out["bound"] = out["eps2_bound"]
  elif target == "gap":
    eps2 = out["eps2_bound"].to_numpy() if eps2_from == "bound" else g("eps2")
    out["bound"] = bounds.gen_gap_best(eps2, g("train_loss"), Lv)
  else:
    raise ValueError(f"target must be 'eps2' or 'gap', got {target!r}")
  return out


def compare(df: pd.DataFrame, *, L: float | str | None = None, G: float | str | None = None,
            target: str = "eps2", convex: bool = True, form: str = "exact",
            sampler: str = "epoch", eps2_from: str = "bound",
            cols: Mapping[str, str] | None = None, level: float = 0.95) -> Comparison:
  """Predicted vs measured per row, plus a summary (see module docstring)."""
  c = {**DEFAULT_COLS, **(cols or {})}
  pred = predict(df, L=L, G=G, target=target, convex=convex, form=form, sampler=sampler,
                 eps2_from=eps2_from, cols=c)
  table = df.copy()
  for k in pred:
    table[k] = pred[k]
  table["measured"] = df[c[target]].to_numpy(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    table["ratio"] = table["bound"] / table["measured"]
  table["holds"] = table["bound"] >= table["measured"]

  ratio = table["ratio"].to_numpy()
  finite = np.isfinite(ratio)
  summary: dict[str, Any] = dict(
      target=target, convex=convex, form=form, rows=len(table),
      holds=float(table["holds"].mean()) if len(table) else math.nan,
      assumption_ok=float(np.mean(table["assumption_ok"])) if len(table) else math.nan,
      ratio_q=dict(zip(("min", "median", "max"),
                       np.quantile(ratio[finite], [0, 0.5, 1]) if finite.any() else [math.nan] * 3)),
      spearman_bound_measured=fit.spearman(table["bound"], table["measured"])[0],
      axes={})

  varying = [a for a in AXES if c[a] in df and df[c[a]].nunique() > 1]
  if not varying:
    return Comparison(table, summary)
  g = lambda k: df[c[k]].to_numpy(np.float64)
  train_loss = g("train_loss") if c["train_loss"] in df else np.zeros(len(df))
  Lv = _const(df, L, "L", c) if (L is not None or c["L"] in df) else np.zeros(len(df))
  expo = bounds.scaling_exponents(
      g("eta"), g("b"), g("K"), g("n"), L=Lv, G=_const(df, G, "G", c),
      M=g("M") if c["M"] in df else 1.0, train_loss=train_loss, convex=convex)[target]
  X = np.stack([g(a) for a in varying], axis=-1)
  fits = {}
  for name in ("measured", "bound"):
    try:
      fits[name] = fit.loglog_fit(X, table[name].to_numpy(), level=level)
    except ValueError:
      fits[name] = None
  for i, a in enumerate(varying):
    fm, fb = fits["measured"], fits["bound"]
    others = [c[o] for o in varying if o != a]
    summary["axes"][a] = dict(
        spearman_measured=fit.spearman(g(a), table["measured"])[0],
        spearman_bound=fit.spearman(g(a), table["bound"])[0],
        **axis_agreement(table, c[a], others),
        fit_measured=float(fm.slope[i]) if fm else math.nan,
        fit_measured_ci=tuple(map(float, fm.ci_slope[i])) if fm else (math.nan, math.nan),
        fit_bound=float(fb.slope[i]) if fb else math.nan,
        predicted_local=float(np.nanmedian(np.broadcast_to(expo[a], (len(df),)))))
  return Comparison(table, summary)


def axis_agreement(table: pd.DataFrame, axis: str, others: Sequence[str]) -> dict[str, float]:
  """Rank agreement of bound and measured along one axis with the other axes held fixed.

  For every slice of rows that share the other axes' values and has >= 3 distinct values of
  `axis`: Spearman(bound, measured) over the slice. Returns its mean over slices
  (`spearman_within`) and the fraction of slices in which the bound's trend along the axis has
  the measured trend's sign (`sign_agreement`; a tie counts as a disagreement).
  """
  rhos, signs = [], []
  groups = table.groupby(list(others)) if others else [((), table)]
  for _, sl in groups:
    sl = sl.groupby(axis)[["bound", "measured"]].mean().reset_index()
    if len(sl) < 3 or not np.isfinite(sl["bound"]).all():
      continue
    rhos.append(fit.spearman(sl["bound"], sl["measured"])[0])
    trend = lambda v: np.sign(fit.spearman(sl[axis], sl[v])[0])
    signs.append(trend("bound") == trend("measured") != 0)
  rhos = [r for r in rhos if np.isfinite(r)]  # a slice with a constant column has no rank
  return dict(spearman_within=float(np.mean(rhos)) if rhos else math.nan,
              sign_agreement=float(np.mean(signs)) if signs else math.nan,
              slices=len(rhos))


def format_summary(summary: Mapping[str, Any]) -> str:
  """A few lines of text for a terminal."""
  q = summary["ratio_q"]
  lines = [
      f"target={summary['target']} convex={summary['convex']} form={summary['form']} "
      f"rows={summary['rows']}",
      f"holds={summary['holds']:.3f} assumption_ok={summary['assumption_ok']:.3f} "
      f"ratio bound/measured min={q['min']:.3g} median={q['median']:.3g} max={q['max']:.3g}",
      f"spearman(bound, measured)={summary['spearman_bound_measured']:.3f}",
  ]
  if summary["axes"]:
    lines.append(f"{'axis':>5} {'rho_meas':>8} {'rho_bnd':>8} {'within':>8} {'signs':>6} "
                 f"{'fit_meas':>8} {'95% CI':>17} {'fit_bnd':>8} {'local':>8}")
    for a, s in summary["axes"].items():
      lo, hi = s["fit_measured_ci"]
      lines.append(f"{a:>5} {s['spearman_measured']:8.3f} {s['spearman_bound']:8.3f} "
                   f"{s['spearman_within']:8.3f} {s['sign_agreement']:6.2f} "
                   f"{s['fit_measured']:8.3f} [{lo:7.3f},{hi:7.3f}] {s['fit_bound']:8.3f} "
                   f"{s['predicted_local']:8.3f}")
  return "\n".join(lines)


def _number_or_column(v: str | None) -> float | str | None:
  if v is None:
    return None
  try:
    return float(v)
  except ValueError:
    return v


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry point; prints the summary."""
  ap = argparse.ArgumentParser(prog="python -m theory.compare", description=__doc__.split("\n")[0])
  ap.add_argument("results", help="a .csv or .parquet file, one row per measurement")
  ap.add_argument("--L", default=None, help="smoothness: a number or a column name")
  ap.add_argument("--G", default=None, help="gradient-norm bound: a number or a column name")
  ap.add_argument("--target", choices=("eps2", "gap"), default="eps2")
  ap.add_argument("--nonconvex", action="store_true", help="use the (1 + eta L)^K bounds")
  ap.add_argument("--form", choices=("exact", "simple"), default="exact")
  ap.add_argument("--sampler", choices=("epoch", "replacement"), default="epoch")
  ap.add_argument("--eps2-from", choices=("bound", "measured"), default="bound")
  ap.add_argument("--col", action="append", default=[], metavar="KEY=NAME",
                  help=f"column name override, KEY in {sorted(DEFAULT_COLS)}")
  args = ap.parse_args(argv)
  cols = {}
  for kv in args.col:
    k, _, v = kv.partition("=")
    if k not in DEFAULT_COLS or not v:
      ap.error(f"bad --col {kv!r}")
    cols[k] = v
  path = args.results
  df = pd.read_parquet(path) if path.endswith((".parquet", ".pq")) else pd.read_csv(path)
  res = compare(df, L=_number_or_column(args.L), G=_number_or_column(args.G),
                target=args.target, convex=not args.nonconvex, form=args.form,
                sampler=args.sampler, eps2_from=args.eps2_from, cols=cols)
  print(format_summary(res.summary))


if __name__ == "__main__":
  main(sys.argv[1:])
