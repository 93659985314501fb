"""The pretrained base x_0: a backbone trained on the suite's pretraining set, cached with orbax.

The pretraining run is the expert trainer itself, with one expert whose task is the pretraining
set, so the base is trained by exactly the code that fine-tunes the experts. The cache key is a
hash of everything the result depends on (suite, model, pretraining hyperparameters, seed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from stability import data as data_lib
from stability import experts as experts_lib
from stability import models as models_lib
from stability import train as train_lib

log = logging.getLogger(__name__)


def pretrain_suite(suite: data_lib.Suite) -> data_lib.Suite:
  """The pretraining set as a one-task suite (no test or ghost data needed)."""
  empty_x = suite.x_pretrain[:0]
  task = data_lib.Task(name="pretrain", num_classes=suite.pretrain_classes,
                       x_train=suite.x_pretrain, y_train=suite.y_pretrain,
                       x_test=empty_x, y_test=suite.y_pretrain[:0],
                       x_ghost=empty_x, y_ghost=suite.y_pretrain[:0])
  return data_lib.Suite(name=suite.name + "/pretrain", seed=suite.seed, tasks=(task,),
                        x_pretrain=empty_x, y_pretrain=suite.y_pretrain[:0],
                        pretrain_classes=suite.pretrain_classes)


def cache_key(**spec) -> str:
  blob = json.dumps(spec, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def pretrain(model: models_lib.Model, suite: data_lib.Suite, *, steps: int, batch_size: int,
             eta: float, momentum: float, weight_decay: float, optimizer: str, seed: int,
             mesh=None) -> Any:
  """Trains backbone + a pretraining head from scratch; returns the backbone."""
  psuite = pretrain_suite(suite)
  spec = experts_lib.make_experts(psuite, task=[0], eta=[eta], b=[batch_size], K=[steps],
                                  data_ratio=[1.0], seed=[seed], momentum=momentum,
                                  weight_decay=weight_decay)
  key = jax.random.key(seed)
  backbone = model.init_backbone(key, suite.image_shape)
  params = experts_lib.init_stack(model, backbone, spec, suite.image_shape)
  trainer = train_lib.Trainer(model, optimizer, spec,
                              train_lib.Pools.from_arrays(psuite.arrays()), mesh=mesh)
  state = trainer.init(params)
  for _, state in trainer.run(state, [steps]):
    pass
  if int(state.diverged_at[0]) >= 0:
    raise FloatingPointError(f"pretrain: diverged at step {int(state.diverged_at[0])}; "
                             "lower pretrain.lr")
  return jax.tree.map(lambda a: np.asarray(a[0]), state.params["backbone"])


def get_pretrained(model: models_lib.Model, suite: data_lib.Suite, model_spec: dict,
                   cache_dir: str | None, **hparams) -> Any:
  """Returns the cached base backbone, training and caching it on first use."""
  key = cache_key(suite=suite.name, suite_seed=suite.seed, model=model_spec, **hparams)
  if not cache_dir:
    return pretrain(model, suite, **hparams)
  path = os.path.abspath(os.path.join(cache_dir, f"pretrain-{key}"))
  mngr = ocp.CheckpointManager(path)
  abstract = jax.eval_shape(lambda: model.init_backbone(jax.random.key(0), suite.image_shape))
  if mngr.latest_step() is not None:
    log.info("pretrained base: cache hit %s", path)
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    mngr.close()
    return jax.tree.map(np.asarray, restored)
  backbone = pretrain(model, suite, **hparams)
  mngr.save(0, args=ocp.args.StandardSave(backbone))
  mngr.wait_until_finished()
  mngr.close()
  log.info("pretrained base: cached at %s", path)
  return backbone
