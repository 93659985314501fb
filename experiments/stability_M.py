"""Stability of the merged model against the number of experts merged, M in {2,4,6,8,12,20}.

Question: replacing one training sample of task i moves only expert i, so a linear merge
x_0 + sum_i w_i tau_i has stability sum_i p_i w_i^2 eps_i^2: for the simple average (1/M^2) x
the mean member eps^2, for task arithmetic lam^2 x it. Does the measured merged stability fall
like 1/M^2, and what do TIES (data-dependent mask) and DARE (rescale 1/(1-p)) do instead?

  python -m experiments.run experiments/stability_M.py --workdir runs/stability_M
  python -m experiments.run experiments/stability_M.py:tiny --workdir runs/stability_M_tiny

Setup: eta = 0.01, b = 32, full data, seeds 0 and 1, 20 tasks of the default suite (the first
20) = 40 experts, each with 2 twins and a control (160 rows), K = 200 and 400. For each M and
config, 10 groups (seeds 0-9) are merged with average, task arithmetic (lam 0.3), TIES (k 0.2,
lam 1) and DARE+average (p 0.5, rescale), once per twin substitution. `tiny`: the synthetic
4-task suite, M in {2, 3, 4}, the same four merges (~30 s; the numbers mean little).

Runtime: about 2 min on a 2-core CPU.
Outputs: runs/stability_M/merged_stability_vs_M.png, summary.json (merged eps^2 and merged /
member ratio by merge and M, log-log slope against M). Results: README "Stability".
Notebook: notebooks/stability_M.ipynb.
"""
from experiments import common


def get_config(variant=None):
  c = common.base("stability")
  c.data.tasks = tuple(n for n in (
      "mnist", "mnist_rot90", "mnist_rot180", "mnist_rot270", "mnist_flip", "mnist_transpose",
      "mnist_invert", "mnist_perm_a", "mnist_perm_b", "mnist_quadrants", "mnist_shift",
      "mnist_even", "mnist_odd", "mnist_low_rot90", "mnist_parity", "mnist_ge5_invert",
      "mnist_mod3_flip", "mnist_remap", "digits", "digits_rot90"))
  c.sweep.lr = (0.01,)
  c.sweep.batch_size = (32,)
  c.sweep.data_ratio = (1.0,)
  c.sweep.seeds = (0, 1)
  c.sweep.milestones = (200, 400)
  c.stability = common.stability_section()
  c.stability.num_twins = 2
  c.stability.group_sizes = (2, 4, 6, 8, 12, 20)
  c.stability.merges = ("average", "task_arithmetic", "ties", "dare_average")
  c.stability.figures = ("merged_stability_vs_M",)
  if common.variant(variant) == "tiny":
    common.tiny(c)
    c.sweep.lr = (0.1,)
    c.sweep.batch_size = (4,)
    c.sweep.data_ratio = (1.0,)
    c.stability.group_sizes = (2, 3, 4)
    c.stability.num_groups = 3
  return c
