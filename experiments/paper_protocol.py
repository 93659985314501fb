"""The paper's full protocol (arXiv 2601.21690): 20 vision tasks x 27 configs, K up to 4000.

Question: the main job's question at the paper's scale: how do eta, b, the data ratio and K of
fine-tuned experts move the generalization of their simple-average merge?

  # plan only (no data or accelerator needed): experts, waves, memory, compute, missing data
  python -m experiments.run experiments/paper_protocol.py --workdir runs/paper --dry-run
  # on an accelerator host, data under /data/paper20 (layout: README, "Running the paper's
  # protocol on accelerators"); one backbone per run:
  python -m experiments.run experiments/paper_protocol.py --workdir runs/paper-resnet18 \\
      --config.data.options.data_root=/data/paper20 --config.model.name=resnet18
  # multi-host (TPU pod slice / SLURM): the same command on every host, plus --distributed

Grid: 3 eta x 3 b x 3 data ratios = 27 configs x 20 tasks = 540 experts per backbone, snapshots at
K = 1000, 2000, 3000, 4000, 10 groups of 6 tasks per config merged by simple averaging. The
backbone is `model.name` (resnet18 | resnet50 | vit_ti16 | vit_s16 | vit_b16 | ...); x_0 is
pretrained on a held-out slice of every task (`pretrain.*`) unless you import one (README,
"Importing PyTorch / Hugging Face checkpoints"). Images are resized to `data.options.image_size`
(32 keeps the CIFAR-style ResNet stem affordable; use 224 with an ImageNet stem for pretrained
torchvision/timm weights).

Runtime: hours on one accelerator (the dry run prints the FLOP count and memory per wave); not
meant for CPU. Expect per-K tables and the merged_vs_K figure as in experiments/main.py.
Notebook: notebooks/main.ipynb (same row kinds as the main job).
"""
import ml_collections

from experiments import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base("main")

  # Data
  c.data.suite = "paper20"             # the 20 tasks read from disk (stability.data)
  c.data.options = ml_collections.ConfigDict({
      "data_root": "~/data/paper20",   # where the datasets live (see README for the layout)
      "image_size": 32,                # pixels (square), after centre crop + resize
      "channels": 3,
      "normalize": "imagenet",         # per-channel mean/std
      "max_train": 20000,              # rows per task at most (pools are padded per task)
      "max_test": 2000,
      "cache_dir": "",                 # preprocessed-array cache ("" = none)
  })

  # Model
  c.model.name = "resnet18"            # resnet18 | resnet50 | vit_ti16 | vit_s16 | vit_b16
  c.model.kwargs = ml_collections.ConfigDict({"stem": "cifar"})

  # Pretraining of x_0 (held-out slice of every task)
  c.pretrain.steps = 5000
  c.pretrain.batch_size = 128
  c.pretrain.lr = 0.05

  # Sweep (the paper's grid)
  c.sweep.lr = (0.05, 0.01, 0.002)     # eta, constant
  c.sweep.batch_size = (32, 64, 128)   # b
  c.sweep.data_ratio = (0.25, 0.5, 1.0)  # n_i = floor(ratio * train pool)
  c.sweep.milestones = (1000, 2000, 3000, 4000)  # K snapshots (steps)
  c.sweep.num_groups = 10              # merge groups per config
  c.sweep.group_size = 6               # M tasks per group

  # Trainer
  c.train.max_chunk = 100              # steps per scanned chunk
  c.train.checkpoint_every = 500       # steps between checkpoints (preemption)
  c.train.memory_gb = 80.0             # per-device memory the waves are planned for (GiB;
                                       # 0 = detect, e.g. on the accelerator host itself)

  # Output
  c.output.progress = True
  return c
