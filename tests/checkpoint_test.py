"""Resumed from an orbax checkpoint == uninterrupted, restored into the sharded abstract tree."""
import functools
import os

import jax
import numpy as np
import pytest

from stability import checkpoint
from stability import experts as experts_lib
from stability import models
from stability import sharding
from stability import data
from stability import train

SUITE = data.get_suite("tiny", 0)
MODEL = models.get_model("mlp", SUITE.max_classes, widths=(16,))
POOLS = train.Pools.from_arrays(SUITE.arrays())
BACKBONE = MODEL.init_backbone(jax.random.key(0), SUITE.image_shape)
# 5 experts on 8 devices: padding rows too; momentum and Adam state both travel.
SPEC = experts_lib.make_experts(SUITE, task=[0, 1, 2, 3, 0], eta=[0.1, 0.05, 0.2, 0.1, 0.3],
                                b=[4, 8, 5, 16, 3], K=[12, 12, 9, 12, 12],
                                data_ratio=[1.0, 0.5, 0.8, 1.0, 0.6], seed=[0, 1, 2, 3, 4])
MILESTONES = (6, 12)


@functools.lru_cache
def _trainer(optimizer):
  """One trainer per optimizer: its compiled chunk serves every run (resumes included)."""
  return train.Trainer(MODEL, optimizer, SPEC, POOLS, mesh=sharding.expert_mesh(), max_chunk=3)


def _fresh(trainer):
  return trainer.init(experts_lib.init_stack(MODEL, BACKBONE, SPEC, SUITE.image_shape))


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resumed_from_every_checkpoint_equals_uninterrupted(tmp_path, optimizer):
  assert jax.device_count() == 8
  trainer = _trainer(optimizer)
  ckpt = checkpoint.StackCheckpoints(str(tmp_path), every=3, keep=10)
  snaps = dict(trainer.run(_fresh(trainer), MILESTONES, checkpoint=ckpt.save,
                           checkpoint_due=ckpt.due))
  ckpt.close()
  want = snaps[12]
  ckpt = checkpoint.StackCheckpoints(str(tmp_path), every=3, keep=10)
  assert ckpt.steps() == [3, 6, 9, 12]
  for step in (3, 6, 9):
    like = _fresh(trainer)
    state = ckpt.restore(step, like)
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
      assert got.sharding == ref.sharding  # restored straight into the trainer's shardings
    np.testing.assert_array_equal(np.asarray(state.step), step)
    resumed = dict(trainer.run(state, MILESTONES, start=step))
    assert sorted(resumed) == [k for k in MILESTONES if k > step]
    _assert_equal(resumed[12], want)
  ckpt.close()


def test_a_torn_save_is_never_restored(tmp_path):
  trainer = _trainer("sgd")
  ckpt = checkpoint.StackCheckpoints(str(tmp_path), every=6)
  for _ in trainer.run(_fresh(trainer), MILESTONES, checkpoint=ckpt.save,
                       checkpoint_due=ckpt.due):
    pass
  ckpt.close()
  # What a process killed mid-save leaves: orbax's temporary directory for the next step.
  os.makedirs(tmp_path / "18.orbax-checkpoint-tmp-1234" / "default")
  ckpt = checkpoint.StackCheckpoints(str(tmp_path), every=6)
  assert ckpt.steps() == [6, 12]
  ckpt.close()


def test_start_must_be_a_chunk_boundary_and_every_non_negative(tmp_path):
  trainer = _trainer("sgd")
  with pytest.raises(ValueError, match="start: must be a chunk boundary"):
    next(trainer.run(_fresh(trainer), MILESTONES, start=4))
  with pytest.raises(ValueError, match="train.checkpoint_every"):
    checkpoint.StackCheckpoints(str(tmp_path), every=-1)
