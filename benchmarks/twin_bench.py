"""Cost of stability twins: a run with one twin per expert against the same run without.

The question: does measuring L2 stability with coupled twins cost at most 2.05x the plain run
(one extra expert row per expert, no separate code path)? Both runs train the same experts (MLP
196-128-128 on the default suite, the stability_hparams grid: 3 eta x 3 b x 3 ratios x 4 tasks
= 108 experts, mixed b) for the same steps with snapshots at the same milestones; the twin run
has 216 rows and also computes the estimator (||x - x^(j)||^2 for backbone and full params) at
every milestone. Times are wall clock, one warm-up run of each first (compilation excluded),
then `--repeats` alternating timed runs; the ratio is of medians.

  .venv/bin/python benchmarks/twin_bench.py [--steps 200] [--repeats 3]

The expert axis is sharded over one host device per core (as the runner does). Runtime: about
3 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import stability_hparams  # noqa: E402
from stability import experts as experts_lib  # noqa: E402
from stability import data, models, train, twins  # noqa: E402
from stability.studies import common  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=200, help="steps per run (4 milestones)")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
  ap.add_argument("--seeds", type=int, default=1, help="expert seeds: 108 experts per seed")
  ap.add_argument("--reference", action="store_true",
                  help="also time a plain run of twice as many distinct experts (2x seeds)")
  args = ap.parse_args()
  cfg = stability_hparams.get_config()
  cfg.sweep.seeds = tuple(range(args.seeds))
  suite = data.get_suite(cfg.data.suite, cfg.seed)
  originals, _, _ = common.build_grid(cfg, suite)
  arrays = suite.arrays()
  with_twins = twins.make_twins(originals, arrays, m=1, control=False)
  model = models.get_model(cfg.model.name, suite.max_classes, **cfg.model.kwargs.to_dict())
  backbone0 = model.init_backbone(jax.random.key(0), suite.image_shape)  # speed only
  pools = train.Pools.from_arrays(arrays)
  milestones = [args.steps * q // 4 for q in (1, 2, 3, 4)]

  def runner(spec, estimate):
    trainer = train.Trainer(model, cfg.optim.name, spec, pools, max_chunk=cfg.train.max_chunk)
    params = experts_lib.init_stack(model, backbone0, spec, suite.image_shape)

    def run():
      t0 = time.perf_counter()
      for _, snap in trainer.run(trainer.init(params), milestones):
        snap = trainer.unpad(snap)
        if estimate:
          twins.sq_distances(snap.params, spec)
        else:
          jax.block_until_ready(snap.params)
      return time.perf_counter() - t0
    return run

  variants = {"plain": runner(originals, False), "twins": runner(with_twins, True)}
  if args.reference:
    cfg.sweep.seeds = tuple(range(2 * args.seeds))
    variants["plain2x"] = runner(common.build_grid(cfg, suite)[0], False)
  for run in variants.values():
    run()  # warm-up: compile
  times = {k: [] for k in variants}
  for _ in range(args.repeats):
    for k, run in variants.items():
      times[k].append(run())
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; steps {args.steps}; "
        f"rows plain {originals.size}, twins {with_twins.size}")
  for k in variants:
    print(f"  {k:6s} median {med[k]:7.2f} s   runs {', '.join(f'{t:.2f}' for t in times[k])}")
  print(f"twin overhead ratio (twins / plain): {med['twins'] / med['plain']:.3f}  (goal <= 2.05)")
  if args.reference:
    print(f"twice as many distinct experts (plain2x / plain): {med['plain2x'] / med['plain']:.3f};"
          f" twins / plain2x: {med['twins'] / med['plain2x']:.3f}")


if __name__ == "__main__":
  main()
