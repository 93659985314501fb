"""Thin runner: `python -m experiments.run experiments/<study>.py --workdir DIR [--config.a.b=v]`.

Parses the config, logs the devices, and calls `stability.sweep.run`. On a CPU host with no
XLA_FLAGS device count set, it exposes one host device per core so the expert axis is sharded
over all cores (set XLA_FLAGS yourself to override).
"""
from __future__ import annotations

import argparse
import os
import sys


def _use_all_cores() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and os.environ.get(
      "JAX_PLATFORMS", "cpu") in ("", "cpu"):
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                               f"{os.cpu_count() or 1}").strip()


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
  p.add_argument("config", help="path to a study config file, e.g. experiments/main.py")
  p.add_argument("--workdir", required=True, help="output directory (results, figures)")
  p.add_argument("--dry-run", action="store_true", help="print the plan without computing")
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unknown argument {bad[0]!r}; config overrides look like --config.section.field=v")
  _use_all_cores()

  import logging
  import json
  import jax
  from stability import config as config_lib
  from stability import sweep

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    cfg = config_lib.load(args.config, overrides)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    summary = sweep.run(cfg, args.workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=1, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
