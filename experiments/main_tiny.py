"""Main job, tiny: the same pipeline on the synthetic `tiny` suite, for tests and notebooks.

  python -m experiments.run experiments/main_tiny.py --workdir runs/main_tiny

Runtime: ~20 s on a 2-core CPU. Expect the same tables and figure as experiments/main.py with
4 tasks, 2 eta x 2 b x 2 ratios, groups of 2 tasks; the numbers mean little.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import main  # noqa: E402


def get_config():
  c = main.get_config()
  c.data.suite = "tiny"
  c.model.kwargs.widths = (16,)
  c.pretrain.steps = 40
  c.pretrain.batch_size = 16
  c.sweep.lr = (0.1, 0.02)
  c.sweep.batch_size = (4, 8)
  c.sweep.data_ratio = (0.5, 1.0)
  c.sweep.milestones = (10, 20)
  c.sweep.num_groups = 3
  c.sweep.group_size = 2
  c.train.max_chunk = 10
  c.train.checkpoint_every = 10
  c.output.cache_dir = ""
  c.output.progress = False
  return c
