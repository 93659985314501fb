"""Stability of experts against eta, b, K and the data ratio (issue: L2 stability with twins).

Question: how does the L2 on-average model stability eps^2 = E_j ||x_K - x_K^(j)||^2 of one
fine-tuned expert move with its learning rate, batch size, step count and training-set size?
The paper's per-expert SGD bound predicts growth with eta and K and decay with b and n
(arXiv 2601.21690, "Theory"; docs/theory.md).

  python -m experiments.run experiments/stability_hparams.py --workdir runs/stability_hparams
  python -m experiments.run experiments/stability_hparams.py:tiny --workdir runs/stability_tiny

Grid: 3 eta x 3 b x 3 data ratios x 4 tasks (mnist, mnist_rot90, mnist_perm_a, digits) = 108
experts, each with 4 twins (one training sample j swapped for a ghost-pool sample; j uniform,
shared across eta/b by common random numbers) and one control twin (no swap): 648 rows trained as
one stack, snapshots at K = 50, 100, 200, 400; SGD momentum 0.9, wd 1e-4, as the main job.
Estimates pool tasks and the 4 sampled j (16 samples per cell), with 95% t-intervals.
`tiny`: the synthetic 4-task suite, 2 eta x 2 b, 2 twins and a control, K = 10, 20, and merged
stability for groups of 2 and 4 (average, TIES, DARE) so that every stability figure is drawn
(~20 s; the numbers mean little).

Runtime: about 3 min on a 2-core CPU (pretraining cached).
Outputs: runs/stability_hparams/stability_vs_hparams.png, stability_estimates.csv (one row per
eta x b x ratio x K), summary.json (tables by eta/b/ratio and K, fitted log-log exponents).
Results: README "Stability". Notebook: notebooks/stability_hparams.ipynb.
"""
from experiments import common


def get_config(variant=None):
  c = common.base("stability")
  c.data.tasks = ("mnist", "mnist_rot90", "mnist_perm_a", "digits")
  c.sweep.lr = (0.05, 0.01, 0.002)
  c.sweep.batch_size = (16, 32, 64)
  c.sweep.data_ratio = (0.25, 0.5, 1.0)
  c.sweep.milestones = (50, 100, 200, 400)
  c.stability = common.stability_section()
  if common.variant(variant) == "tiny":
    common.tiny(c)
    c.sweep.data_ratio = (1.0,)
    c.stability.num_twins = 2
    c.stability.group_sizes = (2, 4)
    c.stability.num_groups = 3
    c.stability.merges = ("average", "ties", "dare_average")
    c.stability.figures = ("stability_vs_hparams", "merged_stability_vs_M", "merged_vs_members")
  return c
