"""Every merging algorithm on the same experts, groups and K snapshots.

Question: the paper says averaging and task arithmetic scale the stability term, AdaMerging
learns the weights, and TIES/DARE sparsify to suppress heterogeneity. On identical inputs, how
do the algorithms compare in merged test accuracy, generalization gap and measured merged-model
stability (from coupled twins), and what do the task-vector diagnostics look like?

  python -m experiments.run experiments/compare_merges.py --workdir runs/compare_merges
  python -m experiments.run experiments/compare_merges.py:tiny --workdir runs/compare_tiny

Setup: eta = 0.01, b = 32, full data, 20 tasks (as stability_M.py), seed 0: 20 experts, each with
2 twins and a control (80 rows), K = 200 and 400. 10 groups of M = 6 tasks (seeds 0-9) merged by
average, task arithmetic (lam 0.3), TIES (k 0.2, lam 1), DARE + average / task arithmetic /
TIES (p 0.5), uniform soup, Model Stock, Fisher and RegMean (128 training samples per expert),
AdaMerging task-wise and layer-wise (test inputs unlabeled, `compare.adamerging_steps` Adam
steps), greedy soup (held out: the task's ghost pool) and the logit ensemble (reference). Each
merged backbone is evaluated with every member's own head; merged stability merges the twin
stack (only one member differs) with the same algorithm and RNG. `tiny`: the synthetic 4-task
suite, eta 0.1, b 4 and 8, 1 twin, 16 samples, 5 AdaMerging steps (~40 s; numbers mean little).

Runtime: about 2.5 min on a 2-core CPU.
Outputs: runs/compare_merges/merge_comparison.png, compare_table.csv (algorithm x K means),
algorithms_vs_bound_terms.png, summary.json (table at K = 400, diagnostics). Results: README
"Merging algorithms compared". Notebook: notebooks/compare_merges.ipynb.
"""
from experiments import common
from experiments import stability_M


def get_config(variant=None):
  c = stability_M.get_config()
  c.study = "compare"
  c.sweep.seeds = (0,)
  c.sweep.group_size = 6
  c.sweep.num_groups = 10
  c.stability.group_sizes = ()
  c.stability.merges = ()
  c.stability.figures = ()
  c.compare = common.compare_section()
  if common.variant(variant) == "tiny":
    common.tiny(c)
    c.sweep.lr = (0.1,)
    c.sweep.data_ratio = (1.0,)
    c.stability.num_twins = 1
    c.compare.samples = 16
    c.compare.adamerging_steps = 5
  return c
