"""Scale: 10,000 experts x 1,000 steps of the train_bench MLP, end to end, with peak memory.

The question: does one process on a 2-core CPU train 10,000 experts (MLP 64-128-10 on sklearn's
8x8 digits, batch 32, SGD with momentum) for 1,000 steps each in at most 5 minutes? The clock
runs from building the expert specs to the last snapshot on the host: specs and subsets, the
initial stack, the Trainer (sharding, compilation), training, and a host copy of the final params.

  .venv/bin/python benchmarks/scale_bench.py [--experts 10000] [--steps 1000] [--milestones 4]

Prints the wall time of each stage, expert-steps/s over the whole run, and the peak resident
memory of the process (getrusage ru_maxrss). Not part of `make bench` (`make bench-scale`); about
4-5 minutes on an idle 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

from stability import sharding as sharding_lib

sharding_lib.use_host_cores()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_bench  # noqa: E402  (benchmarks/ is the script's directory)
from stability import experts as experts_lib  # noqa: E402
from stability import models, train  # noqa: E402


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--experts", type=int, default=10_000, help="E")
  ap.add_argument("--steps", type=int, default=1_000, help="steps per expert (K)")
  ap.add_argument("--milestones", type=int, default=4,
                  help="evenly spaced snapshots, copied to the host like a study's results")
  args = ap.parse_args()
  E, K = args.experts, args.steps
  milestones = [K * (q + 1) // args.milestones for q in range(args.milestones)]
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); load average at start: "
        f"{os.getloadavg()[0]:.1f}")
  suite = train_bench.digits_suite()  # loading sklearn's digits: before the clock starts

  t0 = time.perf_counter()
  stages = {}
  model = models.get_model("mlp", train_bench.CLASSES, widths=(train_bench.HIDDEN,))
  spec = experts_lib.make_experts(suite, task=[0] * E, eta=train_bench.ETA, b=train_bench.B,
                                  K=K, data_ratio=1.0, seed=np.arange(E),
                                  momentum=train_bench.MOMENTUM,
                                  weight_decay=train_bench.WD)
  backbone0 = model.init_backbone(jax.random.key(0), suite.image_shape)
  params = experts_lib.init_stack(model, backbone0, spec, suite.image_shape)
  trainer = train.Trainer(model, "sgd", spec, train.Pools.from_arrays(suite.arrays()))
  state = jax.block_until_ready(trainer.init(params))
  del params
  stages["specs, initial stack, sharded state"] = time.perf_counter() - t0

  t1 = time.perf_counter()
  first, loss = None, None

  def progress(k, loss_E):
    nonlocal first, loss
    first = first or time.perf_counter() - t1  # the first chunk includes compilation
    loss = float(np.nanmean(loss_E))

  final = None
  for k, snap in trainer.run(state, milestones, progress=progress):
    final = jax.tree.map(np.asarray, trainer.unpad(snap.params))  # host copy, like a study
    print(f"  K = {k:5d}: {time.perf_counter() - t0:6.1f} s, mean loss so far "
          f"{'-' if loss is None else f'{loss:.3f}'}, "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
  stages["training (first chunk incl. compile: %.1f s)" % first] = time.perf_counter() - t1
  total = time.perf_counter() - t0

  C = trainer.chunk(milestones)
  print(f"E = {E} experts x K = {K} steps = {E * K:,} expert-steps; chunk {C} steps, "
        f"{trainer.blocks} blocks per device; snapshots at {milestones}")
  for name, t in stages.items():
    print(f"  {name:48s} {t:7.1f} s")
  print(f"total wall time {total:.1f} s (goal <= 300 s), {E * K / total:,.0f} expert-steps/s; "
        f"peak RSS {peak_rss_gb():.2f} GB; final params finite: "
        f"{all(np.isfinite(a).all() for a in jax.tree.leaves(final))}; load average at end: "
        f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
