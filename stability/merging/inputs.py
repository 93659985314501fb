"""The one place that builds the inputs each registered merge `needs`, for the studies.

`MergeData` holds the per-row data of the data-dependent merges (rows of the twin-extended
expert stack); `merge_fns(names, key=, model=, params=, spec=, data=)` turns registry names into
`twins.MergeFn`s `(x0, stack, groups, group_ids) -> merged`, building each input once and only
when a requested merge needs it:

  key         the given jax.random key
  fishers     `data_aware.diag_fisher` per row on its labelled samples (data.x, data.y)
  grams       `data_aware.gram_matrices` per row on the same samples
  unlabelled  the task's test inputs (data.x_test, data.mask_test) with each row's head
  heldout     the task's ghost pool (data.x_val, data.y_val, data.mask_val) with each row's head
  samples     the model and each row's own labelled samples' inputs (data.x, data.mask): the
              Gram samples of RegMean++, which takes them under the merged model
  weights     not built: pass it per merge in `hparams`
  losses      not built (each row's training loss, which the study holds): pass it per merge
              in `hparams`, e.g. {'metrics_weighted': {'losses': losses_E}}

`ensemble_metrics` scores the logit ensemble (the compare study's non-merged reference).
This module imports `stability.twins`, which imports `stability.merging`: so the package
loads it lazily (`merging.inputs` on first access), and nothing in the package (nor twins)
imports it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from stability import twins as twins_lib
from stability.merging import registry
from stability.merging.data_aware import diag_fisher, gram_matrices
from stability.merging.ensemble import ensemble

if TYPE_CHECKING:
  from stability import experts as experts_lib
  from stability import data as data_lib


@dataclasses.dataclass
class MergeData:
  """Per-row data of the data-dependent merges (rows of the twin-extended expert stack).

  Labelled: the first `samples` positions of each row's own training subset (so a twin's
  Fisher/Gram statistics see its replaced sample when j < samples). Unlabeled (AdaMerging) and
  test (ensemble): the task's test inputs. Held-out (greedy soup): the task's ghost pool.
  """
  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  mask_test: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  mask_val: np.ndarray

  @classmethod
  def build(cls, spec: experts_lib.Experts, arrays: data_lib.TaskArrays, samples: int):
    t = spec.task[:, None]
    pos = np.arange(min(samples, spec.subset.shape[1]))
    rows = spec.subset[:, pos]
    Q = arrays.x_test.shape[1]
    V = int(np.max(arrays.n_ghost))
    val_rows = arrays.n_train[spec.task][:, None] + np.arange(V)
    val_rows = np.minimum(val_rows, arrays.x_pool.shape[1] - 1)
    return cls(x=arrays.x_pool[t, rows], y=arrays.y_pool[t, rows],
               mask=(pos[None] < spec.n[:, None]).astype(np.float32),
               x_test=arrays.x_test[spec.task], y_test=arrays.y_test[spec.task],
               mask_test=(np.arange(Q)[None] < arrays.n_test[spec.task][:, None]).astype(
                   np.float32),
               x_val=arrays.x_pool[t, val_rows], y_val=arrays.y_pool[t, val_rows],
               mask_val=(np.arange(V)[None] < arrays.n_ghost[spec.task][:, None]).astype(
                   np.float32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def per_row(fn, model, *xs):
  """fn(model, *row) over the leading (row) axis of xs in batches of 8, so per-example
  intermediates stay bounded; `fn` is a module-level function, so this compiles once per
  shape, not once per milestone."""
  return jax.lax.map(lambda r: fn(model, *r), xs, batch_size=8)


BUILT = ("key", "fishers", "grams", "unlabelled", "heldout", "samples")  # built here


def _build(need: str, *, key, model, params, nc, data: MergeData | None) -> dict[str, Any]:
  """Keyword arguments that supply input `need` (see the module docstring); nc [E] the rows'
  num_classes."""
  if need == "key":
    return dict(key=key)
  if need == "fishers":
    return dict(fishers=per_row(diag_fisher, model, params, data.x, data.y, jnp.asarray(nc),
                                data.mask))
  if need == "grams":
    return dict(grams=per_row(gram_matrices, model, params["backbone"], data.x, data.mask))
  if need == "unlabelled":
    return dict(model=model, heads=params["head"], x=data.x_test, num_classes=nc,
                mask=data.mask_test)
  if need == "samples":
    return dict(model=model, x=data.x, mask=data.mask)
  if need == "heldout":
    return dict(model=model, heads=params["head"], x=data.x_val, y=data.y_val, num_classes=nc,
                mask=data.mask_val)
  raise ValueError(f"{need}: not built here; pass it per merge in hparams")


def merge_fns(names: Iterable[str], *, key: Any = None, model: Any = None, params: Any = None,
              spec: experts_lib.Experts | None = None, data: MergeData | None = None,
              hparams: dict[str, dict] | None = None) -> dict[str, twins_lib.MergeFn]:
  """Every named merge as `(x0, stack, groups, group_ids) -> merged` (`twins.merge_fn`).

  Each merge gets the inputs its registry entry `needs`, built once from key, model, params
  ({'backbone', 'head'} stacks [E, ...]), spec (the `Experts` of those rows: their
  num_classes) and data (`MergeData` of the same rows); Fisher and Gram statistics are
  computed only when a named merge needs them, and merges that need only the stack and a key
  need no model, params, spec or data. hparams: per merge name, extra keyword arguments (e.g.
  {'adamerging_task': {'steps': 100}}), which override built inputs. `ENSEMBLE` is skipped
  (not a merge: see `ensemble_metrics`).
  """
  names = [n for n in names if n != registry.ENSEMBLE]
  hparams = dict(hparams or {})
  for n in list(names) + list(hparams):
    registry.algorithm(n)  # unknown names raise the registry's error
  needs = {nd for n in names for nd in registry.ALGORITHMS[n].needs}
  if "key" in needs and key is None:
    raise ValueError(f"key: {', '.join(n for n in names if registry.ALGORITHMS[n].random)} "
                     "draw random numbers; pass a jax.random key")
  data_needs = [nd for nd in BUILT[1:] if nd in needs]
  if data_needs and (model is None or params is None or spec is None or data is None):
    raise ValueError(f"data: the merges need {', '.join(data_needs)}; pass model, params, spec "
                     "and data (MergeData)")
  nc = None if spec is None else spec.num_classes
  built = {nd: _build(nd, key=key, model=model, params=params, nc=nc, data=data)
           for nd in BUILT if nd in needs}
  out = {}
  for n in names:
    kw = {k: v for nd in registry.ALGORITHMS[n].needs if nd in built
          for k, v in built[nd].items()}
    kw.update(hparams.get(n, {}))
    missing = [nd for nd in registry.ALGORITHMS[n].needs if nd not in built and nd not in kw]
    if missing:
      raise ValueError(f"hparams: {n} needs {missing[0]!r} ({registry.INPUTS[missing[0]]}); "
                       f"pass hparams={{{n!r}: {{{missing[0]!r}: ...}}}}")
    out[n] = twins_lib.merge_fn(n, **kw)
  return out


def ensemble_metrics(model, x0, params, groups, spec: experts_lib.Experts,
                     data: MergeData) -> dict[str, np.ndarray]:
  """Test accuracy and loss [G] of each group's logit ensemble (mean over member tasks)."""
  logits = ensemble(x0, params["backbone"], groups, model=model, heads=params["head"],
                    x=data.x_test, num_classes=spec.num_classes)
  y = data.y_test[groups]                                     # [G, M, Q]
  m = data.mask_test[groups]
  logp = np.asarray(jax.nn.log_softmax(logits))
  loss = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  acc = np.argmax(logp, axis=-1) == y
  per = lambda v: ((v * m).sum(-1) / m.sum(-1)).mean(-1)
  return dict(test_acc=per(acc), test_loss=per(loss))
