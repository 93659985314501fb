"""stability.studies.stability through the runner: originals + twins, merged-twin distances."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from stability import config as config_lib
from stability import results
from stability.studies import stability as stability_study

CONFIG = "stability_hparams.py:tiny"


@pytest.fixture(scope="module")
def stability_dir(tiny_run):
  return tiny_run(CONFIG)


def test_stability_study_rows_roles_and_noise_floor(stability_dir):
  df = results.load(stability_dir)
  ex, mt = df[df.kind == "expert"], df[df.kind == "merged_twin"]
  E = 2 * 2 * 4  # eta x b x tasks
  assert ex.groupby("K").role.value_counts().unstack().values.tolist() == [[E, E, 2 * E]] * 2
  twin = ex[ex.role == "twin"]
  assert twin.perturbation.between(0, twin.n - 1).all()
  assert (ex[ex.role != "twin"].perturbation == -1).all()
  assert (ex[ex.role == "control"][["sq_full", "loss_stab_max"]] == 0).all().all()
  assert (ex[ex.role == "original"].sq_full == 0).all()
  assert (twin[twin.K == 20].sq_full > 0).all()  # >= 1 epoch: every replaced j was drawn
  # A merged control is bit-identical to its original group's merge, for every algorithm.
  assert (mt[mt.role == "control"].sq_full == 0).all()
  assert set(mt.algorithm) == {"average", "ties", "dare_average"} and set(mt.M) == {2, 4}
  avg = mt[(mt.algorithm == "average") & (mt.role == "twin")]
  np.testing.assert_allclose(avg.sq_backbone, avg.member_sq_backbone / avg.M ** 2, rtol=1e-4)
  # Each twin row's member distance is that twin's own expert row.
  own = ex.set_index(["K", "expert"]).sq_backbone
  np.testing.assert_array_equal(avg.member_sq_backbone,
                                own.loc[list(zip(avg.K, avg.twin))].to_numpy())


def test_stability_study_summary_and_figures(stability_dir):
  s = json.load(open(os.path.join(stability_dir, "summary.json")))
  assert s["noise_floor_max_sq"] == 0.0 and s["merged_noise_floor_max_sq"] == 0.0
  assert s["merged_over_member_by_algorithm_M"]["average"] == {"2": 0.25, "4": 0.0625}
  assert set(s["eps2_exponents"]) == {"eta", "b", "K"}
  for f in ("stability_vs_hparams", "merged_stability_vs_M", "merged_vs_members"):
    assert os.path.getsize(os.path.join(stability_dir, f + ".png")) > 10_000


def test_estimates_table_is_the_t_interval_of_the_twin_rows(stability_dir):
  """Each cell of stability_estimates.csv, recomputed from the raw twin rows: the mean, the
  sample s.d. (ddof 1) and the 97.5% t quantile with count - 1 degrees of freedom. Rejects
  controls or originals pooled into a cell, a z interval (1.96), ddof 0, or cells keyed on the
  wrong columns."""
  from scipy import stats
  df = results.load(stability_dir)
  tw = df[(df.kind == "expert") & (df.role == "twin")]
  est = pd.read_csv(os.path.join(stability_dir, "stability_estimates.csv"))
  assert len(est) == 2 * 2 * 2 and (est["count"] == 4 * 2).all()  # eta x b x K; tasks x j
  for _, c in est.iterrows():
    x = tw[np.isclose(tw.eta, c.eta) & (tw.b == c.b) & (tw.K == c.K)].sq_full.to_numpy()
    assert len(x) == c["count"]
    half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
    assert c["mean"] == pytest.approx(np.mean(x), rel=1e-12)
    assert c.ci_hi - c["mean"] == pytest.approx(half, rel=1e-9)
    assert c["max"] == x.max()


@pytest.mark.parametrize("arg,msg", [
    ("--config.stability.merges=fisher", "stability.merges: unknown or data-dependent"),
    ("--config.stability.group_sizes=2,9", "stability.group_sizes"),
    ("--config.stability.num_twins=500", "stability.num_twins"),
    ("--config.stability.num_twins=-1", "stability.num_twins"),
    ("--config.stability.figures=scatter", "stability.figures: unknown figure"),
    ("--config.stability.num_groups=0", "stability.num_groups")])
def test_stability_bad_input_fails_before_compute(fails_before_compute, arg, msg):
  assert msg in fails_before_compute(CONFIG, arg)


def test_no_twins_and_no_control_fails_before_compute(fails_before_compute):
  err = fails_before_compute(CONFIG, "--config.stability.num_twins=0",
                             "--config.stability.control=false")
  assert "stability.num_twins: must be >= 1 when stability.control is False" in err


def test_heterogeneous_figure_needs_the_average_merge():
  cfg = config_lib.load(f"experiments/{CONFIG}", [
      "--config.stability.merges=ties",
      "--config.stability.figures=heterogeneous_vs_homogeneous"])
  with pytest.raises(ValueError, match="stability.figures: 'heterogeneous_vs_homogeneous' needs"):
    stability_study.validate(cfg)
