"""End to end through the runner on the tiny suite: tables, figure, rerun skip, bad input."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from experiments import run as runner
from stability import results, sweep, tasks


def run_ok(tmp_path_factory, config: str) -> str:
  """Runs experiments/<config>.py through the runner into a fresh workdir; returns it."""
  wd = str(tmp_path_factory.mktemp(config))
  assert runner.main([f"experiments/{config}.py", "--workdir", wd]) == 0
  return wd


def fails_before_compute(tmp_path, capsys, config: str, arg: str) -> str:
  """Runs with a bad override: exit 2, nothing stored; returns the error line."""
  wd = tmp_path / "w"
  assert runner.main([f"experiments/{config}.py", "--workdir", str(wd), arg]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert not (wd / results.DB).exists()
  return err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return run_ok(tmp_path_factory, "main_tiny")


def test_main_job_writes_tidy_tables_and_figure(workdir):
  df = results.load(workdir)
  E = 2 * 2 * 2 * 4  # eta x b x ratio x tasks
  ex, mt, mg = (df[df.kind == k] for k in ("expert", "merged_task", "merged"))
  assert len(ex) == E * 2 and ex.groupby("K").expert.nunique().tolist() == [E, E]
  assert len(mg) == 8 * 3 * 2 and len(mt) == 2 * len(mg)  # configs x groups x K, M = 2
  for col in ("eta", "b", "data_ratio", "n", "K", "test_loss", "gap", "config_hash", "study"):
    assert col in df.columns
  np.testing.assert_allclose(ex.gap, ex.test_loss - ex.train_loss, atol=1e-5)
  # a merged row is the mean of its member rows
  one = mg.iloc[0]
  members = mt[(mt.K == one.K) & (mt.config == one.config) & (mt.group == one.group)]
  assert one.test_loss == pytest.approx(members.test_loss.mean(), rel=1e-6)
  assert os.path.getsize(os.path.join(workdir, "merged_vs_K.png")) > 10_000
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["experts"] == E
  # the merged gap against the non-convex bound: one row per config x K, every axis compared
  th = summary["theory_merged_gap"]
  assert th["rows"] == 8 * 2 and set(th["axes"]) == {"eta", "b", "n", "K"}
  table = pd.read_csv(os.path.join(workdir, "theory_merged_gap.csv"))
  assert len(table) == 16 and (table.M == 2).all()
  assert th["holds"] == pytest.approx((table.bound >= table.measured).mean())


def test_groups_are_the_same_at_every_K_and_config(workdir):
  mg = results.load(workdir).query("kind == 'merged'")
  sig = mg.groupby(["K", "config"]).apply(lambda d: tuple(map(tuple, d.tasks)),
                                          include_groups=False)
  assert len(set(sig)) == 1


def test_rerun_skips_finished_units(workdir):
  before = len(results.load(workdir))
  assert runner.main(["experiments/main_tiny.py", "--workdir", workdir]) == 0
  assert len(results.load(workdir)) == before


@pytest.mark.parametrize("arg,msg", [
    ("--config.sweep.lr=0.1,-0.1", "sweep.lr"),
    ("--config.sweep.data_ratio=0.0", "sweep.data_ratio"),
    ("--config.sweep.batch_size=1000", "b: batch size must be <= n_i"),
    ("--config.sweep.milestones=20,10", "sweep.milestones"),
    ("--config.sweep.group_size=9", "sweep.group_size"),
    ("--config.data.tasks=tiny0,mnist", "task: unknown task"),
    ("--config.model.name=vit", "model.name"),
    ("--config.data.suite=imagenet", "data.suite"),
    ("--config.optim.name=lion", "optim.name"),
    ("--config.sweep.bogus=1", "unknown config key")])
def test_bad_input_fails_before_compute_with_one_line(tmp_path, capsys, arg, msg):
  assert msg in fails_before_compute(tmp_path, capsys, "main_tiny", arg)


def test_make_groups_draw_distinct_tasks_deterministically():
  g = sweep.make_groups(20, 6, 10)
  assert g.shape == (10, 6) and all(len(set(r)) == 6 for r in g)
  np.testing.assert_array_equal(g, sweep.make_groups(20, 6, 10))
  assert len(tasks.get_suite("default").tasks) >= 20


# ---------------------------------------------------------------------------------------------
# The stability study (originals + twins, merged-twin distances) through the same runner.

@pytest.fixture(scope="module")
def stability_dir(tmp_path_factory):
  return run_ok(tmp_path_factory, "stability_tiny")


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
  est = pd.read_csv(os.path.join(stability_dir, "stability_estimates.csv"))
  assert len(est) == 2 * 2 * 2 and (est["count"] == 4 * 2).all()  # eta x b x K; tasks x j
  assert (est.ci_lo <= est["mean"]).all() and (est["mean"] <= est.ci_hi).all()
  for f in ("stability_vs_hparams", "merged_stability_vs_M", "merged_vs_members"):
    assert os.path.getsize(os.path.join(stability_dir, f + ".png")) > 10_000


@pytest.mark.parametrize("arg,msg", [
    ("--config.stability.merges=fisher", "stability.merges: unknown or data-dependent"),
    ("--config.stability.group_sizes=2,9", "stability.group_sizes"),
    ("--config.stability.num_twins=500", "stability.num_twins"),
    ("--config.stability.num_twins=-1", "stability.num_twins"),
    ("--config.stability.figures=scatter", "stability.figures: unknown figure"),
    ("--config.stability.num_groups=0", "stability.num_groups")])
def test_stability_bad_input_fails_before_compute(tmp_path, capsys, arg, msg):
  assert msg in fails_before_compute(tmp_path, capsys, "stability_tiny", arg)


# ---------------------------------------------------------------------------------------------
# The merge comparison study: every algorithm on the same groups and K.

@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
  return run_ok(tmp_path_factory, "compare_merges_tiny")


def test_compare_study_runs_every_algorithm_on_the_same_groups(compare_dir):
  df = results.load(compare_dir)
  mc, dg = df[df.kind == "merge_compare"], df[df.kind == "diagnostics"]
  from experiments import compare_merges_tiny
  algos = set(compare_merges_tiny.get_config().compare.merges)
  assert set(mc.algorithm) == algos and len(algos) == 14 and "regmean" in algos
  G = 2 * 3  # configs x groups
  assert (mc.groupby(["K", "algorithm"]).size() == G).all() and len(dg) == G * 2
  sig = mc.groupby(["K", "algorithm"]).apply(lambda d: tuple(map(tuple, d.tasks)),
                                             include_groups=False)
  assert len(set(sig)) == 1  # identical groups for every algorithm and K
  by = mc.set_index(["K", "algorithm", "config", "group"])
  # uniform soup is the average; the ensemble has no parameters, hence no stability.
  np.testing.assert_allclose(by.xs("uniform_soup", level=1).test_acc,
                             by.xs("average", level=1).test_acc)
  assert by.xs("ensemble", level=1).merged_eps2.isna().all()
  ratio = mc.merged_eps2 / mc.member_eps2
  np.testing.assert_allclose(ratio[mc.algorithm == "average"], 1 / 4, rtol=1e-4)
  np.testing.assert_allclose(ratio[mc.algorithm == "task_arithmetic"], 0.09, rtol=1e-4)
  assert mc.test_acc.between(0, 1).all() and (dg.sign_conflict.between(0, 1)).all()
  s = json.load(open(os.path.join(compare_dir, "summary.json")))
  assert set(s["table_at_Kmax"]) == algos
  assert os.path.getsize(os.path.join(compare_dir, "merge_comparison.png")) > 10_000


def test_compare_bad_merge_name_fails_before_compute(tmp_path, capsys):
  err = fails_before_compute(tmp_path, capsys, "compare_merges_tiny",
                             "--config.compare.merges=average,bogus")
  assert "compare.merges: unknown merge 'bogus'" in err


def test_theory_comparison_study_estimates_constants_and_compares(tmp_path_factory):
  wd = run_ok(tmp_path_factory, "theory_compare_tiny")
  df = results.load(wd)
  const = df[df.kind == "constants"]
  E = 2 * 2 * 4  # eta x b x tasks (originals only)
  assert len(const) == E * 2 and (const.G_max > 0).all() and (const.L > 0).all()
  s = json.load(open(os.path.join(wd, "summary.json")))["theory"]
  for target in ("eps2", "gap"):
    t = pd.read_csv(os.path.join(wd, f"theory_{target}.csv"))
    assert len(t) == E * 2 and s[target]["rows"] == E * 2
    # G and L are the running maxima along each expert's trajectory.
    for _, sub in t.sort_values("K").groupby("expert"):
      assert sub.G.is_monotonic_increasing and sub.L.is_monotonic_increasing
    assert set(s[target]["axes"]) == {"eta", "b", "K"}
  assert os.path.getsize(os.path.join(wd, "bound_vs_measured.png")) > 10_000


def test_heterogeneous_figure_needs_the_average_merge():
  from stability import config as config_lib
  cfg = config_lib.load("experiments/stability_tiny.py", [
      "--config.stability.merges=ties",
      "--config.stability.figures=heterogeneous_vs_homogeneous"])
  with pytest.raises(ValueError, match="stability.figures: 'heterogeneous_vs_homogeneous' needs"):
    sweep.validate_stability(cfg, 4)
