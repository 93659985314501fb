"""The merged model's stability against the mean stability of its members (the 1/M^2 factor).

Question: across experts whose own stability spans orders of magnitude (eta 0.05 / 0.01 / 0.002,
b 16 / 64, K 100-400), does a group's merged stability equal (1/M^2) x its members' mean for the
simple average (lam^2 for task arithmetic), and how far do TIES and DARE stray from that line?

  python -m experiments.run experiments/stability_members.py --workdir runs/stability_members
  python -m experiments.run experiments/stability_members.py:tiny --workdir runs/members_tiny

Setup: 3 eta x 2 b x full data x 8 tasks = 48 experts with 2 twins and a control each (192 rows),
K = 100, 200, 400; groups of M = 4 tasks (10 groups per config), merged with average, task
arithmetic, TIES and DARE+average for every twin substitution. `tiny`: the synthetic 4-task
suite, 2 eta x 2 b, groups of 2 (~30 s; the numbers mean little).

Runtime: about 1 min on a 2-core CPU.
Outputs: runs/stability_members/merged_vs_members.png (one point per group x config x K),
summary.json (merged / member ratio by merge). Results: README "Stability".
Notebook: notebooks/stability_members.ipynb.
"""
from experiments import common


def get_config(variant=None):
  c = common.base("stability")
  c.data.tasks = ("mnist", "mnist_rot90", "mnist_flip", "mnist_invert", "mnist_perm_a",
                  "mnist_even", "digits", "digits_rot90")
  c.sweep.lr = (0.05, 0.01, 0.002)
  c.sweep.batch_size = (16, 64)
  c.sweep.data_ratio = (1.0,)
  c.sweep.milestones = (100, 200, 400)
  c.stability = common.stability_section()
  c.stability.num_twins = 2
  c.stability.group_sizes = (4,)
  c.stability.merges = ("average", "task_arithmetic", "ties", "dare_average")
  c.stability.figures = ("merged_vs_members",)
  if common.variant(variant) == "tiny":
    common.tiny(c)
    c.sweep.data_ratio = (1.0,)
    c.stability.group_sizes = (2,)
    c.stability.num_groups = 3
  return c
