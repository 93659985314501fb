"""Memory waves: split a sweep's expert axis into waves that fit the devices, and describe it.

Memory per expert comes from `jax.eval_shape` (no compute, no allocation):
  state      params + optimizer state + step counters of one expert (`train.init_state`);
  copies     the live state, the chunk's donated output and a milestone snapshot / checkpoint
             copy: 3 x state;
  batch      forward activations of one minibatch of b_max samples (every module output of
             the backbone and head, from `capture_intermediates`), x 2 for the backward pass;
  eval       one evaluation block's activations (evaluation and training never overlap, so a
             wave needs 3 x state + max(batch, eval) per expert).
A wave holds whole configs (so every merge group lies inside one wave) and uses at most
`fraction` of each device's memory. Device memory is `memory_stats()['bytes_limit']` on
accelerators, the host's available memory split over its devices on CPU, or
`train.memory_gb` when set.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stability import models as models_lib
from stability import train as train_lib

GB = 1 << 30


def _bytes(tree: Any) -> int:
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def expert_bytes(model: models_lib.Model, optimizer: str, image_shape: Sequence[int],
                 b_max: int, eval_block: int = 256) -> dict[str, int]:
  """Bytes one expert needs on a device while training (see the module docstring)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  backbone = jax.eval_shape(lambda x: model.init_backbone(jax.random.key(0), x.shape[1:]), x)
  head = jax.eval_shape(lambda bb: model.init_head(jax.random.key(0), bb, tuple(image_shape)),
                        backbone)
  params = {"backbone": backbone, "head": head}
  opt = train_lib.get_optimizer(optimizer)(learning_rate=1.0, momentum=0.9, weight_decay=0.0)
  state = (params, jax.eval_shape(opt.init, params))

  def activations(n):
    xs = jax.ShapeDtypeStruct((n,) + tuple(image_shape), jnp.float32)

    def fwd(p, xs):
      variables = p["backbone"] if model.state else {"params": p["backbone"]}
      _, inter = model.backbone.apply(variables, xs, capture_intermediates=True,
                                      mutable=["intermediates"])
      return inter, model.apply(p, xs)
    return _bytes(jax.eval_shape(fwd, params, xs)) + _bytes(xs)

  s = _bytes(state)
  batch, ev = 2 * activations(b_max), activations(eval_block)
  return dict(state=s, copies=3 * s, batch=batch, eval=ev, total=3 * s + max(batch, ev))


def train_flops(model: models_lib.Model, image_shape: Sequence[int], b: int) -> float:
  """FLOPs of one expert's train step on a batch of b (XLA's cost analysis of the lowered
  forward + backward; nothing is compiled or run)."""
  key = jax.random.key(0)
  x = jnp.zeros((b,) + tuple(image_shape), jnp.float32)
  y = jnp.zeros((b,), jnp.int32)

  def step(params):
    return jax.grad(lambda p: models_lib.per_sample_loss(model, p, x, y, 2)[0].sum())(params)
  params = jax.eval_shape(lambda: {"backbone": (bb := model.init_backbone(key, image_shape)),
                                   "head": model.init_head(key, bb, image_shape)})
  cost = jax.jit(step).lower(params).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def device_memory(memory_gb: float = 0.0) -> tuple[int, str]:
  """(bytes per device, where the number came from)."""
  if memory_gb > 0:
    return int(memory_gb * GB), "train.memory_gb"
  d = jax.local_devices()[0]
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{d.device_kind} memory_stats"
  avail = _host_available()
  return avail // max(1, jax.local_device_count()), (
      f"host available memory / {jax.local_device_count()} devices")


