"""stability.merging.inputs: merge_fns wires each merge to the inputs its registry entry needs
(== calling the merge with hand-built inputs, exactly), builds statistics only when needed,
and fails clearly on missing inputs; MergeData.build picks the documented rows; the ensemble
metrics."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging
from stability.merging import inputs
from tests.merging.helpers import setup

GROUPS = np.array([[0, 1, 2], [3, 4, 0], [2, 3, 4]], np.int32)
IDS = np.array([0, 1, 2], np.int32)


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differ(a, b):
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _study():
  """The tiny MLP experts with distinct labelled, test and held-out data per row (a mix-up of
  any two of them changes the results), as the compare study hands them to merge_fns."""
  model, x0, stack, heads, x, y, nc, mask = setup()
  rng = np.random.default_rng(1)
  E, N = y.shape
  other = lambda: rng.uniform(0, 1, x.shape).astype(np.float32)
  labels = lambda: (rng.integers(0, 6, (E, N)) % nc[:, None]).astype(np.int32)
  pad = lambda k: (np.arange(N)[None] < N - np.arange(E)[:, None] % k).astype(np.float32)
  md = inputs.MergeData(x=x, y=y, mask=mask, x_test=other(), y_test=labels(), mask_test=pad(2),
                        x_val=other(), y_val=labels(), mask_val=pad(3))
  spec = types.SimpleNamespace(num_classes=nc)
  return model, x0, {"backbone": stack, "head": heads}, spec, md


def test_merge_fns_equal_the_merges_called_with_hand_built_inputs():
  """Rejects wiring the wrong data to a merge (labelled vs test vs held-out rows, masks, labels),
  the wrong params to the statistics, a different key, or dropping the per-merge hparams."""
  model, x0, params, spec, md = _study()
  key = jax.random.key(4)
  names = ["fisher", "regmean", "adamerging_task", "greedy_soup", "dare_ties", "ties"]
  fns = inputs.merge_fns(names, model=model, params=params, spec=spec, data=md, key=key,
                         hparams={"adamerging_task": {"steps": 3}})
  assert list(fns) == names
  nc, stack, heads = spec.num_classes, params["backbone"], params["head"]
  fishers = inputs.per_row(merging.diag_fisher, model, params, md.x, md.y, jnp.asarray(nc),
                           md.mask)
  grams = inputs.per_row(merging.gram_matrices, model, stack, md.x, md.mask)
  unlabelled = dict(model=model, heads=heads, x=md.x_test, num_classes=nc, mask=md.mask_test)
  heldout = dict(model=model, heads=heads, x=md.x_val, y=md.y_val, num_classes=nc,
                 mask=md.mask_val)
  want = {
      "fisher": merging.fisher(x0, stack, GROUPS, fishers=fishers),
      "regmean": merging.regmean(x0, stack, GROUPS, grams=grams),
      "adamerging_task": merging.adamerging(x0, stack, GROUPS, key=key, steps=3,
                                            granularity="task", group_ids=IDS, **unlabelled),
      "greedy_soup": merging.greedy_soup(x0, stack, GROUPS, **heldout),
      "dare_ties": merging.dare(x0, stack, GROUPS, key=key, base="ties", group_ids=IDS),
      "ties": merging.ties(x0, stack, GROUPS),
  }
  for name in names:
    _same(fns[name](x0, stack, GROUPS, IDS), want[name])
  # The setup can tell the data apart: other rows would give other merges.
  assert _differ(merging.greedy_soup(x0, stack, GROUPS, **dict(heldout, x=md.x_test)),
                 want["greedy_soup"])
  assert _differ(merging.adamerging(x0, stack, GROUPS, key=key, steps=3, group_ids=IDS,
                                    **dict(unlabelled, x=md.x)), want["adamerging_task"])
  assert _differ(merging.fisher(x0, stack, GROUPS, fishers=inputs.per_row(
      merging.diag_fisher, model, params, md.x_val, md.y_val, jnp.asarray(nc), md.mask_val)),
                 want["fisher"])


def test_per_row_is_the_function_on_every_row():
  model, x0, params, spec, md = _study()
  grams = inputs.per_row(merging.gram_matrices, model, params["backbone"], md.x, md.mask)
  for e in (0, 1, 4):
    want = merging.gram_matrices(model, jax.tree.map(lambda a: a[e], params["backbone"]),
                                 md.x[e], md.mask[e])
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[e], grams)),
                    jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_statistics_are_built_only_for_the_merges_that_need_them(monkeypatch):
  """Rejects building Fishers and Grams for every call (the costly part at scale)."""
  model, x0, params, spec, md = _study()
  calls = []
  real = inputs.per_row
  monkeypatch.setattr(inputs, "per_row", lambda fn, *a: calls.append(fn) or real(fn, *a))
  inputs.merge_fns(merging.stack_only() + ("adamerging_layer", "greedy_soup", "ensemble"),
                   model=model, params=params, spec=spec, data=md, key=jax.random.key(0))
  assert calls == []
  inputs.merge_fns(["fisher", "regmean", "average"], model=model, params=params, spec=spec,
                   data=md, key=jax.random.key(0))
  assert sorted(f.__name__ for f in calls) == ["diag_fisher", "gram_matrices"]


def test_stack_only_merges_need_only_a_key():
  """The stability study's call: no model, params or data; DARE gets the key and group ids."""
  _, x0, stack = setup()[:3]
  key = jax.random.key(2)
  fns = inputs.merge_fns(merging.stack_only(), key=key)
  assert tuple(fns) == merging.stack_only()
  _same(fns["dare_average"](x0, stack, GROUPS, IDS[::-1]),
        merging.dare(x0, stack, GROUPS, key=key, base="average", group_ids=IDS[::-1]))
  _same(fns["model_stock"](x0, stack, GROUPS, IDS), merging.model_stock(x0, stack, GROUPS))


