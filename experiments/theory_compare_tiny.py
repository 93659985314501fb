"""Theory comparison, tiny: the theory_compare pipeline on the synthetic `tiny` suite (tests).

  python -m experiments.run experiments/theory_compare_tiny.py --workdir runs/theory_tiny

Runtime: ~20 s on a 2-core CPU. The numbers mean little.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import stability_tiny  # noqa: E402


def get_config():
  c = stability_tiny.get_config()
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  c.stability.control = False
  c.stability.group_sizes = ()
  c.stability.merges = ()
  c.stability.figures = ("stability_vs_hparams",)
  c.stability.constants = True
  c.stability.constants_samples = 32
  return c
