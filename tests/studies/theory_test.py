"""stability.studies.theory: constants along the run and the measured-vs-bound tables."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from stability import results
from theory import bounds

CONFIG = "theory_compare.py:tiny"


@pytest.fixture(scope="module")
def theory_dir(tiny_run):
  return tiny_run(CONFIG)


def test_theory_comparison_study_estimates_constants_and_compares(theory_dir):
  df = results.load(theory_dir)
  const = df[df.kind == "constants"]
  E = 2 * 2 * 4  # eta x b x tasks (originals only)
  assert len(const) == E * 2 and (const.G_max > 0).all() and (const.L > 0).all()
  s = json.load(open(os.path.join(theory_dir, "summary.json")))["theory"]
  for target in ("eps2", "gap"):
    t = pd.read_csv(os.path.join(theory_dir, f"theory_{target}.csv"))
    assert len(t) == E * 2 and s[target]["rows"] == E * 2
    # G and L are the running maxima of the stored estimates along each expert's trajectory
    # (rejects the estimate at K alone, or the maximum over the whole run).
    for e, sub in t.sort_values("K").groupby("expert"):
      c = const[const.expert == e].sort_values("K")
      np.testing.assert_array_equal(sub.G.to_numpy(), np.maximum.accumulate(c.G_max.to_numpy()))
      np.testing.assert_array_equal(sub.L.to_numpy(), np.maximum.accumulate(c.L.to_numpy()))
    assert set(s[target]["axes"]) == {"eta", "b", "K"}
  assert os.path.getsize(os.path.join(theory_dir, "bound_vs_measured.png")) > 10_000


def test_eps2_table_measures_the_twins_of_its_own_expert(theory_dir):
  """measured = mean over the expert's twins of sq_full at that K, and bound = the non-convex
  eps^2 bound at the row's own constants (rejects twins joined to another expert, or the
  backbone-only distance)."""
  df = results.load(theory_dir)
  tw = df[(df.kind == "expert") & (df.role == "twin")]
  t = pd.read_csv(os.path.join(theory_dir, "theory_eps2.csv"))
  for _, r in t.iterrows():
    x = tw[(tw.origin == r.expert) & (tw.K == r.K)].sq_full
    assert len(x) == 2 and r.measured == pytest.approx(x.mean(), rel=1e-12)
    assert r.bound == pytest.approx(float(bounds.eps2_nonconvex(r.eta, r.b, r.K, r.n, r.G, r.L)),
                                    rel=1e-9)
