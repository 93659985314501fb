"""Real-scale backbones: published parameter counts; BatchNorm under the vmapped trainer
(vmapped and padded == each expert alone, unpadded; frozen statistics stay x_0's); merging
BatchNorm statistics (average, frozen, recompute)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import experts as experts_lib
from stability import merging
from stability import models
from stability import sharding
from stability import data
from stability import train

SUITE = data.get_suite("tiny", 0)
POOLS = train.Pools.from_arrays(SUITE.arrays())
ONE_DEVICE = sharding.expert_mesh(jax.devices()[:1])
TINY_RESNET = dict(stem="cifar", width=4, stage_sizes=(1, 1))


def resnet(norm="batch"):
  return models.get_model("resnet18", SUITE.max_classes, norm=norm, **TINY_RESNET)


def make(**kw):
  args = dict(task=(0, 1, 2), eta=(0.05, 0.02, 0.1), b=(4, 8, 4), K=STEPS, data_ratio=1.0,
              seed=(0, 1, 2))
  return experts_lib.make_experts(SUITE, **{**args, **kw})


STEPS = 8


@functools.lru_cache(maxsize=None)
def trained(norm="batch"):
  """(model, spec, x_0 backbone, params [E] after STEPS steps of the vmapped trainer)."""
  model, spec = resnet(norm), make()
  backbone = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  trainer = train.Trainer(model, "sgd", spec, POOLS, mesh=ONE_DEVICE, max_chunk=STEPS)
  params = experts_lib.init_stack(model, backbone, spec, SUITE.image_shape)
  (_, state), = trainer.run(trainer.init(params), [STEPS])
  return model, spec, backbone, trainer.unpad(state.params)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def row(tree, e):
  return jax.tree.map(lambda a: a[e], tree)


def n_params(model, image_shape):
  shapes = jax.eval_shape(lambda: (lambda bb: (bb, model.init_head(jax.random.key(1), bb,
                                                                   image_shape)))(
      model.init_backbone(jax.random.key(0), image_shape)))
  bb, head = shapes
  trainable = bb["params"] if model.state else bb
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves((trainable, head)))


@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512), ("resnet50", 25_557_032), ("vit_ti16", 5_717_416),
    ("vit_s16", 22_050_664), ("vit_b16", 86_567_656), ("vit_b32", 88_224_232)])
def test_parameter_counts_match_torchvision_and_timm(name, count):
  # torchvision.models.resnet18/50() and timm vit_*_patch{16,32}_224: 1000 classes, 224x224.
  assert n_params(models.get_model(name, 1000), (224, 224, 3)) == count


def test_bad_model_options_raise_before_compute():
  with pytest.raises(ValueError, match="model.norm"):
    models.get_model("resnet18", 10, norm="layer")
  with pytest.raises(ValueError, match="model.stem"):
    models.get_model("resnet50", 10, stem="tiny")
  with pytest.raises(ValueError, match="dim % heads"):
    models.get_model("vit_s16", 10, dim=100, heads=3)
  with pytest.raises(ValueError, match="image_shape"):
    models.get_model("vit_ti16", 10, depth=1).init_backbone(jax.random.key(0), (20, 20, 3))


def test_batchnorm_trainer_equals_each_expert_alone_unpadded():
  # The stack pads every batch to b_max = 8 (expert 1's b); experts 0 and 2 (b = 4) alone run
  # unpadded. Equal results need per-expert statistics under vmap AND a BatchNorm that ignores
  # padding rows (without the mask they would enter experts 0 and 2's batch statistics).
  model, spec, backbone, got = trained()
  step = jax.jit(functools.partial(train.train_step, model, "sgd"))
  N = spec.subset.shape[1]
  params = experts_lib.init_stack(model, backbone, spec, SUITE.image_shape)
  for e in (0, 2):
    one = spec.take(np.array([e]))
    state = row(train.init_state("sgd", jax.tree.map(lambda a: a[e:e + 1], params), one), 0)
    ex = jax.tree.map(lambda a: jnp.asarray(a[0]), one)
    for k in range(STEPS):
      pos, mask = train.batch_positions(ex.seed, k, ex.n, ex.b, int(spec.b[e]), N)
      state, _ = step(state, ex, POOLS, pos, mask)
    assert max_diff(row(got, e), state.params) < 1e-5, f"expert {e}"
  # Each expert has its own statistics, moved away from x_0's.
  stats = got["backbone"]["batch_stats"]["bn1"]["mean"]
  assert max_diff(stats[0], stats[1]) > 1e-3 and max_diff(stats[0], np.zeros(4)) > 1e-3


def test_running_statistics_follow_the_momentum_formula_over_real_rows():
  model = resnet()
  bb = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  params = {"backbone": bb, "head": model.init_head(jax.random.key(1), bb, SUITE.image_shape)}
  x = jnp.asarray(SUITE.tasks[0].x_train[:6])
  mask = jnp.array([True, True, True, True, False, False])
  _, new = model.apply_train(params, x, mask)
  conv = jax.lax.conv_general_dilated(x, bb["params"]["conv1"]["kernel"], (1, 1),
                                      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  mean = np.asarray(conv[:4]).mean(axis=(0, 1, 2))
  var = np.asarray(conv[:4]).var(axis=(0, 1, 2))
  got = new["backbone"]["batch_stats"]["bn1"]
  np.testing.assert_allclose(got["mean"], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(got["var"], 0.9 + 0.1 * var, atol=1e-6)
  assert max_diff(new["backbone"]["params"], bb["params"]) == 0.0


def test_frozen_batch_keeps_x0_statistics_and_trains_the_rest():
  model = resnet("frozen_batch")
  assert model.state == ("batch_stats",)
  bb = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  bb = {**bb, "batch_stats": jax.tree.map(lambda a: a * 1.5 + 0.05, bb["batch_stats"])}
  params = {"backbone": bb, "head": model.init_head(jax.random.key(1), bb, SUITE.image_shape)}
  x, y = jnp.asarray(SUITE.tasks[0].x_train[:5]), jnp.asarray(SUITE.tasks[0].y_train[:5])
  logits, new = model.apply_train(params, x, jnp.ones(5, bool))
  # Statistics stay x_0's, and training normalises with them: one forward for both modes.
  assert max_diff(new["backbone"]["batch_stats"], bb["batch_stats"]) == 0.0
  np.testing.assert_allclose(logits, model.apply(params, x), atol=1e-6)
  loss = lambda p: models.per_sample_loss(model, p, x, y, 4)[0].sum()
  grads = jax.grad(loss)(params)["backbone"]["params"]
  assert float(jnp.abs(grads["bn1"]["scale"]).sum()) > 0  # the affine part trains


@pytest.mark.parametrize("norm", ["group", "none"])
def test_stateless_norms_have_one_forward_for_training_and_evaluation(norm):
  model = resnet(norm)
  bb = model.init_backbone(jax.random.key(0), SUITE.image_shape)
  assert model.state == () and "batch_stats" not in bb
  assert ("bias" in bb["conv1"]) == (norm == "none")  # no norm: convolutions get a bias
  params = {"backbone": bb, "head": model.init_head(jax.random.key(1), bb, SUITE.image_shape)}
  x = jnp.asarray(SUITE.tasks[0].x_train[:5])
  logits, same = model.apply_train(params, x, jnp.ones(5, bool))
  assert same is params and max_diff(logits, model.apply(params, x)) == 0.0


def test_merging_batch_statistics():
  model, spec, x0, got = trained()
  stack = got["backbone"]
  groups = np.array([[0, 1, 2], [2, 0, 1]])
  merged = merging.average(x0, stack, groups)
  mean_stats = jax.tree.map(lambda a: np.mean(np.asarray(a), 0), stack["batch_stats"])
  # average: the plain mean of the members' statistics, which `average` already gives.
  for g in range(2):
    assert max_diff(row(merged, g)["batch_stats"], mean_stats) < 1e-6
    assert max_diff(row(merging.merge_batch_stats(merged, x0, stack, groups), g), row(merged, g)) \
        < 1e-6
  frozen = merging.merge_batch_stats(merged, x0, stack, groups, mode="frozen")
  assert max_diff(row(frozen, 1)["batch_stats"], x0["batch_stats"]) == 0.0
  assert max_diff(frozen["params"], merged["params"]) == 0.0
  # recompute: the merged backbone's own statistics on its members' real rows. One block
  # (batch_size >= rows) equals a single training-mode pass at momentum 0 over those rows.
  arrays = SUITE.arrays()
  x = arrays.x_pool[spec.task, :10]
  mask = np.ones((3, 10), np.float32)
  mask[1, 6:] = 0  # padded rows of expert 1 must not count
  re = merging.merge_batch_stats(merged, x0, stack, groups, mode="recompute", model=model, x=x,
                                 mask=mask, batch_size=64)
  rows = np.concatenate([x[0], x[1, :6], x[2]])
  net = model.backbone.clone(bn_momentum=0.0)
  _, ref = net.apply(row(merged, 0), jnp.asarray(rows), train=True, mutable=["batch_stats"])
  assert max_diff(row(re, 0)["batch_stats"], ref["batch_stats"]) < 1e-5
  assert max_diff(row(re, 0)["batch_stats"], row(re, 1)["batch_stats"]) < 1e-5  # same members
  # Blocks of 13 rows: the count-weighted mean of per-block statistics.
  blocked = merging.merge_batch_stats(merged, x0, stack, groups, mode="recompute", model=model,
                                      x=x, mask=mask, batch_size=13)
  means = []
  flat, fmask = x.reshape((30,) + x.shape[2:]), mask.reshape(30) > 0
  blocks = [(flat[i:i + 13], fmask[i:i + 13]) for i in range(0, 30, 13)]
  for xb, mb in blocks:
    _, s = net.apply(row(merged, 0), jnp.asarray(xb[mb]), train=True, mutable=["batch_stats"])
    means.append((mb.sum(), s["batch_stats"]))
  total = sum(c for c, _ in means)
  ref = jax.tree.map(lambda *a: sum(c * v for (c, _), v in zip(means, a)) / total,
                     *[s for _, s in means])
  assert max_diff(row(blocked, 0)["batch_stats"], ref) < 1e-5


def test_identical_experts_merge_to_themselves_including_statistics():
  _, _, x0, got = trained()
  stack = jax.tree.map(lambda a: jnp.stack([a[1], a[1], a[1]]), got["backbone"])
  groups = np.array([[0, 1, 2]])
  for name, kw in [("average", {}), ("task_arithmetic", dict(lam=1 / 3))]:
    merged = merging.merge(name, x0, stack, groups, **kw)
    assert max_diff(row(merged, 0), row(got["backbone"], 1)) < 1e-5, name
    merged = merging.merge_batch_stats(merged, x0, stack, groups)
    assert max_diff(row(merged, 0), row(got["backbone"], 1)) < 1e-5, name


def test_merge_batch_stats_bad_inputs():
  model, _, x0, got = trained()
  merged = merging.average(x0, got["backbone"], np.array([[0, 1]]))
  with pytest.raises(ValueError, match="mode"):
    merging.merge_batch_stats(merged, x0, got["backbone"], np.array([[0, 1]]), mode="ema")
  with pytest.raises(ValueError, match="x:"):
    merging.merge_batch_stats(merged, x0, got["backbone"], np.array([[0, 1]]), mode="recompute",
                              model=model)
  with pytest.raises(ValueError, match="x0"):
    mlp = models.get_model("mlp", 4, widths=(8,))
    bb = mlp.init_backbone(jax.random.key(0), SUITE.image_shape)
    st = jax.tree.map(lambda a: a[None], bb)
    merging.merge_batch_stats(st, bb, st, np.array([[0]]))
