"""The results report: docs/results.md, rendered from the committed summaries of every study.

  make results        # == python -m stability.report: renders docs/results.md and the README's
                      #    findings block from docs/results/<study>/ (seconds, no compute)
  make results-runs   # reruns every study into runs/<study> and refreshes docs/results/<study>/
                      #    with its summary.json and small CSVs, then renders (~30 min, 2 cores)

The report opens with the findings table: one row per claim of the paper (arXiv 2601.21690),
with our measurement, the prediction, a verdict (reproduced / refuted / inconclusive at this
scale / not measured yet) and the interval behind it, and the command whose output it reads.
Then one short section per study. Every number in it is read from a committed file under
docs/results/, and each section names the command that makes that file; nothing is typed in.

Verdicts from an interval: a predicted sign is reproduced when the 95% CI lies on its side of 0,
refuted when it lies on the other side, and inconclusive when it contains 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
import pandas as pd

from theory import fit as fit_lib

RESULTS = "docs/results"
REPORT = "docs/results.md"
README = "README.md"
BEGIN, END = "<!-- findings:begin (make results) -->", "<!-- findings:end -->"

# study -> (config, files kept under docs/results/<study>/)
STUDIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "main": ("experiments/main.py", ("summary.json", "theory_merged_gap.csv")),
    "stability_hparams": ("experiments/stability_hparams.py", ("summary.json",)),
    "stability_M": ("experiments/stability_M.py", ("summary.json",)),
    "stability_members": ("experiments/stability_members.py", ("summary.json",)),
    "compare_merges": ("experiments/compare_merges.py", ("summary.json", "compare_table.csv")),
    "theory_compare": ("experiments/theory_compare.py", ("summary.json",)),
    "hetero": ("experiments/hetero.py", ("summary.json", "hetero_groups.csv")),
}
# study -> figures copied to docs/figures/ by `--collect` (the README shows them)
FIGURES: dict[str, tuple[str, ...]] = {
    "main": ("merged_vs_K.png", "gap_vs_hparams.png"),
    "stability_hparams": ("stability_vs_hparams.png",),
    "stability_M": ("merged_stability_vs_M.png",),
    "stability_members": ("merged_vs_members.png",),
    "compare_merges": ("merge_comparison.png", "algorithms_vs_bound_terms.png"),
    "theory_compare": ("bound_vs_measured.png", "exponents_vs_predicted.png"),
    "hetero": ("hetero_spread.png",),
}
VERDICTS = ("reproduced", "refuted", "inconclusive at this scale", "not measured yet")


def command(study: str) -> str:
  return f"python -m experiments.run {STUDIES[study][0]} --workdir runs/{study}"


@dataclasses.dataclass(frozen=True)
class Finding:
  claim: str
  measured: str
  predicted: str
  verdict: str
  source: str      # the study whose committed summary the row reads ("" = none yet)


def fmt(x: Any, digits: int = 3) -> str:
  """A number at `digits` significant figures (ints as they are; None/nan as 'n/a')."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{float(x):.{digits}g}"


def interval(ci) -> str:
  return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci and None not in ci else "[n/a]"


def sign_verdict(ci, predicted_sign: int) -> str:
  """reproduced / refuted / inconclusive from a 95% CI and the predicted sign (+1 or -1)."""
  if not ci or any(c is None or not math.isfinite(c) for c in ci):
    return VERDICTS[2]
  lo, hi = ci
  sign = 1 if lo > 0 else -1 if hi < 0 else 0
  return VERDICTS[0] if sign == predicted_sign else VERDICTS[1] if sign else VERDICTS[2]


def load(root: str = RESULTS) -> dict[str, dict[str, Any]]:
  """{study: {file: parsed}} for the studies whose summaries are committed under `root`."""
  out: dict[str, dict[str, Any]] = {}
  for study, (_, files) in STUDIES.items():
    d = os.path.join(root, study)
    if not os.path.isfile(os.path.join(d, "summary.json")):
      continue
    out[study] = {f: (json.load(open(os.path.join(d, f))) if f.endswith(".json")
                      else pd.read_csv(os.path.join(d, f)))
                  for f in files if os.path.exists(os.path.join(d, f))}
  return out


