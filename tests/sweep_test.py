"""End to end through the runner on the tiny suite: tables, figure, rerun skip, bad input."""
import json
import os

import numpy as np
import pytest

from experiments import run as runner
from stability import results, sweep, tasks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("main_tiny"))
  assert runner.main(["experiments/main_tiny.py", "--workdir", wd]) == 0
  return wd


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
  assert json.load(open(os.path.join(workdir, "summary.json")))["experts"] == E


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
  wd = tmp_path / "w"
  assert runner.main(["experiments/main_tiny.py", "--workdir", str(wd), arg]) == 2
  err = capsys.readouterr().err.strip()
  assert msg in err and len(err.splitlines()) == 1
  assert not (wd / results.DB).exists() or results.load(str(wd)).empty


def test_make_groups_draw_distinct_tasks_deterministically():
  g = sweep.make_groups(20, 6, 10)
  assert g.shape == (10, 6) and all(len(set(r)) == 6 for r in g)
  np.testing.assert_array_equal(g, sweep.make_groups(20, 6, 10))
  assert len(tasks.get_suite("default").tasks) >= 20
