"""Linear merges: x = x0 + sum_m c_m tau_m with coefficients c fixed before seeing the task
vectors (simple and weighted average, uniform soup, task arithmetic).

They run as one fused `linear_combination` over all groups at once (chunk_size None: XLA fuses
the gathers into the output, so nothing beyond the output is materialised).

The greedy soup is not here although it averages its ingredients uniformly: WHICH members enter
the soup is chosen by the held-out accuracy of candidate soups (forward passes of the merged
model on labelled data), so its coefficients depend on the members and on data. It lives with
the other merges whose coefficients are fitted with the model, in `learned`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stability.merging.base import Params, check_scalar, check_weights, prepare, run_linear
from stability.sharding import on_one_device


def average(x0: Params, stack: Params, groups: Any, weights: Any = None, *,
            chunk_size: int | None = None, tasks: Any = None) -> Params:
  """Simple (or weighted) average of member backbones: x = sum_m w_m x_m, sum_m w_m = 1.

  Equals x0 + (1/M) sum_m tau_m (PAPER.md "average"; FusionBench `simple_average`). `weights`
  [G, M] >= 0 are normalised per group. Returns leaves [G, ...].
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  w = check_weights(weights, g.shape, average=True)
  return run_linear(x0, stack, g, w, np.zeros(g.shape[0], np.float32), chunk_size)


def weighted_average(x0: Params, stack: Params, groups: Any, weights: Any, *,
                     chunk_size: int | None = None, tasks: Any = None) -> Params:
  """x = x0 + sum_m w_m tau_m with w [G, M] >= 0 normalised to sum 1 (PAPER.md "weighted")."""
  if weights is None:
    raise ValueError("weights: weighted_average needs weights [G, M]")
  return average(x0, stack, groups, weights, chunk_size=chunk_size, tasks=tasks)


def uniform_soup(x0: Params, stack: Params, groups: Any, *, chunk_size: int | None = None,
                 tasks: Any = None) -> Params:
  """Uniform model soup (Wortsman et al., ICML 2022): the plain average of the members.

  Soups assume the ingredients are fine-tuned on the SAME task and share a head; here each
  member keeps its own head, so this is `average` under the soup name.
  """
  return average(x0, stack, groups, chunk_size=chunk_size, tasks=tasks)


def task_arithmetic(x0: Params, stack: Params, groups: Any, weights: Any = None, *,
                    lam: float = 0.3, chunk_size: int | None = None,
                    tasks: Any = None) -> Params:
  """Task arithmetic (Ilharco et al., ICLR 2023): x = x0 + lam * sum_m w_m tau_m.

  lam >= 0 defaults to 0.3 (FusionBench `task_arithmetic` scaling_factor); weights default to 1
  and are NOT normalised, so lam = 1/M with unit weights is the simple average.
  """
  _, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  lam = check_scalar("lam", lam, 0.0, math.inf, what=" (finite)")
  w = check_weights(weights, g.shape, average=False)
  c = lam * w
  return run_linear(x0, stack, g, c, 1.0 - c.sum(1), chunk_size)



def metrics_weights(losses: Any, g: np.ndarray, temperature: float) -> np.ndarray:
  """Member weights [G, M] = softmax over each group of -loss / temperature (host side)."""
  z = -np.asarray(losses, np.float64)[g] / temperature
  z = np.exp(z - z.max(1, keepdims=True))
  return (z / z.sum(1, keepdims=True)).astype(np.float32)


def metrics_weighted(x0: Params, stack: Params, groups: Any, *, losses: Any,
                     temperature: float = 1.0, chunk_size: int | None = None,
                     tasks: Any = None) -> Params:
  """Metrics-weighted averaging: x = sum_m w_m x_m with w = softmax_m(-loss_m / temperature)
  per group, loss_m each expert's training loss (`losses` [E], finite). temperature -> inf is
  the plain average; -> 0 picks the member of lowest loss. The weights come from the members'
  own training data, so it is data-dependent (not covered by the linear-merge theorem as a
  fixed-coefficient merge: replacing a training sample moves the weights too).
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  lo = np.asarray(losses, np.float64)
  if lo.shape != (E,) or not np.all(np.isfinite(lo)):
    raise ValueError(f"metrics_weighted: losses must be finite, shape [E]=({E},), got shape "
                     f"{lo.shape}")
  temperature = check_scalar("metrics_weighted: temperature", temperature, 0.0, math.inf,
                             lo_open=True, what=" (finite)")
  return run_linear(x0, stack, g, metrics_weights(lo, g, temperature),
                    np.zeros(g.shape[0], np.float32), chunk_size)