def gap_exponents(table: pd.DataFrame) -> dict[str, dict]:
  """Joint log-log fit of the merged gap on (eta, b, n, K) over the main job's config x K rows
  (rows with gap > 0; the count is kept): slope and 95% CI per axis."""
  t = table[table["measured"] > 0]
  axes = [a for a in ("eta", "b", "n", "K") if t[a].nunique() > 1]
  f = fit_lib.loglog_fit(t[axes].to_numpy(float), t["measured"].to_numpy(float))
  return {a: dict(slope=float(f.slope[i]), ci=[float(c) for c in f.ci_slope[i]], rows=len(t),
                  dropped=int(len(table) - len(t))) for i, a in enumerate(axes)}


def findings(res: dict[str, dict[str, Any]]) -> list[Finding]:
  """One row per claim of the paper, from whatever summaries are committed."""
  rows: list[Finding] = []
  missing = lambda claim, pred, why: Finding(claim, why, pred, VERDICTS[3], "")
  if "main" in res and "theory_merged_gap.csv" in res["main"]:
    ex = gap_exponents(res["main"]["theory_merged_gap.csv"])
    note = ("merged gap, joint log-log fit over the main job's configs x K "
            f"({ex['eta']['rows']} rows; heavy-ball SGD, outside the theorem)")
    for axis, claim, sign in (("eta", "gap up with eta", 1), ("b", "gap down with b (fixed K)", -1),
                              ("n", "gap down with n", -1)):
      e = ex.get(axis)
      rows.append(Finding(
          claim, f"slope {fmt(e['slope'])} {interval(e['ci'])}; {note}" if e else "axis fixed",
          "slope > 0" if sign > 0 else "slope < 0",
          sign_verdict(e["ci"], sign) if e else VERDICTS[3], "main"))
  else:
    rows += [missing(c, p, "main job not committed") for c, p in (
        ("gap up with eta", "slope > 0"), ("gap down with b (fixed K)", "slope < 0"),
        ("gap down with n", "slope < 0"))]
  rows.append(missing("gap down with b (fixed epochs)", "slope < 0",
                      "needs a grid with K proportional to b (not run yet)"))
  if "summary.json" in res.get("main", {}):
    s = res["main"]["summary.json"]["merged_test_loss_by_eta_K"]
    argmins = {eta: int(min(v, key=v.get)) for eta, v in s.items()}
    Kmax = max(int(k) for v in s.values() for k in v)
    rows.append(Finding(
        "over-training collapse at K*",
        "argmin over K of the merged test loss: " + ", ".join(
            f"eta {eta}: K = {k}" for eta, k in sorted(argmins.items(), key=lambda x: float(x[0])))
        + f" (snapshots up to K = {Kmax}; no spread over groups in the summary, so no CI)",
        "K* from D2, G, L, zeta2 (not estimated from a run yet)", VERDICTS[2], "main"))
  else:
    rows.append(missing("over-training collapse at K*", "K* from D2, G, L, zeta2",
                        "main job not committed"))
  if "stability_M" in res:
    sl = res["stability_M"]["summary.json"].get("merged_eps2_slope_vs_M", {}).get("average")
    rows.append(Finding(
        "stability term down with M",
        (f"merged eps^2 of the simple average against M: slope {fmt(sl['slope'])} "
         f"{interval(sl['ci'])} (an identity of the estimator for the average: only the "
         "perturbed member moves, by 1/M)") if sl else "no slope stored",
        "slope -2 (eps^2 / M^2)", sign_verdict(sl["ci"], -1) if sl else VERDICTS[3],
        "stability_M"))
  else:
    rows.append(missing("stability term down with M", "slope -2", "stability_M not committed"))
  rows.append(missing("heterogeneity up with M", "dispersion grows with M",
                      "task-vector dispersion against M not run yet"))
  if "hetero" in res:
    by = res["hetero"]["summary.json"]["by_algorithm"].get("average", {})
    parts, votes = [], []
    for axis, v in sorted(by.get("spread", {}).items()):
      t = v["test_loss"]
      votes.append(t["similar_merge_better"])
      parts.append(f"{axis}: rho(log s, merged test loss) {fmt(t['rho'])} {interval(t['ci'])} "
                   f"n {t['n']}")
    yes, no = votes.count("yes"), votes.count("no")
    verdict = (VERDICTS[0] if yes and not no else VERDICTS[1] if no and not yes else VERDICTS[2])
    rows.append(Finding("similar hyperparameters merge better", "; ".join(parts) or "no spread",
                        "rho > 0 (loss rises with the spread s)", verdict, "hetero"))
  else:
    rows.append(missing("similar hyperparameters merge better", "rho > 0",
                        "hetero study not committed"))
  if "stability_members" in res:
    r = res["stability_members"]["summary.json"]["merged_over_member_by_algorithm_M"]
    M = sorted(r.get("average", {}))[0] if r.get("average") else None
    if M and "ties" in r:
      avg, ties = r["average"][M], r["ties"][M]
      rows.append(Finding(
          "sparsification tightens the bound",
          f"merged / member eps^2 at M = {M}: TIES {fmt(ties)} against the average's {fmt(avg)} "
          "(pooled means, no CI; TIES's mask depends on the task vectors: outside the theorem)",
          "TIES below the average", VERDICTS[1] if ties > avg else VERDICTS[0],
          "stability_members"))
  if not any(f.claim.startswith("sparsification") for f in rows):
    rows.append(missing("sparsification tightens the bound", "TIES/DARE below the average",
                        "stability_members not committed"))
  return rows