def _host_available() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a sweep runs: waves of whole configs, and what each costs."""
  experts: int                 # rows of the expert axis (originals + twins)
  experts_per_config: int
  configs: int
  waves: tuple[tuple[int, ...], ...]  # config indices of each wave
  milestones: tuple[int, ...]
  groups: int                  # merge groups (all configs)
  devices: int
  bytes_per_expert: dict
  device_bytes: int
  device_source: str
  flops_per_step: float        # one expert, one step, largest b

  @property
  def expert_steps(self) -> int:
    return self.experts * self.milestones[-1]

  def describe(self) -> str:
    e = self.bytes_per_expert
    wave_sizes = sorted({len(w) * self.experts_per_config for w in self.waves})
    per_dev = max(wave_sizes) / self.devices
    lines = [
        f"experts       {self.experts} ({self.configs} configs x {self.experts_per_config})",
        f"snapshots     K = {', '.join(map(str, self.milestones))}",
        f"merge groups  {self.groups}",
        f"devices       {self.devices} ({jax.devices()[0].device_kind}, "
        f"{jax.process_count()} process(es))",
        f"memory/expert {e['total'] / 2**20:.2f} MiB (state {e['state'] / 2**20:.2f} x 3, "
        f"batch activations {e['batch'] / 2**20:.2f}, eval block {e['eval'] / 2**20:.2f})",
        f"device memory {self.device_bytes / GB:.1f} GiB ({self.device_source}); "
        f"budget {FRACTION:.0%}",
        f"waves         {len(self.waves)} of {', '.join(map(str, wave_sizes))} experts "
        f"(~{per_dev * e['total'] / GB:.2f} GiB per device)",
        f"compute       {self.expert_steps:.3g} expert-steps x {self.flops_per_step:.3g} "
        f"FLOP = {self.expert_steps * self.flops_per_step:.3g} FLOP (training only): "
        + ", ".join(f"{_duration(self.expert_steps * self.flops_per_step / r)} at {r / 1e12:g} "
                    f"TFLOP/s" for r in (1e11, 1e13, 1e14)) + " sustained",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
  for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
    if seconds >= size:
      return f"{seconds / size:.1f} {unit}"
  return f"{seconds:.0f} s"


FRACTION = 0.6  # of device memory a wave may use (XLA workspace, data pools, fragmentation)


def plan(model: models_lib.Model, optimizer: str, image_shape: Sequence[int], *, configs: int,
         experts_per_config: int, b_max: int, milestones: Sequence[int], groups: int,
         memory_gb: float = 0.0, max_wave: int = 0, devices: int | None = None) -> Plan:
  """Splits `configs` configs of `experts_per_config` experts into waves that fit memory.

  `max_wave` > 0 additionally caps the experts per wave (rounded down to whole configs).
  """
  if max_wave < 0:
    raise ValueError(f"train.max_wave: must be >= 0 (0 = as many as fit); got {max_wave}")
  devices = devices or jax.device_count()
  per = expert_bytes(model, optimizer, image_shape, b_max)
  dev_bytes, source = device_memory(memory_gb)
  fit = int(FRACTION * dev_bytes // per["total"]) * devices
  if max_wave:
    if max_wave < experts_per_config:
      raise ValueError(f"train.max_wave: must be 0 or >= {experts_per_config} (one config's "
                       f"experts); got {max_wave}")
    fit = min(fit, max_wave)
  per_wave = fit // experts_per_config
  if per_wave < 1:
    raise ValueError(
        f"train.memory_gb: one config's {experts_per_config} experts need "
        f"{experts_per_config * per['total'] / devices / GB:.2f} GiB per device, more than "
        f"{FRACTION:.0%} of {dev_bytes / GB:.2f} GiB ({source}); use more devices or memory, "
        f"fewer tasks or twins, or smaller batches")
  waves = tuple(tuple(range(c, min(c + per_wave, configs))) for c in range(0, configs, per_wave))
  return Plan(experts=configs * experts_per_config, experts_per_config=experts_per_config,
              configs=configs, waves=waves, milestones=tuple(int(k) for k in milestones),
              groups=groups, devices=devices, bytes_per_expert=per, device_bytes=dev_bytes,
              device_source=source, flops_per_step=train_flops(model, image_shape, b_max))
