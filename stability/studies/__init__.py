"""Studies: one module per study, one registry, one driver.

Every study module implements the same small interface:

  validate(cfg)            every check that needs no compute; raises a one-line ValueError
                           naming the field (the real run and `--dry-run` call the same one)
  layout(cfg, C, T)        (expert rows per config, merge groups in all): what the planner sizes
  plan(cfg) -> str         validate, then the wave plan (what `--dry-run` prints)
  run(cfg, workdir)        train through `driver.sweep_waves`, store rows, then summarize
  summarize(cfg, workdir)  tables, figures and summary.json from the stored rows alone

  main        experts on a grid, merged by averaging at every K        (studies/main.py)
  stability   coupled twins: expert and merged-model L2 stability      (studies/stability.py)
  compare     every merge algorithm on the same experts and groups     (studies/compare.py)
  hetero      merge groups whose members' hyperparameters differ       (studies/hetero.py)

Shared pieces: `common` (suite, grid, groups, base model, expert rows, shared checks), `driver`
(waves, checkpoints, the store, progress) and `theory` (constants along the run and the
measured-vs-bound tables that main and stability summaries use).

To add a study: write `studies/<name>.py` with the five functions, add it to `STUDIES` below,
and give it a config in `experiments/` whose `study` field is `<name>` (docs/architecture.md).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import ml_collections

from stability import config as config_lib
from stability import results as results_lib
from stability.studies import compare
from stability.studies import hetero
from stability.studies import main
from stability.studies import stability

STUDIES: dict[str, ModuleType] = {"main": main, "stability": stability, "compare": compare,
                                  "hetero": hetero}


def get(name: str) -> ModuleType:
  """The study module registered under `name`."""
  if name not in STUDIES:
    raise ValueError(f"study: unknown study {name!r}; allowed: {', '.join(STUDIES)}")
  return STUDIES[name]


def validate(cfg: ml_collections.ConfigDict) -> None:
  """The configured study's checks (no compute, nothing written)."""
  get(cfg.study).validate(cfg)


def plan(cfg: ml_collections.ConfigDict) -> str:
  """What `--dry-run` prints: the same validation as a real run, then the wave plan."""
  return get(cfg.study).plan(cfg)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates the config and the workdir before anything is written, then runs the study."""
  study = get(cfg.study)
  study.validate(cfg)
  results_lib.check_workdir(workdir, config_lib.to_dict(cfg))
  return study.run(cfg, workdir)
