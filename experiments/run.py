"""Thin runner: `python -m experiments.run experiments/<study>.py[:VARIANT] --workdir DIR
[--config.a.b=v] [--dry-run]`.

Parses the config (`experiments/main.py:tiny` passes "tiny" to its get_config), logs the
devices, and dispatches on `config.study` through `stability.studies`. On a CPU host with no
XLA_FLAGS device count set, it exposes one single-threaded host device per core so the expert
axis is sharded over all cores (`stability.sharding.use_host_cores`; set XLA_FLAGS yourself to
override).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
  p.add_argument("config", help="a study config file, e.g. experiments/main.py or experiments/main.py:tiny")
  p.add_argument("--workdir", required=True, help="output directory (results, figures)")
  p.add_argument("--dry-run", action="store_true", help="print the plan without computing")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (cluster auto-detection: TPU pods, "
                 "SLURM, Open MPI, Kubernetes), or with the three flags below")
  p.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
  p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
  p.add_argument("--process-id", type=int, help="this process's index (multi-process runs)")
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unknown argument {bad[0]!r}; config overrides look like --config.section.field=v")
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    p.error("--coordinator, --num-processes and --process-id go together")
  from stability import sharding  # before JAX touches a device: XLA reads XLA_FLAGS once
  sharding.use_host_cores()

  import logging
  import json
  import jax
  if args.coordinator is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()
  from stability import config as config_lib
  from stability import studies

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    cfg = config_lib.load(args.config, overrides)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if args.dry_run:
      print(studies.plan(cfg))
      return 0
    summary = studies.run(cfg, args.workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
