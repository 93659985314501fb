"""Trainer equivalences: vmapped == loop, padded == alone, K-mask == shorter run, sharded ==
unsharded, determinism, NaN isolation, no recompiles, and a golden step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import experts as experts_lib
from stability import models
from stability import sharding
from stability import data
from stability import train

SUITE = data.get_suite("tiny", 0)
MODEL = models.get_model("mlp", SUITE.max_classes, widths=(16,))
POOLS = train.Pools.from_arrays(SUITE.arrays())
BACKBONE = MODEL.init_backbone(jax.random.key(0), SUITE.image_shape)
ONE_DEVICE = sharding.expert_mesh(jax.devices()[:1])


def make(task=(0, 1, 2, 3), eta=(0.1, 0.05, 0.2, 0.1), b=(4, 8, 5, 16), K=40, ratio=(1.0, 0.5,
         0.8, 1.0), seed=(0, 1, 2, 3), **kw):
  return experts_lib.make_experts(SUITE, task=task, eta=eta, b=b, K=K, data_ratio=ratio,
                                  seed=seed, **kw)


def run(spec, milestones=(20, 40), mesh=ONE_DEVICE, optimizer="sgd", max_chunk=10, block=None):
  trainer = train.Trainer(MODEL, optimizer, spec, POOLS, mesh=mesh, max_chunk=max_chunk,
                          block=block)
  params = experts_lib.init_stack(MODEL, BACKBONE, spec, SUITE.image_shape)
  snaps = {K: trainer.unpad(s) for K, s in trainer.run(trainer.init(params), milestones)}
  return snaps, trainer


def loop_reference(spec, steps, optimizer="sgd"):
  """Each expert alone, one jitted single-expert step at a time (no vmap, no scan)."""
  B, N = int(spec.b.max()), spec.subset.shape[1]
  step = jax.jit(functools.partial(train.train_step, MODEL, optimizer))
  params = experts_lib.init_stack(MODEL, BACKBONE, spec, SUITE.image_shape)
  out = []
  for e in range(spec.size):
    one = spec.take(np.array([e]))
    state = jax.tree.map(lambda a: a[0], train.init_state(
        optimizer, jax.tree.map(lambda a: a[e:e + 1], params), one))
    ex = jax.tree.map(lambda a: jnp.asarray(a[0]), one)
    for k in range(steps):
      pos, mask = train.batch_positions(ex.seed, k, ex.n, ex.b, B, N)
      state, _ = step(state, ex, POOLS, pos, mask)
    out.append(state)
  return out


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_vmapped_equals_per_expert_loop(optimizer):
  spec = make(eta=(0.05, 0.02, 0.1, 0.05) if optimizer == "sgd" else 1e-3)
  snaps, _ = run(spec, milestones=(20,), optimizer=optimizer)
  ref = loop_reference(spec, 20, optimizer)
  for e in range(spec.size):
    got = jax.tree.map(lambda a: a[e], snaps[20].params)
    assert max_diff(got, ref[e].params) < 1e-6, f"expert {e}"


def test_padded_batch_expert_equals_expert_alone():
  spec = make()  # b_max = 16; expert 1 has b = 8, expert 0 has b = 4
  snaps, _ = run(spec)
  for e in (0, 1):
    alone, _ = run(spec.take(np.array([e])))
    got = jax.tree.map(lambda a: a[e], snaps[40].params)
    assert max_diff(got, jax.tree.map(lambda a: a[0], alone[40].params)) < 1e-6


def test_batch_16_inside_padded_stack_equals_alone():
  spec = make(task=(0, 0), b=(16, 48), eta=(0.05, 0.05), ratio=(1.0, 1.0), seed=(3, 4))
  snaps, _ = run(spec)
  alone, _ = run(spec.take(np.array([0])))
  assert max_diff(jax.tree.map(lambda a: a[0], snaps[40].params),
                  jax.tree.map(lambda a: a[0], alone[40].params)) < 1e-6


def test_K_mask_equals_shorter_run():
  long_, _ = run(make(K=(20, 40, 20, 40)), milestones=(20, 40))
  short, _ = run(make(K=40), milestones=(20,))
  for e in (0, 2):  # K = 20: frozen after step 20
    a = jax.tree.map(lambda x: x[e], long_[40].params)
    assert max_diff(a, jax.tree.map(lambda x: x[e], short[20].params)) == 0.0
  assert max_diff(jax.tree.map(lambda x: x[1], long_[40].params),
                  jax.tree.map(lambda x: x[1], short[20].params)) > 0


def test_sharded_over_8_devices_equals_unsharded():
  assert len(jax.devices()) == 8
  spec = make(task=(0, 1, 2, 3, 0), eta=0.05, b=4, ratio=1.0, seed=(0, 1, 2, 3, 4))  # E=5 pads
  one, _ = run(spec, mesh=ONE_DEVICE)
  eight, trainer = run(spec, mesh=sharding.expert_mesh())
  assert trainer.mesh.size == 8
  leaf = jax.tree.leaves(eight[40].params)[0]
  assert max_diff(one[40].params, eight[40].params) < 1e-6
  assert jax.tree.leaves(one[40].params)[0].shape == leaf.shape


def test_same_seed_is_bit_identical():
  a, _ = run(make())
  b, _ = run(make())
  assert max_diff(a[40].params, b[40].params) == 0.0


def test_nan_in_one_expert_is_isolated():
  good, _ = run(make())
  bad, _ = run(make(eta=(0.1, 1e30, 0.2, 0.1)))
  d = np.asarray(bad[40].diverged_at)
  assert d[1] >= 0 and np.all(d[[0, 2, 3]] == -1)
  for e in (0, 2, 3):
    assert max_diff(jax.tree.map(lambda x: x[e], good[40].params),
                    jax.tree.map(lambda x: x[e], bad[40].params)) == 0.0
  frozen = jax.tree.map(lambda x: x[1], bad[40].params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(frozen))
  assert max_diff(frozen, jax.tree.map(lambda x: x[1], bad[20].params)) == 0.0


def _chunk_both_ways(spec, steps_before=0, C=10):
  """train_chunk's fast path and its checked path on the same chunk (after `steps_before`
  checked steps): (state, loss) of each."""
  B, N = int(spec.b.max()), spec.subset.shape[1]
  params = experts_lib.init_stack(MODEL, BACKBONE, spec, SUITE.image_shape)
  state = train.init_state("sgd", params, spec)
  ex = jax.tree.map(jnp.asarray, spec)
  positions = jax.vmap(functools.partial(train.chunk_positions, C=C, B=B, N=N,
                                         n_epochs=train.chunk_epochs(spec, C)))
  chunk = jax.jit(functools.partial(train.train_chunk, MODEL, "sgd"), static_argnames="fast")
  for _ in range(steps_before // C):
    state, _ = chunk(state, ex, POOLS, *positions(ex.seed, state.step, ex.n, ex.b), fast=False)
  pos, mask = positions(ex.seed, state.step, ex.n, ex.b)
  return [chunk(state, ex, POOLS, pos, mask, fast=f) for f in (True, False)]


@pytest.mark.parametrize("case", ["all active", "some idle", "K inside the chunk", "diverges",
                                  "diverged before"])
def test_fast_chunk_equals_checked_chunk(case):
  spec, before = {
      "all active": (make(), 0),
      "some idle": (make(K=(10, 40, 10, 40)), 10),             # experts 0 and 2 reached K
      "K inside the chunk": (make(K=(15, 40, 15, 40)), 10),    # falls back to the checked step
      "diverges": (make(eta=(0.1, 1e30, 0.2, 0.1)), 0),        # expert 1 blows up mid-chunk
      "diverged before": (make(eta=(0.1, 1e30, 0.2, 0.1)), 10),
  }[case]
  (fast, fast_loss), (checked, checked_loss) = _chunk_both_ways(spec, before)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(checked)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(fast_loss), np.asarray(checked_loss))
  d = np.asarray(checked.diverged_at)
  assert (d[1] >= 0) == case.startswith("diverge") and np.all(d[[0, 2, 3]] == -1)
  if case == "diverges":
    assert 0 < d[1] < 10  # inside this chunk, so the fast result was rejected and rerun


def test_chunks_do_not_recompile():
  _, trainer = run(make(), milestones=(10, 20, 30, 40), max_chunk=5)  # 8 chunks, 4 snapshots
  assert trainer.traces == 1


def test_chunk_positions_equal_per_step_positions_and_cover_each_epoch_once():
  seed, n, b, N, B, C = 7, 23, 5, 30, 8, 13
  spe = n // b
  n_ep = (C - 1) // spe + 2
  for k0 in (0, 3, 13):
    pos, mask = train.chunk_positions(seed, k0, n, b, C=C, B=B, N=N, n_epochs=n_ep)
    for c in range(C):
      p1, m1 = train.batch_positions(seed, k0 + c, n, b, B, N)
      np.testing.assert_array_equal(pos[c], p1)
      np.testing.assert_array_equal(mask[c], m1)
  pos, mask = train.chunk_positions(seed, 0, n, b, C=spe, B=B, N=N, n_epochs=2)
  drawn = np.asarray(pos)[np.asarray(mask)]
  assert len(set(drawn.tolist())) == spe * b and drawn.max() < n  # without replacement


def test_epoch_permutation_equals_stable_argsort():
  """One single-key sort + transposition passes == the stable argsort (ties and padding too)."""
  keys = jax.vmap(lambda s: experts_lib.expert_keys(s)[1])(jnp.arange(64))
  for N, n in ((1, 1), (2, 1), (7, 7), (30, 23), (257, 100), (1800, 1800)):  # ~12 rows tie at 1800
    def ref(key, epoch):
      u = jax.random.uniform(jax.random.fold_in(key, epoch), (N,))
      return jnp.argsort(jnp.where(jnp.arange(N) < n, u, 2.0)).astype(jnp.int32)
    for epoch in (0, 3):
      got = jax.jit(jax.vmap(lambda k: train.epoch_permutation(k, epoch, n, N)))(keys)
      np.testing.assert_array_equal(got, jax.vmap(ref, (0, None))(keys, epoch))


def test_expert_blocks_and_devices_do_not_change_training():
  spec = make(task=(0, 1, 2, 3) * 3, eta=0.05, b=(4, 8, 5, 16) * 3, ratio=1.0, seed=range(12))
  one_block, trainer = run(spec, milestones=(40,), block=100)
  assert trainer.blocks == 1
  for mesh, block, blocks in ((ONE_DEVICE, 1, 12), (ONE_DEVICE, 5, 3),
                              (sharding.expert_mesh(), 1, 2)):
    got, trainer = run(spec, milestones=(40,), mesh=mesh, block=block)
    assert trainer.blocks == blocks
    assert max_diff(one_block[40].params, got[40].params) < 1e-6


def test_golden_single_step():
  """Golden value of one SGD step. Update the constant only after an intended change to the
  model init, the sampler, the loss or the optimizer semantics — never to make a refactor pass."""
  spec = make()
  snaps, _ = run(spec, milestones=(1,))
  total = float(sum(np.sum(np.asarray(x, np.float64) ** 2)
                    for x in jax.tree.leaves(snaps[1].params)))
  assert total == pytest.approx(GOLDEN_SUM, rel=1e-5), total


GOLDEN_SUM = 83.37465868273758  # sum of squared params after one step (tiny suite)


def test_milestones_must_increase():
  with pytest.raises(ValueError, match="sweep.milestones"):
    train.check_milestones([20, 10])
  with pytest.raises(ValueError, match="optim.name"):
    train.get_optimizer("lion")