def findings_table(rows: list[Finding]) -> str:
  lines = ["| claim | measured | predicted | verdict | from |", "| --- | --- | --- | --- | --- |"]
  for f in rows:
    src = f"`{command(f.source)}`" if f.source else ""
    lines.append(f"| {f.claim} | {f.measured} | {f.predicted} | **{f.verdict}** | {src} |")
  return "\n".join(lines)


def _section(study: str, res: dict[str, Any]) -> list[str]:
  s = res["summary.json"]
  out = [f"## {study}", "", f"`{command(study)}` (summary: `docs/results/{study}/`)", ""]
  if study == "main":
    out.append(f"Experts {s['experts']}, mean test accuracy {fmt(s['expert_test_acc'])}; "
               f"merged {fmt(s['merged_test_acc'])}; diverged {s['diverged']}.")
    out += ["", "| eta | " + " | ".join(f"K = {k}" for k in s["milestones"]) + " |",
            "| --- |" + " --- |" * len(s["milestones"])]
    for eta, v in sorted(s["merged_gap_by_eta_K"].items(), key=lambda x: float(x[0])):
      out.append(f"| {eta} | " + " | ".join(fmt(v[str(k)]) for k in s["milestones"]) + " |")
    out += ["", "(merged generalization gap, mean over configs and groups)"]
  elif study == "stability_hparams" and "eps2_exponents" in s:
    out.append("eps^2 ~ " + ", ".join(f"{a}^{fmt(e['slope'])} {interval(e['ci'])}"
                                      for a, e in s["eps2_exponents"].items())
               + f" (R^2 {fmt(s['eps2_fit_r2'])}); noise floor {fmt(s['noise_floor_max_sq'])}.")
  elif study in ("stability_M", "stability_members"):
    for name, v in s["merged_over_member_by_algorithm_M"].items():
      out.append(f"- {name}: merged / member eps^2 " + ", ".join(
          f"M = {M}: {fmt(x)}" for M, x in v.items()))
  elif study == "compare_merges":
    out += ["| merge | test acc | gap | merged / member eps^2 |", "| --- | --- | --- | --- |"]
    for name, v in sorted(s["table_at_Kmax"].items(), key=lambda x: -(x[1]["test_acc"] or 0)):
      out.append(f"| {name} | {fmt(v.get('test_acc'))} | {fmt(v.get('gap'))} | "
                 f"{fmt(v.get('eps2_ratio'))} |")
  elif study == "theory_compare" and "theory" in s:
    for target, v in s["theory"].items():
      out.append(f"- {target}: bound >= measured on {fmt(v['holds'])} of {v['rows']} rows, "
                 f"median bound / measured {fmt(v['ratio_q']['median'])}, Spearman "
                 f"{fmt(v['spearman_bound_measured'])}.")
  elif study == "hetero":
    for name, v in s["by_algorithm"].items():
      for form, r in v["rank_agreement_eps2"].items():
        out.append(f"- {name}, predicted ({form} bound) vs measured merged eps^2: Spearman "
                   f"{fmt(r['rho'])} {interval(r['ci'])}, n {r['n']} "
                   f"({r['dropped_nonfinite']} non-finite dropped).")
      for col, d in v.get("mixed_minus_homogeneous", {}).items():
        out.append(f"- {name}, mixed minus homogeneous {col}: {fmt(d['diff'])} "
                   f"{interval(d['ci'])}.")
  return out + [""]


