"""Shared fixtures of the study tests: each tiny study runs once per session, through the runner.

`tiny_run("main.py:tiny")` -> its workdir (figures on), shared by the study tests and the pinned
results test; `fails_before_compute(config, arg)` runs with a bad override and returns the one
error line after checking that nothing was written.
"""
import pytest

from experiments import run as runner
from stability import results


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  done = {}

  def get(config: str) -> str:
    if config not in done:
      wd = str(tmp_path_factory.mktemp(config.replace(".py:", "_").replace(".", "_")))
      assert runner.main([f"experiments/{config}", "--workdir", wd]) == 0
      done[config] = wd
    return done[config]
  return get


@pytest.fixture
def fails_before_compute(tmp_path, capsys):
  def run(config: str, *args: str) -> str:
    wd = tmp_path / "w"
    assert runner.main([f"experiments/{config}", "--workdir", str(wd), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert not (wd / results.DB).exists() and not wd.exists()
    return err
  return run
