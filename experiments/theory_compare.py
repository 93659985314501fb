"""The theory against the measurements: non-convex stability and generalization bounds with
constants estimated along each expert's trajectory, against measured eps^2 and gaps (theory
issue, item 6).

Question: with L (top Hessian eigenvalue, power iteration on Hessian-vector products) and G
(largest per-sample gradient norm) estimated from data at every snapshot, how loose are the
non-convex bounds of `theory.bounds`, and do they rank the experts the way the measurements do
along eta, b, K and n (Spearman), with the right fitted exponents?

  python -m experiments.run experiments/theory_compare.py --workdir runs/theory_compare

Setup: the stability_hparams grid (3 eta x 3 b x 3 ratios x 4 tasks = 108 experts) with plain
SGD (momentum 0, weight decay 0: the bounds' algorithm), 2 twins each, K = 50, 100, 200, 400;
G and L per expert and K on 256 samples of its training subset; the bound uses the largest G
and L seen along the trajectory up to K.

Outputs: runs/theory_compare/bound_vs_measured.png, theory_eps2.csv and theory_gap.csv (one row
per expert x K: bound, measured, ratio, holds), summary.json["theory"] (holds, ratio quantiles,
Spearman per axis, fitted vs predicted exponents), exponents_vs_predicted.png. Results: README
"Theory against measurement". Notebook: notebooks/theory_compare.ipynb.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import stability_hparams  # noqa: E402


def get_config():
  c = stability_hparams.get_config()
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  c.stability.num_twins = 2
  c.stability.control = False
  c.stability.constants = True
  return c
