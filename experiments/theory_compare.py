"""The theory against the measurements: non-convex stability and generalization bounds with
constants estimated along each expert's trajectory, against measured eps^2 and gaps.

Question: with L (top Hessian eigenvalue, power iteration on Hessian-vector products) and G
(largest per-sample gradient norm) estimated from data at every snapshot, how loose are the
non-convex bounds of `theory.bounds`, and do they rank the experts the way the measurements do
along eta, b, K and n (Spearman), with the right fitted exponents?

  python -m experiments.run experiments/theory_compare.py --workdir runs/theory_compare
  python -m experiments.run experiments/theory_compare.py:tiny --workdir runs/theory_tiny

Setup: the stability_hparams grid (3 eta x 3 b x 3 ratios x 4 tasks = 108 experts) with plain
SGD (momentum 0, weight decay 0: the bounds' algorithm), 2 twins each, K = 50, 100, 200, 400;
G and L per expert and K on 256 samples of its training subset; the bound uses the largest G
and L seen along the trajectory up to K. `tiny`: the stability_hparams tiny grid without
merges or control twins, constants on 32 samples (~20 s; the numbers mean little).

Outputs: runs/theory_compare/bound_vs_measured.png, theory_eps2.csv and theory_gap.csv (one row
per expert x K: bound, measured, ratio, holds), summary.json["theory"] (holds, ratio quantiles,
Spearman per axis, fitted vs predicted exponents), exponents_vs_predicted.png. Results: README
"Theory against measurement". Notebook: notebooks/theory_compare.ipynb.
"""
from experiments import stability_hparams


def get_config(variant=None):
  c = stability_hparams.get_config(variant)
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  c.stability.num_twins = 2
  c.stability.control = False
  c.stability.constants = True
  if variant == "tiny":
    c.stability.group_sizes = ()
    c.stability.merges = ()
    c.stability.figures = ("stability_vs_hparams",)
    c.stability.constants_samples = 32
  return c
