"""stability.studies: the registry, the interface, and one validation for --dry-run and the run."""
import glob
import os

import pytest

from experiments import run as runner
from stability import config as config_lib
from stability import studies

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "run.py", "common.py"))


def test_every_study_implements_the_interface():
  for name, module in studies.STUDIES.items():
    for fn in ("validate", "layout", "plan", "run", "summarize"):
      assert callable(getattr(module, fn, None)), f"{name}.{fn}"
  with pytest.raises(ValueError, match="study: unknown study 'finetune'; allowed: main, "):
    studies.get("finetune")


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_and_its_tiny_variant_plans(config, capsys):
  """Each study config (and `:tiny` where it has one) names a registered study and passes the
  same validation as a real run; the dry run prints its plan and writes nothing."""
  variants = [config] + ([f"{config}:tiny"] if config != "paper_protocol.py" else [])
  for spec in variants:
    cfg = config_lib.load(f"experiments/{spec}")
    assert cfg.study in studies.STUDIES
    assert runner.main([f"experiments/{spec}", "--workdir", "/nonexistent/w", "--dry-run"]) == 0
    assert f"study         {cfg.study}" in capsys.readouterr().out


@pytest.mark.parametrize("config,args,msg", [
    ("stability_hparams.py:tiny", ["--config.stability.merges=fisher"], "stability.merges"),
    ("stability_hparams.py:tiny", ["--config.stability.num_twins=0",
                                   "--config.stability.control=false"], "stability.num_twins"),
    ("compare_merges.py:tiny", ["--config.compare.samples=0"], "compare.samples"),
    ("compare_merges.py:tiny", ["--config.compare.adamerging_steps=-1"],
     "compare.adamerging_steps"),
    ("main.py:tiny", ["--config.sweep.group_size=9"], "sweep.group_size"),
    ("main.py:tiny", ["--config.train.memory_gb=nan"], "train.memory_gb")])
def test_dry_run_rejects_what_the_real_run_rejects(config, args, msg, capsys):
  """The dry run once accepted `stability.merges=fisher`, which the run refused after writing
  its store: both now call the study's one `validate`."""
  assert runner.main([f"experiments/{config}", "--workdir", "/nonexistent/w", "--dry-run",
                      *args]) == 2
  assert msg in capsys.readouterr().err


def test_unknown_variant_is_an_error_naming_the_allowed_ones(capsys):
  assert runner.main(["experiments/main.py:huge", "--workdir", "/nonexistent/w"]) == 2
  assert "config: unknown variant 'huge'; allowed: tiny" in capsys.readouterr().err
