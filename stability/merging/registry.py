"""The registry: one `Algorithm` entry per merge name, with what a study must know to run it.

Every entry's `fn` is `fn(x0, stack, groups, **inputs, **hparams)` -> merged backbones, leaves
[G, ...]. Fields (all fixed per entry, so they hold for every hyperparameter value):

  family          the module that implements it: linear | sparse | data_aware | learned |
                  geometric | spectral | magnitude
  linear          x = x0 + sum_m c_m (k_m * tau_m) with coefficients c and keep masks k (all
                  ones unless masked) fixed before seeing the task vectors: average,
                  weighted_average, uniform_soup, task_arithmetic, and DARE on a linear base
                  (its random masks are drawn from the key alone). Not TIES (its mask and signs
                  depend on the task vectors), nor any merge whose coefficients are computed
                  from the members (Fisher, RegMean, AdaMerging, greedy soup, SLERP, Model
                  Stock), nor the generic `dare` (its base may be 'ties'), nor any of #21's
                  (SVD truncation, masks from the task vectors, data-derived weights; see
                  docs/merging.md for where the linear stability theory reaches).
  data_dependent  needs per-expert data beyond the stack (statistics or forward passes)
  masked          zeroes or selects entries of the task vectors before combining them: TIES,
                  Breadcrumbs, MagMax (by magnitude), DARE (at random)
  mask_from_data  the mask is computed from per-expert data (activations, losses), not from
                  the key or the task vectors alone; False for every merge registered so far
                  (docs/merging.md: which merges the linear stability theorem covers)
  random          draws from `key` and takes `group_ids` (RNG ids of the groups), so a stability
                  twin group shares its original group's draws (`twins.merge_fn`); exactly the
                  entries that need "key"
  needs           inputs a study must supply beyond (x0, stack, groups), by name (`INPUTS`);
                  `stability.merging.inputs` builds all but "weights"
  excluded        None when the studies run it; otherwise why they do not (a generic form whose
                  fixed variants are registered, an input no study supplies, a fixed M)

Study lists, in registry order (which the studies' error messages list): `stack_only()`, the
merges that need nothing but the stack and a key (the stability study, which merges twin
stacks); `data_merges()`, those that need per-expert data; `compare_names()`, both plus the
logit ensemble `ENSEMBLE` (the compare study's non-merged reference, not a registered merge).
`names(**filters)` selects by any field, e.g. `names(data_dependent=False)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from stability.merging.base import Params
from stability.merging.data_aware import fisher, regmean, regmean_plusplus
from stability.merging.geometric import model_stock, slerp
from stability.merging.learned import adamerging, greedy_soup
from stability.merging.magnitude import breadcrumbs, della, emr, magmax
from stability.merging.linear import (average, metrics_weighted, task_arithmetic, uniform_soup,
                                      weighted_average)
from stability.merging.sparse import dare, ties
from stability.merging.spectral import iso_c, iso_cts, tsv_m

INPUTS = {
    "key": "a jax.random key (key=)",
    "fishers": "diagonal Fisher per expert row, stacked like the backbones (fishers=)",
    "grams": "Gram matrices of every Dense layer's inputs per expert row (grams=)",
    "unlabelled": "model, heads, x, num_classes, mask: unlabelled inputs per expert row",
    "heldout": "model, heads, x, y, num_classes, mask: labelled held-out data per expert row",
    "weights": "member weights [G, M] chosen per call (weights=)",
    "losses": "each expert row's training loss [E] (losses=)",
    "samples": "model, x, mask: each expert row's own training inputs (RegMean++'s Gram samples)",
}
DATA_INPUTS = ("fishers", "grams", "unlabelled", "heldout", "losses", "samples")

ENSEMBLE = "ensemble"


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One registered merge; see the module docstring for the fields."""
  name: str
  fn: Callable[..., Params]
  family: str
  linear: bool = False
  data_dependent: bool = False
  masked: bool = False
  random: bool = False
  mask_from_data: bool = False
  needs: tuple[str, ...] = ()
  excluded: str | None = None

  def __call__(self, x0: Params, stack: Params, groups: Any, **kwargs) -> Params:
    return self.fn(x0, stack, groups, **kwargs)


