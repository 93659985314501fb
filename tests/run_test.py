"""The runner as users launch it (subprocesses): kill -9 and resume, two processes, dry run, and
one-line errors for bad input before any compute."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from experiments import run as runner
from stability import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# main.py:tiny with 4 milestones, 8 chunks of 5 steps, a checkpoint every chunk, and 2 waves.
SMALL = ["--config.sweep.milestones=10,20,30,40", "--config.train.max_chunk=5",
         "--config.train.checkpoint_every=5", "--config.train.max_wave=16",
         "--config.output.figures=false"]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
  env.pop("PYTEST_CURRENT_TEST", None)
  return env


def _start(workdir, *extra, devices: int = 1, study: str = "main.py:tiny") -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"experiments/{study}", "--workdir",
       str(workdir), *SMALL, *extra], cwd=ROOT, env=_env(devices), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]


def _table(workdir) -> pd.DataFrame:
  return results.load(str(workdir))


def _assert_same_table(got: pd.DataFrame, want: pd.DataFrame, rtol: float = 0.0,
                       atol: float = 0.0) -> None:
  """Row for row: same columns, same order, numbers equal (to rtol), the rest identical."""
  assert list(got.columns) == list(want.columns)
  assert len(got) == len(want)
  for col in want.columns:
    a, b = got[col].to_numpy(), want[col].to_numpy()
    if np.issubdtype(b.dtype, np.number):
      np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=rtol, atol=atol,
                                 equal_nan=True, err_msg=col)
    else:
      assert [repr(x) for x in a] == [repr(x) for x in b], col


def _lines(path: str) -> int:
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = tmp_path_factory.mktemp("uninterrupted")
  _finish(_start(wd))
  return wd


@pytest.mark.slow
def test_kill_9_at_10_random_points_then_resume_equals_uninterrupted(reference, tmp_path):
  """SIGKILL during startup, training, checkpoint saves and result writes; every rerun resumes
  from the stored units and the latest checkpoint; the final table equals an uninterrupted
  run's row for row (bit for bit: resumed training is exact)."""
  rng = np.random.default_rng(0)
  wd = tmp_path / "killed"
  log = str(wd / "metrics.jsonl")
  kinds = []
  for _ in range(10):
    before = _lines(log)
    target = before + int(rng.integers(0, 4))  # kill after 0-3 more chunks (0: in startup)
    proc = _start(wd)
    while proc.poll() is None and _lines(log) < target:
      time.sleep(0.01)
    time.sleep(float(rng.uniform(0, 0.3)))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kinds.append("killed")
    else:
      kinds.append("finished")
    proc.wait()
    if os.path.exists(wd / results.DB):
      _table(wd)  # every intermediate store loads: no torn rows
  assert kinds.count("killed") >= 5, kinds
  _finish(_start(wd))
  _assert_same_table(_table(wd), _table(reference))
  assert not os.path.exists(wd / "checkpoints")  # finished waves drop their checkpoints


