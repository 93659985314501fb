"""Wave planner: eval_shape memory estimates equal real allocations; waves partition configs."""
import jax
import numpy as np
import pytest

from stability import experts as experts_lib
from stability import models
from stability import planner
from stability import data
from stability import train

SUITE = data.get_suite("tiny", 0)


@pytest.mark.parametrize("name,kw,optimizer", [("mlp", {"widths": (16, 8)}, "sgd"),
                                               ("cnn", {"channels": (4,), "width": 8}, "adam")])
def test_state_bytes_equal_a_real_expert_state(name, kw, optimizer):
  model = models.get_model(name, SUITE.max_classes, **kw)
  spec = experts_lib.make_experts(SUITE, task=[0], eta=[0.1], b=[4], K=[1], data_ratio=[1.0],
                                  seed=[0])
  bb = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  state = train.init_state(optimizer, experts_lib.init_stack(model, bb, spec, SUITE.image_shape),
                           spec)
  real = sum(a.nbytes for a in jax.tree.leaves((state.params, state.opt_state)))
  step_counters = sum(a.nbytes for a in jax.tree.leaves((state.step, state.diverged_at)))
  est = planner.expert_bytes(model, optimizer, SUITE.image_shape, b_max=4)
  # the optimizer's scalar hyperparameters are per expert in the stack, as in one expert's init
  assert est["state"] == real
  assert step_counters == 8 and est["total"] == 3 * est["state"] + max(est["batch"], est["eval"])


def test_activation_bytes_scale_with_the_batch():
  model = models.get_model("mlp", SUITE.max_classes, widths=(16,))
  a = planner.expert_bytes(model, "sgd", SUITE.image_shape, b_max=8, eval_block=8)
  b = planner.expert_bytes(model, "sgd", SUITE.image_shape, b_max=16, eval_block=8)
  # per sample: input 36 + hidden 16 (Dense out, relu out) + logits, float32; x2 for backward
  assert b["batch"] == 2 * a["batch"] and a["batch"] == 2 * a["eval"]


def test_train_flops_match_the_matmul_count_of_a_linear_model():
  model = models.get_model("linear", 10)
  b, d, c = 32, 36, 10
  flops = planner.train_flops(model, (6, 6, 1), b)
  # forward x @ W (2bdc) and the weight gradient x^T @ dlogits (2bdc), plus elementwise work
  assert 4 * b * d * c <= flops <= 6 * b * d * c


def _plan(**kw):
  model = models.get_model("mlp", SUITE.max_classes, widths=(16,))
  args = dict(configs=7, experts_per_config=5, b_max=8, milestones=(10, 20), groups=21,
              memory_gb=1.0, devices=2)
  return planner.plan(model, "sgd", SUITE.image_shape, **{**args, **kw})


def test_waves_partition_whole_configs_within_the_budget():
  per = planner.expert_bytes(models.get_model("mlp", SUITE.max_classes, widths=(16,)), "sgd",
                             SUITE.image_shape, 8)["total"]
  gb = 12 * per / planner.FRACTION / planner.GB  # 12 experts per device, 24 on 2 devices
  p = _plan(memory_gb=gb)
  assert [list(w) for w in p.waves] == [[0, 1, 2, 3], [4, 5, 6]]  # 4 configs x 5 = 20 <= 24
  assert _plan(max_wave=10).waves == ((0, 1), (2, 3), (4, 5), (6,))
  assert _plan().waves == (tuple(range(7)),)
  text = _plan(max_wave=10).describe()
  assert "waves         4 of 5, 10 experts" in text and "experts       35 (7 configs x 5)" in text


def test_plans_that_cannot_fit_fail_naming_the_field():
  with pytest.raises(ValueError, match="train.memory_gb: one config's 5 experts need"):
    _plan(memory_gb=1e-6)
  with pytest.raises(ValueError, match="train.max_wave: must be 0 or >= 5"):
    _plan(max_wave=4)
  with pytest.raises(ValueError, match="train.max_wave: must be >= 0"):
    _plan(max_wave=-1)


def test_device_memory_prefers_the_configured_budget():
  assert planner.device_memory(2.0) == (2 * planner.GB, "train.memory_gb")
  n, source = planner.device_memory()
  assert n > 0 and source
