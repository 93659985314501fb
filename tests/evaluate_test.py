"""Evaluation equals a direct numpy-style computation; merged members pair backbone and head."""
import jax
import jax.numpy as jnp
import numpy as np

from stability import data, evaluate, experts as experts_lib, models, sharding

SUITE = data.get_suite("tiny", 0)
MODEL = models.get_model("mlp", SUITE.max_classes, widths=(8,))


def test_evaluate_equals_direct_computation_on_8_devices():
  bb = MODEL.init_backbone(jax.random.key(0), SUITE.image_shape)
  spec = experts_lib.make_experts(SUITE, task=[0, 1, 2], eta=0.1, b=2, K=1,
                                  data_ratio=[1.0, 0.5, 0.7], seed=[0, 1, 2])
  params = experts_lib.init_stack(MODEL, bb, spec, SUITE.image_shape)
  got = evaluate.evaluate(MODEL, params, spec, evaluate.EvalData.from_arrays(SUITE.arrays()),
                          block=3)
  for e in range(3):
    t = SUITE.tasks[spec.task[e]]
    p = jax.tree.map(lambda a: a[e], params)
    rows = spec.subset[e, :spec.n[e]]
    l_tr, c_tr = models.per_sample_loss(MODEL, p, t.x_train[rows], t.y_train[rows], t.num_classes)
    l_te, c_te = models.per_sample_loss(MODEL, p, t.x_test, t.y_test, t.num_classes)
    np.testing.assert_allclose(got["train_loss"][e], np.mean(l_tr), rtol=1e-5)
    np.testing.assert_allclose(got["test_acc"][e], np.mean(c_te), rtol=1e-6)
    np.testing.assert_allclose(got["gap"][e], np.mean(l_te) - np.mean(l_tr), rtol=1e-4, atol=1e-6)


def test_member_params_pair_group_backbone_with_member_heads():
  stack = {"backbone": {"w": jnp.arange(2.0)[:, None]}, "head": {"v": jnp.arange(4.0)[:, None]}}
  merged = {"w": jnp.array([[10.0], [20.0]])}
  groups = np.array([[0, 3], [1, 2]])
  p = evaluate.member_params(merged, stack["head"], groups)
  np.testing.assert_array_equal(p["backbone"]["w"][:, 0], [10, 10, 20, 20])
  np.testing.assert_array_equal(p["head"]["v"][:, 0], [0, 3, 1, 2])


def test_masked_logits_never_predict_missing_classes():
  logits = jnp.array([[0.0, 1.0, 5.0]])
  out = models.masked_logits(logits, 2)
  assert int(jnp.argmax(out)) == 1 and float(jax.nn.softmax(out)[0, 2]) == 0.0