_DARE = dict(family="sparse", masked=True, random=True, needs=("key",))
_ADAMERGING = dict(family="learned", data_dependent=True, random=True,
                   needs=("unlabelled", "key"))

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("average", average, "linear", linear=True),
    Algorithm("weighted_average", weighted_average, "linear", linear=True, needs=("weights",),
              excluded="needs member weights [G, M] chosen per call; with equal weights it is "
                       "'average'"),
    Algorithm("task_arithmetic", task_arithmetic, "linear", linear=True),
    Algorithm("ties", ties, "sparse", masked=True),
    Algorithm("dare", dare, **_DARE,
              excluded="generic form (base= per call); the studies run dare_average, "
                       "dare_task_arithmetic and dare_ties"),
    Algorithm("dare_average", functools.partial(dare, base="average"), linear=True, **_DARE),
    Algorithm("dare_task_arithmetic", functools.partial(dare, base="task_arithmetic"),
              linear=True, **_DARE),
    Algorithm("dare_ties", functools.partial(dare, base="ties"), **_DARE),
    Algorithm("fisher", fisher, "data_aware", data_dependent=True, needs=("fishers",)),
    Algorithm("regmean", regmean, "data_aware", data_dependent=True, needs=("grams",)),
    Algorithm("adamerging", adamerging, **_ADAMERGING,
              excluded="generic form (granularity= per call); the studies run "
                       "adamerging_task and adamerging_layer"),
    Algorithm("adamerging_task", functools.partial(adamerging, granularity="task"),
              **_ADAMERGING),
    Algorithm("adamerging_layer", functools.partial(adamerging, granularity="layer"),
              **_ADAMERGING),
    Algorithm("uniform_soup", uniform_soup, "linear", linear=True),
    Algorithm("greedy_soup", greedy_soup, "learned", data_dependent=True, needs=("heldout",)),
    Algorithm("slerp", slerp, "geometric",
              excluded="merges pairs only (M = 2), while the studies' group sizes vary"),
    Algorithm("model_stock", model_stock, "geometric"),
    # Issue #21 (appended: the names above keep their order in the study lists).
    Algorithm("tsv_m", tsv_m, "spectral"),
    Algorithm("iso_c", iso_c, "spectral"),
    Algorithm("breadcrumbs", breadcrumbs, "magnitude", masked=True),
    Algorithm("magmax", magmax, "magnitude", masked=True),
    Algorithm("iso_cts", iso_cts, "spectral"),
    Algorithm("della", della, "magnitude", masked=True, random=True, needs=("key",)),
    Algorithm("emr", emr, "magnitude", masked=True,
              excluded="returns per-member backbones [G, M, ...] (one model per task), not one "
                       "merged backbone per group"),
    Algorithm("metrics_weighted", metrics_weighted, "linear", data_dependent=True,
              needs=("losses",),
              excluded="needs each expert's training loss (losses=), which the studies do not "
                       "pass to merges yet"),
    Algorithm("regmean_plusplus", regmean_plusplus, "data_aware", data_dependent=True,
              needs=("samples",)),
)}


def algorithm(name: str) -> Algorithm:
  """The entry registered under `name` (`ensemble` is not a merge: call it directly)."""
  if name not in ALGORITHMS:
    raise ValueError(f"algorithm: unknown merge {name!r}; allowed: {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name]


def get(name: str) -> Callable[..., Params]:
  """The merge function registered under `name` (`ensemble` is not a merge: call it directly)."""
  return algorithm(name).fn


def merge(name: str, x0: Params, stack: Params, groups: Any, **hparams) -> Params:
  """`get(name)(x0, stack, groups, **hparams)`: hparams are that function's keyword arguments
  (e.g. weights, lam, k, p, key, chunk_size); returns the merged backbones, leaves [G, ...]."""
  return get(name)(x0, stack, groups, **hparams)


_FIELDS = tuple(f.name for f in dataclasses.fields(Algorithm) if f.name not in ("name", "fn"))


def names(**filters) -> tuple[str, ...]:
  """Registered names, in registry order, whose fields equal `filters` (e.g. linear=True,
  family='sparse', excluded=None)."""
  bad = [k for k in filters if k not in _FIELDS]
  if bad:
    raise ValueError(f"filters: unknown field {bad[0]!r}; allowed: {', '.join(_FIELDS)}")
  return tuple(n for n, a in ALGORITHMS.items()
               if all(getattr(a, k) == v for k, v in filters.items()))


def stack_only() -> tuple[str, ...]:
  """The merges the studies run that need nothing beyond the stack and a key: ('average',
  'task_arithmetic', 'ties', 'dare_average', 'dare_task_arithmetic', 'dare_ties',
  'uniform_soup', 'model_stock', 'tsv_m', 'iso_c', 'breadcrumbs', 'magmax', 'iso_cts',
  'della')."""
  return tuple(n for n in names(excluded=None) if set(ALGORITHMS[n].needs) <= {"key"})


def data_merges() -> tuple[str, ...]:
  """The merges the studies run that need per-expert data: ('fisher', 'regmean',
  'adamerging_task', 'adamerging_layer', 'greedy_soup', 'regmean_plusplus')."""
  return names(excluded=None, data_dependent=True)


def compare_names() -> tuple[str, ...]:
  """What the compare study may run: `stack_only()`, `data_merges()`, then `ENSEMBLE`."""
  return stack_only() + data_merges() + (ENSEMBLE,)
