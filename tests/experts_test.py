"""Expert specs: validation before compute, subsets, stack init."""
import jax
import numpy as np
import pytest

from stability import experts as experts_lib
from stability import data, models

SUITE = data.get_suite("tiny", 0)


def make(**kw):
  args = dict(task=[0, 1], eta=[0.1, 0.1], b=[4, 4], K=10, data_ratio=[1.0, 0.5], seed=[0, 1])
  args.update(kw)
  return experts_lib.make_experts(SUITE, **args)


@pytest.mark.parametrize("kw,field", [
    (dict(eta=[0.0, 0.1]), "eta"), (dict(eta=[-1.0, 0.1]), "eta"),
    (dict(eta=[float("nan"), 0.1]), "eta"), (dict(b=[4, 1000]), "b"), (dict(b=[0, 4]), "b"),
    (dict(data_ratio=[0.0, 1.0]), "data_ratio"), (dict(data_ratio=[1.2, 1.0]), "data_ratio"),
    (dict(task=[0, 99]), "task"), (dict(K=-1), "K"), (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay")])
def test_bad_input_names_the_field(kw, field):
  with pytest.raises(ValueError, match=f"^{field}: "):
    make(**kw)


def test_subsets_match_task_pools_and_sizes():
  spec = make()
  for e in range(spec.size):
    t = spec.task[e]
    n_train = SUITE.tasks[t].n_train
    assert spec.n[e] == data.subset_size(n_train, float(spec.data_ratio[e]))
    sub = spec.subset[e, :spec.n[e]]
    assert len(set(sub)) == spec.n[e] and sub.max() < n_train  # never a ghost row


def test_init_stack_shares_backbone_and_keys_heads_by_seed():
  model = models.get_model("mlp", SUITE.max_classes, widths=(8,))
  bb = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  spec = make(seed=[5, 5], data_ratio=[1.0, 1.0])
  p = experts_lib.init_stack(model, bb, spec, SUITE.image_shape)
  for leaf, ref in zip(jax.tree.leaves(p["backbone"]), jax.tree.leaves(bb)):
    np.testing.assert_array_equal(leaf[0], ref)
    np.testing.assert_array_equal(leaf[1], ref)
  h = jax.tree.leaves(p["head"])
  assert all(np.array_equal(x[0], x[1]) for x in h)  # same seed -> same head
  q = experts_lib.init_stack(model, bb, make(seed=[5, 6]), SUITE.image_shape)
  assert not all(np.array_equal(x[0], x[1]) for x in jax.tree.leaves(q["head"]))


def test_concat_rebases_origin_and_pads_subsets():
  a, b = make(), make(data_ratio=[0.5, 0.5])
  c = experts_lib.concat(a, b)
  assert c.size == 4 and list(c.origin) == [0, 1, 2, 3]
  assert c.subset.shape[1] == max(a.subset.shape[1], b.subset.shape[1])
