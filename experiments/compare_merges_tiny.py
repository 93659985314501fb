"""Merge comparison, tiny: every algorithm on the synthetic `tiny` suite, for tests/notebooks.

  python -m experiments.run experiments/compare_merges_tiny.py --workdir runs/compare_tiny

Runtime: ~40 s on a 2-core CPU; 4 tasks, 2 experts configs, groups of 2. Numbers mean little.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import compare_merges  # noqa: E402
import main_tiny  # noqa: E402


def get_config():
  c = main_tiny.get_config()
  full = compare_merges.get_config()
  c.study = "compare"
  c.sweep.lr = (0.1,)
  c.sweep.batch_size = (4, 8)
  c.sweep.data_ratio = (1.0,)
  c.stability = full.stability
  c.stability.num_twins = 1
  c.compare = full.compare
  c.compare.samples = 16
  c.compare.adamerging_steps = 5
  return c
