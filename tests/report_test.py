"""stability.report: verdicts from intervals, the findings from summaries, and no drift between
the committed summaries, docs/results.md and the README's findings block."""
import ast
import glob
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from stability import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ci,sign,want", [
    ([0.1, 0.5], 1, "reproduced"), ([-0.5, -0.1], 1, "refuted"), ([-0.1, 0.5], 1,
    "inconclusive at this scale"), ([-0.5, -0.1], -1, "reproduced"), ([0.1, 0.5], -1, "refuted"),
    (None, 1, "inconclusive at this scale"), ([None, 0.3], 1, "inconclusive at this scale"),
    ([float("nan"), 0.3], -1, "inconclusive at this scale")])
def test_sign_verdict_reads_the_interval_against_the_predicted_sign(ci, sign, want):
  """Rejects a verdict that ignores the predicted sign, or calls an interval holding 0 a result."""
  assert report.sign_verdict(ci, sign) == want


def _main_table(slopes, rows=60, seed=0):
  rng = np.random.default_rng(seed)
  t = pd.DataFrame(dict(eta=rng.choice([0.01, 0.05, 0.1], rows), b=rng.choice([16, 32, 64], rows),
                        n=rng.choice([500, 1000, 2000], rows), K=rng.choice([100, 400], rows)))
  t["measured"] = np.exp(sum(s * np.log(t[a]) for a, s in slopes.items())
                         + 0.01 * rng.normal(size=rows))
  return t


def test_gap_exponents_recover_known_slopes_and_drive_the_verdicts():
  """A synthetic gap ~ eta^1 b^+0.5 n^-1 K^0.3: the fit recovers each slope, so 'gap down with
  b' is refuted and the others reproduced (rejects axes mixed up in the regressor order)."""
  slopes = dict(eta=1.0, b=0.5, n=-1.0, K=0.3)
  t = _main_table(slopes)
  t.loc[0, "measured"] = -1.0  # a non-positive gap is dropped and counted
  ex = report.gap_exponents(t)
  for a, s in slopes.items():
    assert ex[a]["slope"] == pytest.approx(s, abs=0.05) and ex[a]["dropped"] == 1
  rows = {f.claim: f for f in report.findings({"main": {"theory_merged_gap.csv": t}})}
  assert rows["gap up with eta"].verdict == "reproduced"
  assert rows["gap down with b (fixed K)"].verdict == "refuted"
  assert rows["gap down with n"].verdict == "reproduced"
  assert rows["gap down with b (fixed epochs)"].verdict == "not measured yet"


def _hetero(verdicts):
  spread = {f"axis{i}": {"test_loss": dict(rho=0.5, ci=[0.1, 0.9], n=12, similar_merge_better=v)}
            for i, v in enumerate(verdicts)}
  return {"hetero": {"summary.json": {"by_algorithm": {"average": {"spread": spread}}}}}


@pytest.mark.parametrize("votes,want", [
    (["yes", "yes"], "reproduced"), (["yes", "inconclusive"], "reproduced"),
    (["no", "inconclusive"], "refuted"), (["yes", "no"], "inconclusive at this scale"),
    (["inconclusive"], "inconclusive at this scale")])
def test_similar_hyperparameters_verdict_combines_the_axes(votes, want):
  rows = {f.claim: f for f in report.findings(_hetero(votes))}
  assert rows["similar hyperparameters merge better"].verdict == want


def test_sparsification_row_compares_ties_with_the_average():
  res = {"stability_members": {"summary.json": {"merged_over_member_by_algorithm_M": {
      "average": {"4": 0.0625}, "ties": {"4": 1.1}}}}}
  f = {f.claim: f for f in report.findings(res)}["sparsification tightens the bound"]
  assert f.verdict == "refuted" and "outside the theorem" in f.measured
  res["stability_members"]["summary.json"]["merged_over_member_by_algorithm_M"]["ties"]["4"] = 0.01
  f = {f.claim: f for f in report.findings(res)}["sparsification tightens the bound"]
  assert f.verdict == "reproduced"


def test_every_claim_has_a_row_even_without_summaries():
  rows = report.findings({})
  assert len(rows) == 9 and all(f.verdict == "not measured yet" for f in rows)


def test_committed_report_and_readme_block_match_the_committed_summaries(monkeypatch):
  """`make results` would change nothing: docs/results.md and the README's findings block are
  what the committed summaries render to."""
  monkeypatch.chdir(ROOT)
  assert report.main(["--check"]) == 0


def test_readme_block_quotes_only_numbers_the_report_contains():
  readme = open(os.path.join(ROOT, "README.md")).read()
  block = readme.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
  assert report.numbers(block) <= report.numbers(open(os.path.join(ROOT, report.REPORT)).read())


def _measured_lines():
  """Lines of config docstrings and notebook markdown that quote a measurement."""
  out = []
  for p in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    doc = ast.get_docstring(ast.parse(open(p).read())) or ""
    out += [(p, line) for line in doc.splitlines()]
  for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")):
    for c in json.load(open(p))["cells"]:
      if c["cell_type"] == "markdown":
        out += [(p, line) for line in "".join(c["source"]).splitlines()]
  return [(p, line) for p, line in out if re.search(r"measured|full run", line, re.I)]


def test_configs_and_notebooks_quote_no_number_the_report_lacks():
  """A config docstring or notebook that says what a run measured quotes only numbers that the
  generated report holds (they once drifted from the README's)."""
  have = report.numbers(open(os.path.join(ROOT, report.REPORT)).read())
  bad = [(os.path.basename(p), line) for p, line in _measured_lines()
         if not report.numbers(line) <= have]
  assert not bad, bad
