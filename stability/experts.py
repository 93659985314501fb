"""Expert specifications: per-expert hyperparameters as arrays, and the initial expert stack.

An expert is (task, eta, b, K, data_ratio, seed, momentum, weight_decay) plus its training
subset, given as rows of its task's pool (`TaskArrays.x_pool`: train rows then ghost rows). A
stability twin is the same expert whose subset has one row swapped for a ghost row, so twins are
just more rows of the expert axis.

Legend: E experts, N subset capacity (largest n), eta learning rate, b batch size, K step budget.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from stability import data as data_lib
from stability import models as models_lib


@flax.struct.dataclass
class Experts:
  """Per-expert arrays with a leading axis E (numpy on the host, jax on devices)."""
  task: np.ndarray          # int32 [E] task index in the suite
  eta: np.ndarray           # float32 [E] learning rate
  b: np.ndarray             # int32 [E] true batch size
  K: np.ndarray             # int32 [E] step budget: updates after K are masked
  n: np.ndarray             # int32 [E] training-subset size n_i
  data_ratio: np.ndarray    # float32 [E]
  seed: np.ndarray          # int32 [E] head-init and data-order seed
  momentum: np.ndarray      # float32 [E] SGD momentum (Adam beta1)
  weight_decay: np.ndarray  # float32 [E] L2 coefficient added to gradients
  num_classes: np.ndarray   # int32 [E] classes of the expert's task
  subset: np.ndarray        # int32 [E, N] pool row of subset position p < n (0 beyond n)
  replaced: np.ndarray      # int32 [E] subset position swapped for a ghost row (-1: none)
  origin: np.ndarray        # int32 [E] row of the expert this one twins (own row if original)

  @property
  def size(self) -> int:
    return int(np.shape(self.task)[0])

  def take(self, rows) -> "Experts":
    """Rows of the expert axis (numpy or jax indexing)."""
    return jax.tree.map(lambda a: a[rows], self)


def expert_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(head_key, data_key) of one expert: one seed, split by name once."""
  head_key, data_key = jax.random.split(jax.random.key(seed))
  return head_key, data_key


def make_experts(suite: data_lib.Suite, *, task: Sequence[int], eta: Sequence[float],
                 b: Sequence[int], K: Sequence[int], data_ratio: Sequence[float],
                 seed: Sequence[int], momentum: float | Sequence[float] = 0.9,
                 weight_decay: float | Sequence[float] = 1e-4) -> Experts:
  """Builds and validates expert specs; every argument is per expert (scalars broadcast)."""
  E = len(task)
  bc = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (E,)).copy()
  task, eta, b, K = bc(task, np.int32), bc(eta, np.float32), bc(b, np.int32), bc(K, np.int32)
  ratio, seed = bc(data_ratio, np.float64), bc(seed, np.int32)
  mom, wd = bc(momentum, np.float32), bc(weight_decay, np.float32)
  T = len(suite.tasks)
  _check(E > 0, "experts", "at least one expert is required")
  _check(np.all((task >= 0) & (task < T)), "task", f"task indices must lie in [0, {T})")
  _check(np.all(np.isfinite(eta) & (eta > 0)), "eta", "learning rates must be finite and > 0")
  _check(np.all((ratio > 0) & (ratio <= 1)), "data_ratio", "must lie in (0, 1]")
  _check(np.all(K >= 0), "K", "step budgets must be >= 0")
  _check(np.all((mom >= 0) & (mom < 1)), "momentum", "must lie in [0, 1)")
  _check(np.all(wd >= 0), "weight_decay", "must be >= 0")
  n_train = np.array([suite.tasks[t].n_train for t in task], np.int64)
  n = np.array([data_lib.subset_size(int(m), float(r)) for m, r in zip(n_train, ratio)])
  _check(np.all(b >= 1), "b", "batch sizes must be >= 1")
  bad = np.flatnonzero(b > n)
  _check(bad.size == 0, "b", "batch size must be <= n_i (the expert's training-subset size); "
         + (f"expert {bad[0]} has b={b[bad[0]]} > n={n[bad[0]]}" if bad.size else ""))
  N = int(n.max())
  subset = np.zeros((E, N), np.int32)
  for e in range(E):
    idx = data_lib.subset_indices(int(n_train[e]), float(ratio[e]), int(seed[e]), int(task[e]))
    subset[e, :len(idx)] = idx
  num_classes = np.array([suite.tasks[t].num_classes for t in task], np.int32)
  return Experts(task=task, eta=eta, b=b, K=K, n=n.astype(np.int32),
                 data_ratio=ratio.astype(np.float32), seed=seed, momentum=mom,
                 weight_decay=wd, num_classes=num_classes, subset=subset,
                 replaced=np.full((E,), -1, np.int32), origin=np.arange(E, dtype=np.int32))


def _check(ok, field: str, allowed: str) -> None:
  if not bool(ok):
    raise ValueError(f"{field}: {allowed}")


def concat(*parts: Experts) -> Experts:
  """Concatenates expert specs along E, padding subsets to the widest; origins are re-based."""
  N = max(p.subset.shape[1] for p in parts)
  out, offset = [], 0
  for p in parts:
    pad = np.zeros((p.size, N - p.subset.shape[1]), np.int32)
    out.append(p.replace(subset=np.concatenate([p.subset, pad], 1), origin=p.origin + offset))
    offset += p.size
  return jax.tree.map(lambda *a: np.concatenate(a), *out)


def init_stack(model: models_lib.Model, backbone0, experts: Experts,
               image_shape: tuple[int, ...]):
  """x_0 for every expert: the pretrained backbone plus a fresh head keyed by the expert seed."""
  def one(seed):
    head_key, _ = expert_keys(seed)
    return {"backbone": backbone0, "head": model.init_head(head_key, backbone0, image_shape)}
  return jax.jit(jax.vmap(one))(jnp.asarray(experts.seed))
