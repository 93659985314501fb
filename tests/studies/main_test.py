"""stability.studies.main through the runner on the tiny suite: tables, figures, rerun, bad input."""
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from experiments import run as runner
from stability import data, results
from stability.studies import common
from theory import bounds

CONFIG = "main.py:tiny"


@pytest.fixture(scope="module")
def workdir(tiny_run):
  return tiny_run(CONFIG)


def test_main_job_writes_tidy_tables_and_figure(workdir):
  df = results.load(workdir)
  E = 2 * 2 * 2 * 4  # eta x b x ratio x tasks
  ex, mt, mg = (df[df.kind == k] for k in ("expert", "merged_task", "merged"))
  assert len(ex) == E * 2 and ex.groupby("K").expert.nunique().tolist() == [E, E]
  assert len(mg) == 8 * 3 * 2 and len(mt) == 2 * len(mg)  # configs x groups x K, M = 2
  for col in ("eta", "b", "data_ratio", "n", "K", "test_loss", "gap", "config_hash", "study"):
    assert col in df.columns
  # Each expert trains on floor(ratio * n_train) samples of its own task (rejects n taken from
  # another task, or the ratio applied twice or not at all).
  suite = data.get_suite("tiny", 0)
  n_train = {t.name: len(t.y_train) for t in suite.tasks}
  want = [math.floor(r * n_train[t] + 1e-9) for r, t in zip(ex.data_ratio, ex.task)]
  assert ex.n.tolist() == want and ex.n.nunique() > 1
  # a merged row is the mean of its member rows
  one = mg.iloc[0]
  members = mt[(mt.K == one.K) & (mt.config == one.config) & (mt.group == one.group)]
  assert one.test_loss == pytest.approx(members.test_loss.mean(), rel=1e-6)
  assert os.path.getsize(os.path.join(workdir, "merged_vs_K.png")) > 10_000


def test_merged_gap_is_compared_with_the_bound_of_its_own_row(workdir):
  """The theory table is wired to the right row: eta / (1 - momentum), the M^2 of the average,
  the row's own b, n, K and train loss, and the config's G and L. Rejects a dropped momentum
  substitution, a missing 1/M^2, or a bound joined to another config's row."""
  df = results.load(workdir)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  th = summary["theory_merged_gap"]
  assert th["rows"] == 8 * 2 and set(th["axes"]) == {"eta", "b", "n", "K"}
  table = pd.read_csv(os.path.join(workdir, "theory_merged_gap.csv"))
  assert len(table) == 16 and (table.M == 2).all()
  mg = df[df.kind == "merged"]
  ex = df[df.kind == "expert"]
  for _, r in table.iterrows():
    raw_eta = r.eta * (1 - 0.9)
    sel = mg[np.isclose(mg.eta, raw_eta) & (mg.b == r.b) & (mg.data_ratio == r.data_ratio)
             & (mg.K == r.K)]
    assert len(sel) == 3  # the config's groups
    assert r.gap == pytest.approx(sel.gap.mean(), rel=1e-12)
    n = ex[np.isclose(ex.eta, raw_eta) & (ex.b == r.b) & (ex.data_ratio == r.data_ratio)
           & (ex.K == r.K)].n.mean()
    eps2 = bounds.eps2_nonconvex(r.eta, r.b, r.K, n, 26.2, 10.8) / 2 ** 2
    assert r.bound == pytest.approx(float(bounds.gen_gap_best(eps2, sel.train_loss.mean(), 10.8)),
                                    rel=1e-9)


def test_groups_are_the_same_at_every_K_and_config(workdir):
  mg = results.load(workdir).query("kind == 'merged'")
  sig = mg.groupby(["K", "config"]).apply(lambda d: tuple(map(tuple, d.tasks)),
                                          include_groups=False)
  assert len(set(sig)) == 1


def test_rerun_skips_finished_units(workdir, tmp_path):
  copy = str(tmp_path / "copy")  # the shared workdir stays as its run left it
  shutil.copytree(workdir, copy)
  before = results.load(copy)
  assert runner.main([f"experiments/{CONFIG}", "--workdir", copy]) == 0
  pd.testing.assert_frame_equal(results.load(copy), before)


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
    ("--config.train.memory_gb=nan", "train.memory_gb"),
    ("--config.sweep.bogus=1", "unknown config key")])
def test_bad_input_fails_before_compute_with_one_line(fails_before_compute, arg, msg):
  assert msg in fails_before_compute(CONFIG, arg)


def test_make_groups_draw_distinct_tasks_deterministically():
  g = common.make_groups(20, 6, 10)
  assert g.shape == (10, 6) and all(len(set(r)) == 6 for r in g)
  np.testing.assert_array_equal(g, common.make_groups(20, 6, 10))
  # group g is drawn with seed g alone: the first groups do not depend on how many there are
  np.testing.assert_array_equal(g[:3], common.make_groups(20, 6, 3))
  assert len({tuple(r) for r in g}) > 1