def render(res: dict[str, dict[str, Any]]) -> str:
  """docs/results.md from the committed summaries."""
  out = ["# Results", "",
         "Generated by `make results` (`python -m stability.report`) from the summaries "
         "committed under `docs/results/`; `make results-runs` reruns every study and "
         "refreshes them. Do not edit by hand.", "", "## Findings", "",
         findings_table(findings(res)), ""]
  for study in STUDIES:
    if study in res:
      out += _section(study, res[study])
  return "\n".join(out).rstrip() + "\n"


def readme_with_block(readme: str, res: dict[str, dict[str, Any]]) -> str:
  """The README with its findings block (between the markers) regenerated."""
  if BEGIN not in readme or END not in readme:
    raise ValueError(f"{README}: needs the markers {BEGIN!r} and {END!r}")
  head, rest = readme.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{findings_table(findings(res))}\n{END}{tail}"


NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?")


def numbers(text: str) -> set[str]:
  """Decimal numbers quoted in a text (the README-against-report check compares these)."""
  return set(NUMBER.findall(text))


def collect(runs: str, root: str = RESULTS, figures: str = "docs/figures") -> list[str]:
  """Copies each study's summary and small CSVs from runs/<study>/ into docs/results/<study>/
  (wall time dropped, so a rerun on the same code changes nothing) and its figures into
  docs/figures/; returns the studies collected."""
  import shutil  # noqa: PLC0415
  done = []
  for study, (_, files) in STUDIES.items():
    src = os.path.join(runs, study)
    if not os.path.isfile(os.path.join(src, "summary.json")):
      continue
    os.makedirs(os.path.join(root, study), exist_ok=True)
    for f in files:
      if f == "summary.json":
        s = json.load(open(os.path.join(src, f)))
        s.pop("wall_time", None)
        with open(os.path.join(root, study, f), "w") as fh:
          json.dump(s, fh, indent=1, sort_keys=True)
          fh.write("\n")
      elif os.path.exists(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), os.path.join(root, study, f))
    for f in FIGURES.get(study, ()):
      if os.path.exists(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), os.path.join(figures, f))
    done.append(study)
  return done


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m stability.report", description=__doc__.split("\n")[0])
  ap.add_argument("--results", default=RESULTS)
  ap.add_argument("--out", default=REPORT)
  ap.add_argument("--readme", default=README)
  ap.add_argument("--check", action="store_true", help="exit 1 if a file would change")
  ap.add_argument("--collect", metavar="RUNS", help="first copy the summaries of the study "
                  "workdirs RUNS/<study>/ into --results (make results-runs)")
  args = ap.parse_args(argv)
  if args.collect:
    print("collected:", ", ".join(collect(args.collect, args.results)) or "nothing")
  res = load(args.results)
  new = {args.out: render(res), args.readme: readme_with_block(open(args.readme).read(), res)}
  stale = [p for p, text in new.items() if not os.path.exists(p) or open(p).read() != text]
  if args.check:
    for p in stale:
      print(f"{p}: stale; run `make results`", file=sys.stderr)
    return 1 if stale else 0
  for p, text in new.items():
    with open(p, "w") as f:
      f.write(text)
  print(f"wrote {', '.join(new)} from {len(res)} committed summaries ({', '.join(res)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
