"""Section builders that every study config composes, and the shared `tiny` variant.

A study config is `base(study)` (every shared section at the main job's values), then the
study's own changes; `config.py:tiny` (`get_config("tiny")`) shrinks it with `tiny()` to the
synthetic 4-task suite, so tests and notebooks run the same pipeline in seconds.

  base(study)          seed, data, model, pretrain, optim, sweep, train, theory, output
  stability_section()  the stability study's knobs (twins, merge groups, figures, constants)
  compare_section()    the merge comparison's knobs (algorithms, samples, AdaMerging steps)
  tiny(c)              the shared tiny variant, applied in place
  variant(name, ...)   checks a `path:variant` name against the config's variants
"""
from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict
VARIANTS = ("tiny",)


def section(**fields) -> ConfigDict:
  return ConfigDict(fields)


def base(study: str) -> ConfigDict:
  """Every shared section, at the main job's values."""
  c = ConfigDict()
  c.study = study
  c.seed = 0                           # suite splits and the pretrained base
  c.data = section(
      suite="default",                 # registered task suite (stability.data.suites)
      tasks=(),                        # task names; () = every task of the suite
      options=section())               # suite options (paper20: data_root, image_size, ...)
  c.model = section(
      name="mlp",                      # mlp | cnn | resnet18 | ... (stability.models)
      kwargs=section(widths=(128, 128)))
  c.pretrain = section(                # the base x_0, cached under output.cache_dir
      steps=1000,                      # SGD steps on the pretraining set
      batch_size=64,
      lr=0.05,
      momentum=0.9,
      weight_decay=1e-4,
      optimizer="sgd")
  c.optim = section(                   # experts
      name="sgd",                      # sgd | adam (momentum is Adam's beta1)
      momentum=0.9,
      weight_decay=1e-4)               # L2 added to the gradient, as torch.optim.SGD
  c.sweep = section(
      lr=(0.05, 0.01, 0.002),          # eta, constant
      batch_size=(16, 32, 64),         # b
      data_ratio=(0.5, 0.8, 1.0),      # n_i = floor(ratio * train pool)
      seeds=(0,),                      # expert seeds (head init and data order)
      milestones=(100, 200, 300, 400),  # K snapshots (steps)
      num_groups=10,                   # merge groups per config (group seeds 0..G-1)
      group_size=6)                    # M tasks per group
  c.train = section(
      max_chunk=50,                    # steps per scanned chunk (divides every milestone)
      checkpoint_every=100,            # steps between orbax checkpoints of the stack (0 = none)
      memory_gb=0.0,                   # per-device memory for the wave planner (0 = detect)
      max_wave=0)                      # cap on experts per wave (0 = as many as fit)
  # Merged-model gap against the non-convex bound (main study: summary.json and
  # theory_merged_gap.csv). G: per-sample gradient norm bound, L: smoothness; the values are
  # the medians that experiments/theory_compare.py measured. L = 0 skips the comparison.
  c.theory = section(G=26.2, L=10.8)
  c.output = section(
      cache_dir="~/.cache/merge-stability",  # pretrained-base cache ("" = none)
      figures=True,
      progress=True)
  return c


def stability_section() -> ConfigDict:
  """The stability study's knobs (every stability config starts from these)."""
  return section(
      num_twins=4,               # m perturbed twins per expert (sampled indices j)
      control=True,              # one control twin per expert (no swap): the noise floor
      seed=0,                    # draws of j and ghost samples; DARE mask key
      group_sizes=(),            # M values for merged-model stability (() = none)
      num_groups=10,             # groups per M and config (group seeds 0..G-1)
      merges=("average",),       # merges of the twin stack (merging.registry.stack_only())
      figures=("stability_vs_hparams",),
      constants=False,           # also estimate G (max per-sample grad norm) and L (top Hessian
      constants_samples=256)     #   eigenvalue, 20 power iterations) per expert and K, on this
  #                                  many samples of its training subset


def compare_section() -> ConfigDict:
  """The merge comparison's knobs."""
  return section(
      merges=("average", "task_arithmetic", "ties", "dare_average", "dare_task_arithmetic",
              "dare_ties", "uniform_soup", "model_stock", "fisher", "regmean", "adamerging_task",
              "adamerging_layer", "greedy_soup", "ensemble"),  # merging.registry.compare_names()
      samples=128,               # labelled samples per expert for Fisher / RegMean
      adamerging_steps=100)      # Adam steps per group (FusionBench default 500; 100 on CPU)


def variant(name: str | None, allowed: tuple[str, ...] = VARIANTS) -> str | None:
  """The variant name, checked: None (the full study) or one of `allowed`."""
  if name is not None and name not in allowed:
    raise ValueError(f"config: unknown variant {name!r}; allowed: {', '.join(allowed)}")
  return name


def tiny(c: ConfigDict) -> ConfigDict:
  """The shared tiny variant, in place: the synthetic 4-task `tiny` suite, a 16-unit MLP,
  2 eta x 2 b x 2 ratios, K = 10, 20, 3 groups of 2 tasks, no cache, no progress bar."""
  c.data.suite = "tiny"
  c.data.tasks = ()
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
