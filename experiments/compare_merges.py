"""Every merging algorithm on the same experts, groups and K snapshots (merging issue, item 6).

Question: the paper says averaging and task arithmetic scale the stability term, AdaMerging
learns the weights, and TIES/DARE sparsify to suppress heterogeneity. On identical inputs, how
do the algorithms compare in merged test accuracy, generalization gap and measured merged-model
stability (from coupled twins), and what do the task-vector diagnostics look like?

  python -m experiments.run experiments/compare_merges.py --workdir runs/compare_merges

Setup: eta = 0.01, b = 32, full data, 20 tasks (as stability_M.py), seed 0: 20 experts, each with
2 twins and a control (80 rows), K = 200 and 400. 10 groups of M = 6 tasks (seeds 0-9) merged by
average, task arithmetic (lam 0.3), TIES (k 0.2, lam 1), DARE + average / task arithmetic /
TIES (p 0.5), uniform soup, Model Stock, Fisher and RegMean (128 training samples per expert),
AdaMerging task-wise and layer-wise (test inputs unlabeled, `compare.
adamerging_steps` Adam steps), greedy soup (held out: the task's ghost pool) and the logit
ensemble (reference). Each merged backbone is evaluated with every member's own head; merged
stability merges the twin stack (only one member differs) with the same algorithm and RNG.

Outputs: runs/compare_merges/merge_comparison.png, compare_table.csv (algorithm x K means),
algorithms_vs_bound_terms.png, summary.json (table at K = 400, diagnostics). Results: README
"Merging algorithms compared". Notebook: notebooks/compare_merges.ipynb.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import stability_M  # noqa: E402


def get_config():
  c = stability_M.get_config()
  c.study = "compare"
  c.sweep.seeds = (0,)
  c.sweep.group_size = 6
  c.sweep.num_groups = 10
  c.stability.group_sizes = ()
  c.stability.merges = ()
  c.stability.figures = ()
  c.compare = ml_collections.ConfigDict(dict(
      merges=("average", "task_arithmetic", "ties", "dare_average", "dare_task_arithmetic",
              "dare_ties", "uniform_soup", "model_stock", "fisher", "regmean", "adamerging_task",
              "adamerging_layer", "greedy_soup", "ensemble"),
      samples=128,              # labelled samples per expert for Fisher / RegMean
      adamerging_steps=100,     # Adam steps per group (FusionBench default 500; 100 on CPU)
  ))
  return c
