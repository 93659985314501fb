"""Stability study, tiny: the same pipeline on the synthetic `tiny` suite, for tests/notebooks.

  python -m experiments.run experiments/stability_tiny.py --workdir runs/stability_tiny

Runtime: ~20 s on a 2-core CPU. 2 eta x 2 b x 4 tasks = 16 experts with 2 twins and a control
each, K = 10, 20, groups of 2 and 4 tasks merged by average, TIES and DARE; all three figures.
The numbers mean little.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import main_tiny  # noqa: E402
import stability_hparams  # noqa: E402


def get_config():
  c = main_tiny.get_config()
  c.study = "stability"
  c.sweep.data_ratio = (1.0,)
  c.stability = stability_hparams.stability_section()
  c.stability.num_twins = 2
  c.stability.group_sizes = (2, 4)
  c.stability.num_groups = 3
  c.stability.merges = ("average", "ties", "dare_average")
  c.stability.figures = ("stability_vs_hparams", "merged_stability_vs_M", "merged_vs_members")
  return c
