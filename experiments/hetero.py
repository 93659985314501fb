"""Heterogeneous merge groups: do experts with similar hyperparameters merge better?

Question: the paper's bound for a merge of experts with different (eta_i, b_i, K_i, n_i) sums
each member's own stability term. Does the measured merged eps^2 rank groups the way that
prediction does, and does spreading the members' hyperparameters apart (by a factor s along
one axis, the others held) make the merged model's test loss and gap worse?

  python -m experiments.run experiments/hetero.py --workdir runs/hetero
  python -m experiments.run experiments/hetero.py:tiny --workdir runs/hetero_tiny

Grid: a centre configuration (eta 0.02, b 16, K 200, data ratio 0.1: n = 262 on the 2,625-image
MNIST tasks) and, for each axis (eta, b, K, data ratio) and s in {2, 5, 10}, the configurations at
c / s and c * s: 25 configurations x 8 tasks = 200 experts, each with 2 twins (600 rows), plain
SGD (momentum 0, weight decay 0: inside the bounds' assumptions), each expert stopping at its own
K, snapshot at K = 2000. Groups of M = 3 tasks, 10 per set (task draws seeds 0-9, the same in
every set): homogeneous (one random configuration per group), mixed (one per member), and
spread along each axis at s = 1, 2, 5, 10 (members at c / s, c, c * s), merged by simple
averaging; the twin stack gives each group's measured merged eps^2. The prediction uses G and L
of the theory section. `tiny`: the synthetic 4-task suite, 2 axes (eta, K), s in {1, 3}, 3 groups
per set (~30 s; the numbers mean little).

Runtime: 29 min 25 s measured on the 2-core CPU while other jobs shared it (1,200,000 expert-steps
through the checked step, since experts stop at different K); expect ~12 min on idle cores.
Outputs: runs/hetero/summary.json (rank agreement with bootstrap CIs, the spread effect per axis
with a verdict, mixed against homogeneous), hetero_groups.csv (one row per group), and
hetero_spread.png. Results: README "Heterogeneous merge groups". Notebook: notebooks/hetero.ipynb.
"""
from experiments import common


def hetero_section():
  return common.section(
      centre=common.section(lr=0.02, batch_size=16, K=200, data_ratio=0.1),
      axes=("lr", "batch_size", "K", "data_ratio"),  # lr | batch_size | K | data_ratio
      spreads=(1.0, 2.0, 5.0, 10.0),  # members at c / s, c, c * s (1: all at the centre)
      modes=("homogeneous", "mixed", "spread"),
      group_size=3,              # M tasks per group (spread needs >= 3)
      num_groups=10,             # groups per set (task draws: seeds 0..G-1)
      num_twins=2,               # twins per expert (merged eps^2)
      seed=0,                    # twin draws and the configurations of mixed/homogeneous groups
      merges=("average",))       # merging.registry.stack_only() names


def get_config(variant=None):
  c = common.base("hetero")
  c.data.tasks = ("mnist", "mnist_rot90", "mnist_flip", "mnist_invert", "mnist_perm_a",
                  "mnist_perm_b", "mnist_shift", "mnist_quadrants")
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  c.sweep.milestones = (2000,)
  c.train.checkpoint_every = 500
  c.hetero = hetero_section()
  if common.variant(variant) == "tiny":
    common.tiny(c)
    c.sweep.milestones = (60,)
    c.hetero.centre = common.section(lr=0.05, batch_size=4, K=20, data_ratio=0.3)
    c.hetero.axes = ("lr", "K")
    c.hetero.spreads = (1.0, 3.0)
    c.hetero.num_groups = 3
  return c
