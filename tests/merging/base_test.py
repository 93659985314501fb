"""stability.merging.base through every merge: bad inputs raise a clear ValueError before any
compute; identical experts merge to themselves; sharded stacks merge like unsharded ones."""
import jax
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import (GROUPS, assert_tree_close, identical, positive_like,
                                   random_grams, setup, trees)


@pytest.mark.parametrize("name,kw", [
    ("average", {}), ("weighted_average", {"weights": np.arange(1.0, 13.0).reshape(4, 3)}),
    ("ties", {"k": 1.0}), ("dare_average", {"key": jax.random.key(0), "p": 0.0, "k": 0.5}),
    ("model_stock", {}), ("uniform_soup", {}), ("fisher", "F"), ("regmean", "G")])
def test_identical_experts_merge_to_that_expert(name, kw):
  x0, stack = identical()
  if kw == "F":
    kw = {"fishers": positive_like(stack, 1), "eps": 1e-3}
  elif kw == "G":
    kw = {"grams": random_grams(7, 2)}
  got = merging.merge(name, x0, stack, GROUPS, **kw)
  assert_tree_close(got, jax.tree.map(lambda s: s[:4], stack), rtol=1e-5, atol=1e-5)


def _bad_cases():
  """(id, merge function, positional args, keyword args, expected message)."""
  x0, stack = trees()
  other = {**x0, "extra": np.zeros(2, np.float32)}
  wrong_shape = jax.tree.map(lambda s: s[..., :1] if s.ndim > 2 else s, stack)
  short_e = {**stack, "Conv_0": {"kernel": stack["Conv_0"]["kernel"][:3]}}
  key = jax.random.key(0)
  tasks = np.array([0, 1, 2, 0, 1, 2, 3])
  G = random_grams(7, 0)["Dense_0"]
  base = (x0, stack, GROUPS)
  pairs = (x0, stack, GROUPS[:, :2])
  avg, ties, dare, regmean = merging.average, merging.ties, merging.dare, merging.regmean
  return [
      ("structure", avg, (other, stack, GROUPS), {}, r"stack: tree structure"),
      ("shape", avg, (x0, wrong_shape, GROUPS), {}, r"stack: leaf .* has shape"),
      ("E", avg, (x0, short_e, GROUPS), {}, r"stack: leaves disagree on the expert axis E"),
      ("M=0", avg, (x0, stack, np.zeros((2, 0), np.int32)), {}, r"groups: empty group \(M=0\)"),
      ("1-D", avg, (x0, stack, np.array([0, 1])), {}, r"groups: must be a 2-D integer"),
      ("float", avg, (x0, stack, GROUPS * 1.0), {}, r"groups: must be a 2-D integer"),
      ("range", avg, (x0, stack, GROUPS + 1), {}, r"groups: indices must lie in \[0, E=7\)"),
      ("negative", ties, (x0, stack, -GROUPS), {}, r"groups: indices must lie"),
      ("repeat", avg, base, {"tasks": tasks}, r"groups: group 2 repeats a task"),
      ("tasks", avg, base, {"tasks": tasks[:3]}, r"tasks: must be an int array of shape"),
      ("weights", avg, base, {"weights": np.ones((4, 2))}, r"weights: must have shape"),
      ("weights<0", avg, base, {"weights": -np.ones((4, 3))}, r"weights: an average needs"),
      ("lam", merging.task_arithmetic, base, {"lam": -0.1}, r"lam: must be in \[0"),
      ("lam nan", ties, base, {"lam": float("nan")}, r"lam: must be"),
      ("k=0", ties, base, {"k": 0.0}, r"k: must be in \(0.0, 1.0\]"),
      ("k=20", ties, base, {"k": 20}, r"k: must be in \(0.0, 1.0\]"),
      ("p=1", dare, base, {"key": key, "p": 1.0}, r"p: must be in \[0.0, 1.0\)"),
      ("p<0", dare, base, {"key": key, "p": -0.1}, r"p: must be in"),
      ("key", dare, base, {"key": None}, r"key: .*explicit jax.random key"),
      ("base", dare, base, {"key": key, "base": "fisher"},
       r"base: unknown DARE base merge 'fisher'; allowed: average, task_arithmetic, ties"),
      ("t", merging.slerp, pairs, {"t": 1.5}, r"t: must be in \[0.0, 1.0\]"),
      ("pairs", merging.slerp, base, {}, r"groups: slerp merges pairs \(M=2\)"),
      ("stock M", merging.model_stock, (x0, stack, GROUPS[:, :1]), {},
       r"groups: model_stock needs M >= 2"),
      ("alpha", regmean, base, {"grams": {"Dense_0": G}, "alpha": 2.0}, r"alpha: must be in"),
      ("grams", regmean, base, {"grams": {"Dense_9": G}}, r"grams: Dense_9 names no Dense"),
      ("gram shape", regmean, base, {"grams": {"Dense_0": G[:, :3, :3]}},
       r"grams: Dense_0 has shape"),
      ("fishers", merging.fisher, base, {"fishers": jax.tree.map(lambda s: -s, stack)},
       r"fishers: must be finite and >= 0"),
      ("chunk", avg, base, {"chunk_size": 0}, r"chunk_size: must be a positive int or None"),
      ("name", merging.merge, ("mean",) + base, {}, r"algorithm: unknown merge 'mean'; allowed:"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_cases())),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_a_clear_value_error(case, monkeypatch):
  _, fn, args, kwargs, message = _bad_cases()[case]
  # Validation happens before any compute: nothing may be jitted on the way to the error.
  for module, private in ((merging.base, "linear_combination"), (merging.sparse, "_ties"),
                          (merging.sparse, "_dare"), (merging.data_aware, "_fisher"),
                          (merging.data_aware, "_regmean"), (merging.geometric, "_slerp"),
                          (merging.geometric, "_model_stock")):
    monkeypatch.setattr(module, private, lambda *a, **k: pytest.fail("computed before validating"))
  with pytest.raises(ValueError, match=message):
    fn(*args, **kwargs)


def test_data_dependent_bad_inputs():
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1]], np.int32)
  kw = dict(model=model, heads=heads, num_classes=nc, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"x: must be per-expert inputs \[E=5, N, ...\]"):
    merging.adamerging(x0, stack, groups, x=x[:2], **kw)
  with pytest.raises(ValueError, match=r"granularity: unknown 'block'; allowed: task, layer"):
    merging.adamerging(x0, stack, groups, x=x, granularity="block", **kw)
  with pytest.raises(ValueError, match=r"mask: every expert needs at least one real sample"):
    merging.adamerging(x0, stack, groups, x=x, mask=np.zeros_like(mask), **kw)
  with pytest.raises(ValueError, match=r"y: must be int labels"):
    merging.greedy_soup(x0, stack, groups, model=model, heads=heads, x=x, y=y[:, :2],
                        num_classes=nc)


@pytest.mark.parametrize("name,hp", [("average", {}), ("ties", dict(k=0.3)),
                                     ("dare_average", dict(key=jax.random.key(1), p=0.3))])
def test_stack_sharded_over_8_devices_merges_like_unsharded(name, hp):
  """The trainer returns stacks sharded over the expert axis; merges gather them first."""
  from stability import sharding
  x0, stack = trees(E=8)
  mesh = sharding.expert_mesh(jax.devices()[:8])
  sharded = sharding.shard(stack, mesh)
  assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
  want = merging.merge(name, x0, stack, GROUPS, **hp)
  got = merging.merge(name, x0, sharded, GROUPS, **hp)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