@pytest.mark.slow
def test_two_processes_write_the_same_table_as_one(reference, tmp_path):
  """jax.distributed over 2 local CPU processes x 2 devices; only process 0 writes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  wd = tmp_path / "two"
  procs = [_start(wd, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                  "--process-id", str(i), devices=2) for i in range(2)]
  for p in procs:
    _finish(p)
  _assert_same_table(_table(wd), _table(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eight_devices_write_the_same_table_as_one(reference, tmp_path):
  wd = tmp_path / "eight"
  _finish(_start(wd, devices=8))
  _assert_same_table(_table(wd), _table(reference), rtol=1e-5, atol=1e-6)


def test_dry_run_prints_the_plan_and_computes_nothing(tmp_path, capsys):
  wd = tmp_path / "dry"
  assert runner.main(["experiments/main.py:tiny", "--workdir", str(wd), "--dry-run", *SMALL]) == 0
  out = capsys.readouterr().out
  for line in ("experts       32 (8 configs x 4)", "waves         2 of 16 experts",
               "snapshots     K = 10, 20, 30, 40", "merge groups  24"):
    assert line in out, out
  assert not wd.exists()


def test_dry_run_of_the_full_protocol_on_cpu_says_which_data_is_missing(capsys, tmp_path):
  root = tmp_path / "data"
  assert runner.main(["experiments/paper_protocol.py", "--workdir", str(tmp_path / "p"),
                      "--dry-run", f"--config.data.options.data_root={root}"]) == 0
  out = capsys.readouterr().out
  for line in ("experts       540 (27 configs x 20)", "K = 1000, 2000, 3000, 4000",
               "merge groups  270", "NOT READY", "20 of 20 datasets missing",
               f"missing sun397: looked at {root}/sun397/train/<class>/"):
    assert line in out, out
  assert not (tmp_path / "p").exists()


# --- bad input: one line naming the field, exit 2, nothing written --------------------------

BAD = [
    # learning rates
    ("main.py:tiny", "--config.sweep.lr=0.1,-0.1", "sweep.lr"),
    ("main.py:tiny", "--config.sweep.lr=0.0", "sweep.lr"),
    ("main.py:tiny", "--config.sweep.lr=nan", "sweep.lr"),
    ("main.py:tiny", "--config.sweep.lr=", "sweep.lr"),
    # batch sizes
    ("main.py:tiny", "--config.sweep.batch_size=1000", "b: batch size must be <= n_i"),
    ("main.py:tiny", "--config.sweep.batch_size=0", "sweep.batch_size"),
    ("main.py:tiny", "--config.sweep.batch_size=abc", "config.sweep.batch_size: cannot parse"),
    # data ratios
    ("main.py:tiny", "--config.sweep.data_ratio=0.0", "sweep.data_ratio"),
    ("main.py:tiny", "--config.sweep.data_ratio=1.5", "sweep.data_ratio"),
    ("main.py:tiny", "--config.sweep.data_ratio=-0.2", "sweep.data_ratio"),
    # milestones
    ("main.py:tiny", "--config.sweep.milestones=20,10", "sweep.milestones"),
    ("main.py:tiny", "--config.sweep.milestones=10,10", "sweep.milestones"),
    ("main.py:tiny", "--config.sweep.milestones=0,10", "sweep.milestones"),
    ("main.py:tiny", "--config.sweep.milestones=", "sweep.milestones"),
    # groups
    ("main.py:tiny", "--config.sweep.group_size=9", "sweep.group_size"),
    ("main.py:tiny", "--config.sweep.group_size=0", "sweep.group_size"),
    ("main.py:tiny", "--config.sweep.num_groups=0", "sweep.num_groups"),
    ("stability_hparams.py:tiny", "--config.stability.group_sizes=2,7", "stability.group_sizes"),
    # names
    ("main.py:tiny", "--config.data.tasks=tiny0,mnist", "task: unknown task"),
    ("main.py:tiny", "--config.model.name=vgg", "model.name"),
    ("main.py:tiny", "--config.data.suite=imagenet", "data.suite"),
    ("main.py:tiny", "--config.optim.name=lion", "optim.name"),
    ("main.py:tiny", "--config.pretrain.optimizer=lion", "pretrain.optimizer"),
    ("main.py:tiny", "--config.study=finetune", "study"),
    ("stability_hparams.py:tiny", "--config.stability.merges=average,soup", "stability.merges"),
    ("compare_merges.py:tiny", "--config.compare.merges=average,bogus", "compare.merges"),
    ("stability_hparams.py:tiny", "--config.stability.figures=pie", "stability.figures"),
    # keys
    ("main.py:tiny", "--config.sweep.bogus=1", "unknown config key"),
    ("main.py:tiny", "--config.bogus.lr=1", "unknown config key"),
    ("main.py:tiny", "--sweep.lr=0.1", "unknown argument"),
    # seeds and budgets
    ("main.py:tiny", "--config.sweep.seeds=", "sweep.seeds"),
    ("main.py:tiny", "--config.train.checkpoint_every=-5", "train.checkpoint_every"),
    ("main.py:tiny", "--config.train.max_wave=3", "train.max_wave"),
    ("main.py:tiny", "--config.train.memory_gb=0.000001", "train.memory_gb"),
    ("stability_hparams.py:tiny", "--config.stability.num_groups=0", "stability.num_groups"),
]


@pytest.mark.parametrize("config,arg,msg", BAD, ids=[a for _, a, _ in BAD])
def test_bad_input_fails_before_compute_with_one_line(tmp_path, capsys, config, arg, msg):
  wd = tmp_path / "w"
  try:
    code = runner.main([f"experiments/{config}", "--workdir", str(wd), arg])
  except SystemExit as e:  # argparse errors (unknown flags) exit 2 with usage + one error line
    code = e.code
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert msg in err[-1], err
  assert not wd.exists()


def test_workdir_of_another_study_or_config_is_refused_before_compute(tmp_path, capsys):
  wd = tmp_path / "w"
  wd.mkdir()
  results.write_config(str(wd), {"study": "compare", "seed": 0})
  assert runner.main(["experiments/main.py:tiny", "--workdir", str(wd)]) == 2
  assert "holds a 'compare' study" in capsys.readouterr().err
  from stability import config as config_lib
  cfg = config_lib.to_dict(config_lib.load("experiments/main.py:tiny"))
  results.write_config(str(wd), cfg)
  assert runner.main(["experiments/main.py:tiny", "--workdir", str(wd),
                      "--config.sweep.lr=0.3"]) == 2
  assert "first difference: config.sweep.lr" in capsys.readouterr().err
  assert sorted(os.listdir(wd)) == ["config.json"]


def test_unwritable_workdir_is_refused_before_compute(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert runner.main(["experiments/main.py:tiny", "--workdir", str(blocker / "w")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: workdir:") and "is not a directory" in err
