"""Evaluation of expert stacks and merged models, vmapped over the expert axis.

For each model: loss and accuracy on its whole training subset (positions < n) and on its task's
test pool, and the generalization gap = test loss - train loss. Samples are processed in blocks
of `block` rows so memory stays bounded for large stacks.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from stability import data as data_lib
from stability import experts as experts_lib
from stability import models as models_lib
from stability import sharding as sharding_lib

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "gap")


@flax.struct.dataclass
class EvalData:
  """Device copies of the pools (train ++ ghost) and the test pools."""
  x_pool: jax.Array
  y_pool: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  n_test: jax.Array

  @classmethod
  def from_arrays(cls, a: data_lib.TaskArrays) -> "EvalData":
    return cls(*(jnp.asarray(v) for v in (a.x_pool, a.y_pool, a.x_test, a.y_test, a.n_test)))


def _blocks(model, params, x_all, y_all, rows, count, num_classes, block, reduce):
  """`reduce(loss, correct, valid)` of one model per block of `block` rows of rows[:count]."""
  R = rows.shape[0]
  nb = -(-R // block)
  rows = jnp.concatenate([rows, jnp.zeros((nb * block - R,), rows.dtype)]).reshape(nb, block)
  valid = (jnp.arange(nb * block) < count).reshape(nb, block)

  def one(args):
    r, v = args
    loss, correct = models_lib.per_sample_loss(model, params, x_all[r], y_all[r], num_classes)
    return reduce(loss, correct, v)

  return jax.lax.map(one, (rows, valid))


def _mean_over(model, params, x_all, y_all, rows, count, num_classes, block):
  """Mean loss and accuracy of one model over rows[:count] of (x_all, y_all), in blocks."""
  loss, correct = _blocks(model, params, x_all, y_all, rows, count, num_classes, block,
                          lambda l, c, v: (jnp.sum(jnp.where(v, l, 0.0)),
                                           jnp.sum(jnp.where(v, c, 0))))
  return jnp.sum(loss) / count, jnp.sum(correct) / count


def evaluate_one(model: models_lib.Model, params, expert: experts_lib.Experts, data: EvalData,
                 block: int = 256) -> dict[str, jax.Array]:
  """Metrics of ONE model (params of one expert) on its own subset and its task's test pool."""
  t = expert.task
  train_rows = expert.subset
  tr_loss, tr_acc = _mean_over(model, params, data.x_pool[t], data.y_pool[t], train_rows,
                               expert.n, expert.num_classes, block)
  test_rows = jnp.arange(data.x_test.shape[1], dtype=jnp.int32)
  te_loss, te_acc = _mean_over(model, params, data.x_test[t], data.y_test[t], test_rows,
                               data.n_test[t], expert.num_classes, block)
  return dict(train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc,
              gap=te_loss - tr_loss)


def test_losses_one(model: models_lib.Model, params, expert: experts_lib.Experts,
                    data: EvalData, block: int = 256) -> jax.Array:
  """Per-sample test losses [P] of ONE model on its task's test pool (0 beyond n_test)."""
  t = expert.task
  P = data.x_test.shape[1]
  loss = _blocks(model, params, data.x_test[t], data.y_test[t], jnp.arange(P, dtype=jnp.int32),
                 data.n_test[t], expert.num_classes, block,
                 lambda l, c, v: jnp.where(v, l, 0.0))
  return loss.reshape(-1)[:P]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _evaluate(model, params, experts, data, block):
  return jax.vmap(evaluate_one, in_axes=(None, 0, 0, None, None))(model, params, experts, data,
                                                                  block)


def evaluate(model: models_lib.Model, params, experts: experts_lib.Experts, data: EvalData, *,
             mesh: jax.sharding.Mesh | None = None, block: int = 256) -> dict[str, np.ndarray]:
  """Metrics [E] of a stack of models; row e is evaluated on expert e's subset and task."""
  return _sharded_call(_evaluate, model, params, experts, data, mesh, block)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _test_losses(model, params, experts, data, block):
  return jax.vmap(test_losses_one, in_axes=(None, 0, 0, None, None))(model, params, experts,
                                                                     data, block)


def _sharded_call(fn, model, params, experts, data, mesh, block):
  mesh = mesh if mesh is not None else sharding_lib.expert_mesh()
  E = experts.size
  params = sharding_lib.shard(sharding_lib.pad_tree(params, mesh.size), mesh)
  experts = sharding_lib.shard(sharding_lib.pad_tree(experts, mesh.size), mesh)
  data = sharding_lib.replicate(data, mesh)
  out = fn(model, params, experts, data, block)
  return jax.tree.map(lambda v: sharding_lib.to_host(v)[:E], out)


def test_losses(model: models_lib.Model, params, experts: experts_lib.Experts, data: EvalData, *,
                mesh: jax.sharding.Mesh | None = None, block: int = 256) -> np.ndarray:
  """Per-sample test losses [E, P] of a stack (row e on expert e's task; 0 beyond n_test)."""
  return _sharded_call(_test_losses, model, params, experts, data, mesh, block)


def member_params(merged_backbones, heads, groups: np.ndarray) -> Any:
  """Params [G*M] pairing each group's merged backbone with each member's own head."""
  G, M = groups.shape
  backbone = jax.tree.map(lambda a: jnp.repeat(a, M, axis=0), merged_backbones)
  head = jax.tree.map(lambda a: a[jnp.asarray(groups.reshape(-1))], heads)
  return {"backbone": backbone, "head": head}
