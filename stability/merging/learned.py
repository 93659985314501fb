"""Merges whose coefficients are fitted with forward passes of the merged model on data:
AdaMerging (coefficients learned by entropy minimisation on unlabelled inputs) and the greedy
soup (0/1 inclusion of each member chosen by held-out accuracy).

Both need the `Model` and each member's own head. The greedy soup is here, not with the
uniform soup in `linear`: its result is a uniform average, but of a subset selected by the
accuracy of candidate soups on labelled held-out data, so its coefficients depend on the
members and the data like AdaMerging's. AdaMerging's batches of group g, step i are drawn
with fold_in(fold_in(key, id_g), i) (id_g = group_ids[g], default g), so a stability twin group
given its original group's id draws the same minibatches.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stability.merging.base import (CHUNK, Array, Params, bcast, check_chunk, check_data,
                                    check_group_ids, check_key, check_scalar, flatten_stack,
                                    gather_tree, linear_combination, map_rows, member_leaves,
                                    member_logits, num_leaves, prepare, task_vectors)
from stability.sharding import on_one_device

_GRANULARITIES = ("task", "layer")


@functools.partial(jax.jit, static_argnames=("model", "granularity", "steps", "batch_size",
                                             "chunk_size"))
def _adamerging(x0, stack, groups, gidx, heads, x, nc, mask, key, lr, init, model, granularity,
                steps, batch_size, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  L, M = len(leaves0), groups.shape[1]
  N = x.shape[1]

  def one(gi, idx_M):
    taus = task_vectors(leaves0, leaves_s, idx_M)
    heads_M, x_M, nc_M, p_M = (gather_tree(heads, idx_M), x[idx_M], nc[idx_M],
                               mask[idx_M] / jnp.sum(mask[idx_M], 1, keepdims=True))
    kg = jax.random.fold_in(key, gi)

    def entropy(lam, kb):
      lam_MxL = jnp.broadcast_to(lam.reshape(M, -1), (M, L))
      merged = treedef.unflatten([
          a0.astype(jnp.float32) + jnp.sum(bcast(lam_MxL[:, l], t) * t, axis=0)
          for l, (a0, t) in enumerate(zip(leaves0, taus))])
      rows = jax.vmap(lambda kk, pm: jax.random.choice(kk, N, (batch_size,), p=pm))(
          jax.random.split(kb, M), p_M)
      xb = jax.vmap(lambda xm, r: xm[r])(x_M, rows)
      logp = jax.nn.log_softmax(member_logits(model, merged, heads_M, xb, nc_M))
      ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)                  # [M, B]
      return jnp.sum(jnp.mean(ent, axis=1))                          # sum over member tasks

    opt = optax.adam(lr)
    lam0 = jnp.full((M,) if granularity == "task" else (M, L), init, jnp.float32)

    def step(carry, i):
      lam, state = carry
      grad = jax.grad(entropy)(lam, jax.random.fold_in(kg, i))
      upd, state = opt.update(grad, state, lam)
      return (jnp.clip(optax.apply_updates(lam, upd), 0.0, 1.0), state), None

    (lam, _), _ = jax.lax.scan(step, (lam0, opt.init(lam0)), jnp.arange(steps))
    return lam

  return map_rows(one, (gidx, groups), chunk_size)


def adamerging_coefficients(x0: Params, stack: Params, groups: Any, *, model: Any,
                            heads: Params, x: Any, num_classes: Any, key: Any,
                            mask: Any = None, granularity: str = "task", steps: int = 500,
                            lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
                            chunk_size: int | None = CHUNK, tasks: Any = None,
                            group_ids: Any = None) -> Array:
  """AdaMerging coefficients: lam [G, M] (task-wise) or [G, M, L] (layer-wise, one per leaf).

  Minimises sum over member tasks t of the mean prediction entropy of the merged model
  x0 + sum_m lam_m tau_m on unlabeled inputs of task t, where task t's logits use member t's
  own head and `masked_logits` with its num_classes. Adam (lr 1e-3), lam initialised at 0.3
  and projected onto [0, 1] after every step, `steps` = 500 steps of `batch_size` = 16 inputs
  per member drawn with replacement among real rows (Yang et al., ICLR 2024; FusionBench
  `adamerging`). heads: head stack [E, ...]; x: unlabeled inputs per expert [E, N, H, W, C]
  (e.g. its task's test images); mask [E, N] marks real rows; num_classes [E]. Batches of group
  g, step i use fold_in(fold_in(key, g), i).
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  if granularity not in _GRANULARITIES:
    raise ValueError(f"granularity: unknown {granularity!r}; allowed: "
                     f"{', '.join(_GRANULARITIES)}")
  x, nc, m, _ = check_data(E, x, num_classes, mask, heads)
  heads = on_one_device(heads)
  key = check_key(key)
  for name, v in (("steps", steps), ("batch_size", batch_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}: must be a positive int, got {v!r}")
  lr = check_scalar("lr", lr, 0.0, math.inf, lo_open=True, what=" (finite)")
  init = check_scalar("init", init, 0.0, 1.0)
  return _adamerging(x0, stack, jnp.asarray(g), check_group_ids(group_ids, g), heads, x, nc, m,
                     key, jnp.float32(lr), jnp.float32(init), model, granularity, int(steps),
                     int(batch_size), chunk_size)


def adamerging(x0: Params, stack: Params, groups: Any, *, model: Any, heads: Params, x: Any,
               num_classes: Any, key: Any, mask: Any = None, granularity: str = "task",
               steps: int = 500, lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
               chunk_size: int | None = CHUNK, tasks: Any = None,
               group_ids: Any = None) -> Params:
  """AdaMerging (Yang et al., ICLR 2024): x = x0 + sum_m lam_m tau_m with lam learned by
  `adamerging_coefficients` (task-wise, or layer-wise = one lam per member and leaf)."""
  lam = adamerging_coefficients(x0, stack, groups, model=model, heads=heads, x=x,
                                num_classes=num_classes, key=key, mask=mask,
                                granularity=granularity, steps=steps, lr=lr,
                                batch_size=batch_size, init=init, chunk_size=chunk_size,
                                tasks=tasks, group_ids=group_ids)
  g = np.asarray(groups, np.int32)
  x0, stack = on_one_device(x0), on_one_device(stack)
  L = num_leaves(x0)
  lam = jnp.broadcast_to(lam.reshape(lam.shape[:2] + (-1,)), lam.shape[:2] + (L,))
  return linear_combination(x0, stack, jnp.asarray(g), lam, 1.0 - jnp.sum(lam, axis=1),
                            check_chunk(chunk_size))


def _accuracy(model, backbone, heads_M, x_M, y_M, nc_M, mask_M):
  """Mean over member tasks of the masked accuracy of `backbone` with each member's head."""
  pred = jnp.argmax(member_logits(model, backbone, heads_M, x_M, nc_M), axis=-1)
  acc_M = jnp.sum((pred == y_M) * mask_M, axis=1) / jnp.sum(mask_M, axis=1)
  return jnp.mean(acc_M)


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _greedy_soup(x0, stack, groups, heads, x, y, nc, mask, model, chunk_size):
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]

  def one(idx_M):
    X = member_leaves(leaves_s, idx_M)
    data = (gather_tree(heads, idx_M), x[idx_M], y[idx_M], nc[idx_M], mask[idx_M])
    score = lambda leaves: _accuracy(model, treedef.unflatten(leaves), *data)
    member_acc = jax.vmap(score)(X)                                 # [M]
    order = jnp.argsort(-member_acc, stable=True)

    def add(carry, j):
      total, count, best, included = carry
      cand = [(t + xm[j]) / (count + 1.0) for t, xm in zip(total, X)]
      acc = score(cand)
      take = (count == 0) | (acc >= best)
      total = [jnp.where(take, t + xm[j], t) for t, xm in zip(total, X)]
      return (total, count + take, jnp.where(take, acc, best),
              included.at[j].set(take)), None

    init = ([jnp.zeros_like(a) for a in jax.tree.map(lambda v: v[0], X)], jnp.float32(0.0),
            jnp.float32(-1.0), jnp.zeros((M,), bool))
    (total, count, best, included), _ = jax.lax.scan(add, init, order)
    soup = treedef.unflatten([(t / count).astype(s.dtype) for t, s in zip(total, leaves_s)])
    return soup, {"included": included, "accuracy": best, "member_accuracy": member_acc}

  return map_rows(one, (groups,), chunk_size)


def greedy_soup(x0: Params, stack: Params, groups: Any, *, model: Any, heads: Params, x: Any,
                y: Any, num_classes: Any, mask: Any = None, chunk_size: int | None = CHUNK,
                tasks: Any = None, return_info: bool = False):
  """Greedy soup (Wortsman et al., ICML 2022, Algorithm 1) on held-out data.

  Members are sorted by held-out accuracy (desc.); starting from the best, each next member is
  added to the soup (uniform average of the ingredients) if the soup's held-out accuracy does
  not drop (>=, as in the paper); otherwise it is skipped. So the soup is never worse than the
  best member. Held-out accuracy of a backbone = mean over member tasks t of its accuracy with
  member t's head on t's data: x [E, N, H, W, C], y [E, N], mask [E, N], num_classes [E],
  heads [E, ...]. Soups assume one task; here each member keeps its own head. return_info adds
  {'included' [G, M] (member order), 'accuracy' [G], 'member_accuracy' [G, M]}.
  """
  E, g, chunk_size = prepare(x0, stack, groups, tasks, chunk_size)
  x0, stack = on_one_device(x0), on_one_device(stack)
  x, nc, m, y = check_data(E, x, num_classes, mask, heads, y=y)
  heads = on_one_device(heads)
  soup, info = _greedy_soup(x0, stack, jnp.asarray(g), heads, x, y, nc, m, model, chunk_size)
  return (soup, info) if return_info else soup
