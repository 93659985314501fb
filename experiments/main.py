"""Main job: a scaled-down version of the paper's protocol on the default offline suite.

Question: how do eta, b, the data ratio and the step count K of fine-tuned experts move the
generalization of their simple-average merge? (arXiv 2601.21690, protocol section.)

  make demo        # == python -m experiments.run experiments/main.py --workdir runs/main
  python -m experiments.run experiments/main.py:tiny --workdir runs/main_tiny   # ~20 s

Grid: 3 eta x 3 b x 3 data ratios x 22 tasks = 594 experts (MLP 196-128-128 backbone, per-task
heads), SGD momentum 0.9, weight decay 1e-4, constant eta, snapshots at K = 100, 200, 300, 400;
10 random groups of 6 tasks (group seeds 0-9, the same at every K and config) merged by simple
averaging of backbones, each task keeping its own head. `tiny`: the same pipeline on the
synthetic 4-task suite (2 eta x 2 b x 2 ratios, groups of 2); its numbers mean little.

Runtime: 3-4 min on a 2-core CPU (pretraining is cached after the first run).
Outputs: runs/main/summary.json, results.sqlite, merged_vs_K.png, gap_vs_hparams.png,
theory_merged_gap.csv. Results: README "What the main job does". Notebook: notebooks/main.ipynb.
"""
from experiments import common


def get_config(variant=None):
  c = common.base("main")
  if common.variant(variant) == "tiny":
    common.tiny(c)
  return c