def test_missing_inputs_fail_clearly():
  model, x0, params, spec, md = _study()
  with pytest.raises(ValueError, match=r"key: dare_ties draw random numbers"):
    inputs.merge_fns(["ties", "dare_ties"])
  with pytest.raises(ValueError, match=r"data: the merges need fishers; pass model, params"):
    inputs.merge_fns(["fisher"], key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"algorithm: unknown merge 'mean'; allowed:"):
    inputs.merge_fns(["mean"])
  with pytest.raises(ValueError, match=r"algorithm: unknown merge 'adamerging_tasks'"):
    inputs.merge_fns(["average"], hparams={"adamerging_tasks": {"steps": 1}})
  with pytest.raises(ValueError, match=r"hparams: weighted_average needs 'weights'"):
    inputs.merge_fns(["weighted_average"])
  w = np.array([[1.0, 2.0, 1.0]] * 3)
  fn = inputs.merge_fns(["weighted_average"], hparams={"weighted_average": {"weights": w}})
  _same(fn["weighted_average"](x0, params["backbone"], GROUPS, IDS),
        merging.weighted_average(x0, params["backbone"], GROUPS, w))
  # Training losses are passed per call like weights: no model or data needed (rejects building
  # them from MergeData, or demanding data for an input the study hands over).
  with pytest.raises(ValueError, match=r"hparams: metrics_weighted needs 'losses'"):
    inputs.merge_fns(["metrics_weighted"])
  lo = np.linspace(0.2, 1.0, 5)
  fn = inputs.merge_fns(["metrics_weighted"], hparams={"metrics_weighted": {"losses": lo}})
  _same(fn["metrics_weighted"](x0, params["backbone"], GROUPS, IDS),
        merging.metrics_weighted(x0, params["backbone"], GROUPS, losses=lo))


def test_merge_data_build_takes_the_documented_rows():
  """Labelled rows: the row's own subset positions; test rows: its task's; held-out rows: its
  task's ghost pool (after the train rows), padded and masked."""
  T, P, Q = 2, 10, 4
  x_pool = np.arange(T * P, dtype=np.float32).reshape(T, P, 1, 1, 1)
  arrays = types.SimpleNamespace(
      x_pool=x_pool, y_pool=x_pool[..., 0, 0, 0].astype(np.int32), n_train=np.array([5, 8]),
      n_ghost=np.array([3, 2]), x_test=100 + np.arange(T * Q, dtype=np.float32).reshape(
          T, Q, 1, 1, 1), y_test=np.arange(T * Q).reshape(T, Q), n_test=np.array([4, 3]))
  spec = types.SimpleNamespace(task=np.array([0, 1, 1]), n=np.array([3, 2, 1]),
                               subset=np.array([[4, 0, 2], [5, 1, 3], [2, 2, 0]]))
  md = inputs.MergeData.build(spec, arrays, samples=2)
  np.testing.assert_array_equal(md.y, [[4, 0], [15, 11], [12, 12]])
  np.testing.assert_array_equal(md.mask, [[1, 1], [1, 1], [1, 0]])
  np.testing.assert_array_equal(md.y_test, arrays.y_test[[0, 1, 1]])
  np.testing.assert_array_equal(md.mask_test, [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  # task 1's ghost rows 8, 9 then padding, clipped to the last pool row
  np.testing.assert_array_equal(md.y_val, [[5, 6, 7], [18, 19, 19], [18, 19, 19]])
  np.testing.assert_array_equal(md.mask_val, [[1, 1, 1], [1, 1, 0], [1, 1, 0]])
  assert md.x.shape == (3, 2, 1, 1, 1) and md.x_val.shape == (3, 3, 1, 1, 1)


def test_ensemble_metrics_score_the_ensemble_logits():
  model, x0, params, spec, md = _study()
  out = inputs.ensemble_metrics(model, x0, params, GROUPS, spec, md)
  logits = np.asarray(merging.ensemble(x0, params["backbone"], GROUPS, model=model,
                                       heads=params["head"], x=md.x_test,
                                       num_classes=spec.num_classes), np.float64)
  for g, rows in enumerate(GROUPS):
    acc, loss = [], []
    for t, i in enumerate(rows):
      m = md.mask_test[i] > 0
      lg = logits[g, t][m]
      logp = lg - lg.max(-1, keepdims=True)
      logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
      yi = md.y_test[i][m]
      acc.append(np.mean(np.argmax(lg, -1) == yi))
      loss.append(-np.mean(logp[np.arange(len(yi)), yi]))
    np.testing.assert_allclose(out["test_acc"][g], np.mean(acc), atol=1e-6)
    np.testing.assert_allclose(out["test_loss"][g], np.mean(loss), rtol=1e-5)
