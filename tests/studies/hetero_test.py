"""stability.studies.hetero through the runner: heterogeneous merge groups on the tiny suite."""
import json
import os

import numpy as np
import pytest

from stability import results
from stability.studies import hetero
from theory import bounds

CONFIG = "hetero.py:tiny"
CENTRE = dict(eta=0.05, b=4, K=20)  # experiments/hetero.py's tiny centre


@pytest.fixture(scope="module")
def hetero_dir(tiny_run):
  return tiny_run(CONFIG)


@pytest.fixture(scope="module")
def table(hetero_dir):
  df = results.load(hetero_dir)
  return df[df.kind == "expert"], df[df.kind == "hetero_group"]


def test_rows_cover_every_configuration_and_group_set(table):
  ex, hg = table
  # centre + (lr, K) x s = 3 x (c/3, c*3) = 5 configurations x 4 tasks, each with 2 twins
  assert len(ex) == 5 * 4 * 3 and (ex.role == "original").sum() == 20
  assert sorted(ex[ex.role == "original"].K.unique()) == [7, 20, 60]  # each expert's own K
  sets = hg.groupby(["mode", "axis", "s"], dropna=False).size()
  assert len(sets) == 6 and (sets == 3).all()  # homogeneous, mixed, 2 axes x s in {1, 3}


def test_members_take_the_configurations_their_mode_says(table):
  """Spread along an axis: members at c/s, c, c*s in that order, the other axes held (rejects
  the sides swapped, the wrong axis moved, or s applied twice); homogeneous: one configuration;
  the task draws are the same in every set (common random numbers)."""
  _, hg = table
  for _, r in hg[(hg["mode"] == "spread") & (hg.s == 3)].iterrows():
    if r.axis == "lr":
      np.testing.assert_allclose(r.eta, [CENTRE["eta"] / 3, CENTRE["eta"], CENTRE["eta"] * 3],
                                 rtol=1e-6)
      assert r.K_members == [20, 20, 20]
    else:
      assert r.K_members == [7, 20, 60]
      np.testing.assert_allclose(r.eta, [CENTRE["eta"]] * 3, rtol=1e-6)
    assert r.b == [CENTRE["b"]] * 3
  for _, r in hg[(hg["mode"] == "spread") & (hg.s == 1)].iterrows():
    assert r.K_members == [20] * 3 and r.b == [4] * 3
  for _, r in hg[hg["mode"] == "homogeneous"].iterrows():
    assert len(set(r.eta)) == 1 and len(set(r.K_members)) == 1 and len(set(r.n)) == 1
  draws = hg.groupby(["mode", "axis", "s"], dropna=False).apply(
      lambda d: tuple(map(tuple, d.sort_values("group").tasks)), include_groups=False)
  assert len(set(draws)) == 1


def test_measured_merged_stability_and_its_head_term(table):
  """The simple average moves only the perturbed member, by 1/M: merged backbone eps^2 =
  member backbone eps^2 / M^2 (rejects 1/M, or every member's twins pooled wrongly), and the
  full-parameter merged eps^2 adds the perturbed member's own head distance undivided."""
  _, hg = table
  np.testing.assert_allclose(hg.merged_eps2, hg.member_eps2 / hg.M ** 2, rtol=1e-4)
  np.testing.assert_allclose(hg.merged_eps2_full - hg.merged_eps2, hg.member_eps2_head,
                             rtol=1e-4, atol=1e-12)
  assert (hg.member_eps2_head > 0).all()


def test_prediction_uses_each_members_own_hyperparameters(table):
  """pred = mean over members of eps2_bound(eta_i, b_i, K_i, n_i) / M^2 with the config's G and
  L (rejects the centre's hyperparameters for every member, or a missing 1/M^2)."""
  _, hg = table
  G, L = 26.2, 10.8  # the tiny config's theory section
  for _, r in hg.iterrows():
    e = [float(bounds.eps2_nonconvex(np.float32(eta), b, K, n, G, L))
         for eta, b, K, n in zip(r.eta, r.b, r.K_members, r.n)]
    assert r.pred_eps2_nonconvex == pytest.approx(np.mean(e) / r.M ** 2, rel=1e-6)
  spread = hg[(hg["mode"] == "spread") & (hg.s == 3) & (hg.axis == "K")]
  centre = hg[(hg["mode"] == "spread") & (hg.s == 1) & (hg.axis == "K")]
  assert (spread.pred_eps2_nonconvex.to_numpy() != centre.pred_eps2_nonconvex.to_numpy()).all()


def test_summary_reports_agreement_with_n_and_ci(hetero_dir, table):
  _, hg = table
  s = json.load(open(os.path.join(hetero_dir, "summary.json")))["by_algorithm"]["average"]
  ra = s["rank_agreement_eps2"]["nonconvex"]
  assert ra["n"] + ra["dropped_nonfinite"] == len(hg)
  assert ra["ci"][0] <= ra["rho"] <= ra["ci"][1]
  for axis in ("lr", "K"):
    v = s["spread"][axis]["test_loss"]
    assert v["similar_merge_better"] in ("yes", "no", "inconclusive") and v["n"] == 6
  assert set(s["mixed_minus_homogeneous"]) == {"test_loss", "gap", "merged_eps2"}
  assert os.path.getsize(os.path.join(hetero_dir, "hetero_spread.png")) > 10_000


def test_verdict_reads_the_interval():
  assert hetero._verdict([0.1, 0.5]) == "yes" and hetero._verdict([-0.5, -0.1]) == "no"
  assert hetero._verdict([-0.1, 0.5]) == "inconclusive" and hetero._verdict(None) == "inconclusive"
  r = hetero._spearman_ci([1, 2, 3, 4, np.inf, 6], [1, 3, 2, 5, 1, 7])
  assert r["n"] == 5 and r["dropped_nonfinite"] == 1


@pytest.mark.parametrize("args,msg", [
    (["--config.hetero.spreads=1,0.5"], "hetero.spreads: each spread factor must be >= 1"),
    (["--config.hetero.group_size=5"], "hetero.group_size: must lie in [2, 4]"),
    (["--config.hetero.group_size=2"], "hetero.group_size: the spread mode needs >= 3"),
    (["--config.hetero.modes=spread,random"], "hetero.modes"),
    (["--config.hetero.axes=lr,momentum"], "hetero.axes"),
    (["--config.hetero.merges=fisher"], "hetero.merges: unknown or data-dependent merge"),
    (["--config.sweep.milestones=40"], "sweep.milestones: the last milestone must be >= "),
    (["--config.sweep.milestones=60,40"], "sweep.milestones: must be positive and strictly"),
    (["--config.hetero.axes=batch_size", "--config.hetero.spreads=1,10"],
     "hetero.spreads (axis batch_size, s = 10, c * s): gives an invalid expert: b:"),
    (["--config.data.tasks=tiny0,tiny0,tiny1"], "data.tasks: each task at most once")])
def test_bad_input_fails_before_compute(fails_before_compute, args, msg):
  assert msg in fails_before_compute(CONFIG, *args)
