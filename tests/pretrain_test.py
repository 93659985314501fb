"""Pretrained base: learns the pretraining set, cached by orbax under a config-derived key."""
import jax
import numpy as np

from stability import data, models, pretrain

SUITE = data.get_suite("tiny", 0)
MODEL = models.get_model("mlp", SUITE.max_classes, widths=(16,))
HP = dict(steps=60, batch_size=16, eta=0.1, momentum=0.9, weight_decay=0.0, optimizer="sgd",
          seed=0)


def test_cache_hit_returns_identical_backbone(tmp_path):
  a = pretrain.get_pretrained(MODEL, SUITE, {"name": "mlp"}, str(tmp_path), **HP)
  assert len(list(tmp_path.iterdir())) == 1
  b = pretrain.get_pretrained(MODEL, SUITE, {"name": "mlp"}, str(tmp_path), **HP)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  pretrain.get_pretrained(MODEL, SUITE, {"name": "mlp"}, str(tmp_path), **dict(HP, steps=30))
  assert len(list(tmp_path.iterdir())) == 2  # a different config is a different key


def test_pretraining_learns_and_moves_away_from_init():
  bb = pretrain.pretrain(MODEL, SUITE, **HP)
  init = MODEL.init_backbone(jax.random.key(0), SUITE.image_shape)
  moved = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
              for x, y in zip(jax.tree.leaves(bb), jax.tree.leaves(init)))
  assert moved > 1e-3
  # the features are linearly useful: a least-squares probe beats chance on the pretrain set
  h = np.asarray(MODEL.features(bb, SUITE.x_pretrain))
  Y = np.eye(SUITE.pretrain_classes)[SUITE.y_pretrain]
  W = np.linalg.lstsq(np.c_[h, np.ones(len(h))], Y, rcond=None)[0]
  acc = np.mean(np.argmax(np.c_[h, np.ones(len(h))] @ W, 1) == SUITE.y_pretrain)
  assert acc > 0.6
