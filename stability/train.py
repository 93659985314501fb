"""Expert trainer: one pure step for one expert, vmapped over E, scanned over steps in chunks,
with the expert axis sharded over a 1-D device mesh.

Sampling. Each expert reshuffles its n training positions every epoch (without replacement) and
drops the last partial batch, as a PyTorch DataLoader with shuffle=True, drop_last=True does.
Steps per epoch are n // b; step k reads positions perm_e[s*b:(s+1)*b] with e = k // (n//b),
s = k % (n//b) and perm_e keyed by fold_in(data_key, e). The batch sequence is a pure function of
(seed, n, b), so a stability twin (same seed, n, b) draws the same positions as its original.

Masking. Batches are padded to b_max = max b and masked; the loss is normalised by the true b.
Updates after step K_i are masked, and an expert whose loss or new parameters are non-finite
records `diverged_at` and is frozen, leaving every other expert bit-for-bit unchanged.

Legend: E experts, C steps per chunk, B = b_max, N subset capacity.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stability import experts as experts_lib
from stability import models as models_lib
from stability import sharding as sharding_lib
from stability import tasks as tasks_lib

Params = Any


def _sgd(learning_rate, momentum, weight_decay):
  # PyTorch SGD semantics: weight decay is added to the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def _adam(learning_rate, momentum, weight_decay):
  # PyTorch Adam(weight_decay=...) semantics: L2 added to the gradient; momentum is beta1.
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=momentum))


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.inject_hyperparams(_sgd),
    "adam": optax.inject_hyperparams(_adam),
}


def get_optimizer(name: str):
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name: unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
  return OPTIMIZERS[name]


@flax.struct.dataclass
class TrainState:
  """Per-expert training state; a stack has leading axis E on every leaf."""
  params: Params
  opt_state: Any
  step: jax.Array         # int32: steps taken by the sampler (advances even when masked)
  diverged_at: jax.Array  # int32: step of the first non-finite loss, -1 if none


@flax.struct.dataclass
class Pools:
  """Device copies of the training pools every expert gathers from (replicated)."""
  x: jax.Array            # [T, P, H, W, C]
  y: jax.Array            # [T, P]

  @classmethod
  def from_arrays(cls, arrays: tasks_lib.TaskArrays) -> "Pools":
    return cls(x=jnp.asarray(arrays.x_pool), y=jnp.asarray(arrays.y_pool))


def init_state(optimizer: str, params: Params, experts: experts_lib.Experts) -> TrainState:
  """Optimizer state for a stack; eta, momentum and weight decay live in it as arrays."""
  opt = get_optimizer(optimizer)

  def one(p, eta, mom, wd):
    return opt(learning_rate=eta, momentum=mom, weight_decay=wd).init(p)

  E = experts.size
  opt_state = jax.vmap(one)(params, jnp.asarray(experts.eta), jnp.asarray(experts.momentum),
                            jnp.asarray(experts.weight_decay))
  return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((E,), jnp.int32),
                    diverged_at=jnp.full((E,), -1, jnp.int32))


# ---------------------------------------------------------------------------------------------
# Sampling.

def epoch_permutation(data_key: jax.Array, epoch: jax.Array, n: jax.Array, N: int) -> jax.Array:
  """A uniformly random ordering of positions [0, n) in the first n slots of an [N] array."""
  u = jax.random.uniform(jax.random.fold_in(data_key, epoch), (N,))
  return jnp.argsort(jnp.where(jnp.arange(N) < n, u, 2.0)).astype(jnp.int32)


def _slice_batch(perm, s, b, B):
  perm = jnp.concatenate([perm, jnp.zeros((B,), perm.dtype)])
  mask = jnp.arange(B) < b
  return jnp.where(mask, jax.lax.dynamic_slice(perm, (s * b,), (B,)), 0), mask


def batch_positions(seed, k, n, b, B: int, N: int) -> tuple[jax.Array, jax.Array]:
  """Subset positions [B] and validity mask [B] of one expert's minibatch at step k."""
  _, data_key = experts_lib.expert_keys(seed)
  spe = n // b
  return _slice_batch(epoch_permutation(data_key, k // spe, n, N), k % spe, b, B)


def chunk_positions(seed, k0, n, b, *, C: int, B: int, N: int, n_epochs: int):
  """Positions [C, B] and masks of steps k0..k0+C-1 for one expert, one sort per epoch.

  `n_epochs` bounds the epochs a chunk touches: (C - 1) // min(n // b) + 2 suffices.
  """
  _, data_key = experts_lib.expert_keys(seed)
  spe = n // b
  e0 = k0 // spe
  perms = jax.vmap(lambda e: epoch_permutation(data_key, e0 + e, n, N))(jnp.arange(n_epochs))
  k = k0 + jnp.arange(C)
  return jax.vmap(lambda e, s: _slice_batch(perms[e], s, b, B))(k // spe - e0, k % spe)


def chunk_epochs(experts: experts_lib.Experts, C: int) -> int:
  return min(C, (C - 1) // int(np.min(experts.n // experts.b)) + 2)


# ---------------------------------------------------------------------------------------------
# The step.

def train_step(model: models_lib.Model, optimizer: str, state: TrainState,
               expert: experts_lib.Experts, pools: Pools, pos: jax.Array, mask: jax.Array):
  """One SGD step of ONE expert: (state, batch) -> (state, loss). Pure; vmap it over experts."""
  rows = expert.subset[pos]
  x, y = pools.x[expert.task, rows], pools.y[expert.task, rows]

  def loss_fn(params):
    loss, _ = models_lib.per_sample_loss(model, params, x, y, expert.num_classes)
    return jnp.sum(jnp.where(mask, loss, 0.0)) / expert.b

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  opt = get_optimizer(optimizer)(learning_rate=0.0, momentum=0.0, weight_decay=0.0)
  updates, opt_state = opt.update(grads, state.opt_state, state.params)  # uses state's hparams
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
  active = (state.step < expert.K) & (state.diverged_at < 0)
  commit = active & finite
  keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(commit, a, c), new, old)
  new = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                   step=state.step + 1,
                   diverged_at=jnp.where(active & ~finite, state.step, state.diverged_at))
  return new, jnp.where(active, loss, jnp.nan)


def train_chunk(model: models_lib.Model, optimizer: str, state: TrainState,
                experts: experts_lib.Experts, pools: Pools, pos_ExCxB, mask_ExCxB):
  """Scans `train_step`, vmapped over experts, over the C steps of a chunk.

  Returns the new state and the per-expert mean loss over the chunk's active steps [E].
  """
  step = jax.vmap(functools.partial(train_step, model, optimizer), in_axes=(0, 0, None, 0, 0))

  def body(state, inputs):
    pos, mask = inputs
    return step(state, experts, pools, pos, mask)

  xs = (jnp.swapaxes(pos_ExCxB, 0, 1), jnp.swapaxes(mask_ExCxB, 0, 1))
  state, loss_CxE = jax.lax.scan(body, state, xs)
  return state, jnp.nanmean(loss_CxE, axis=0)


# ---------------------------------------------------------------------------------------------
# The driver.

def plan_chunk(milestones: Sequence[int], max_chunk: int) -> int:
  """Largest chunk length <= max_chunk dividing every milestone (so snapshots fall on chunk
  boundaries and one compiled scan serves every chunk)."""
  g = 0
  for m in milestones:
    g = math.gcd(g, int(m))
  return max(d for d in range(1, min(g, max_chunk) + 1) if g % d == 0)


def check_milestones(milestones: Sequence[int]) -> None:
  ms = list(milestones)
  if not ms or any(m <= 0 for m in ms) or any(a >= c for a, c in zip(ms, ms[1:])):
    raise ValueError(f"sweep.milestones: must be positive and strictly increasing; got {ms}")


class Trainer:
  """Trains an expert stack, yielding snapshots at K milestones.

  The expert axis is padded to a multiple of the mesh size (padding experts have K = 0) and
  sharded with `NamedSharding`; pools are replicated. `state` is donated chunk to chunk.
  """

  def __init__(self, model: models_lib.Model, optimizer: str, experts: experts_lib.Experts,
               pools: Pools, *, mesh: jax.sharding.Mesh | None = None, max_chunk: int = 100):
    get_optimizer(optimizer)
    self.model, self.optimizer, self.max_chunk = model, optimizer, max_chunk
    self.mesh = mesh if mesh is not None else sharding_lib.expert_mesh()
    self.E = experts.size
    self.experts_host = sharding_lib.pad_experts(experts, self.mesh.size)
    self.experts = sharding_lib.shard(self.experts_host, self.mesh)
    self.pools = sharding_lib.replicate(pools, self.mesh)
    self.B, self.N = int(np.max(experts.b)), int(experts.subset.shape[1])
    self._chunk_fns: dict[int, Callable] = {}
    self.traces = 0  # number of times the chunk function was traced (for no-recompile checks)

  def init(self, params: Params) -> TrainState:
    """Initial state from an unpadded params stack [E, ...]."""
    params = sharding_lib.pad_tree(params, self.mesh.size)
    state = jax.jit(functools.partial(init_state, self.optimizer))(
        sharding_lib.shard(params, self.mesh), self.experts)
    return sharding_lib.shard(state, self.mesh)

  def _fn(self, C: int):
    if C not in self._chunk_fns:
      n_epochs = chunk_epochs(self.experts_host, C)
      positions = jax.vmap(functools.partial(chunk_positions, C=C, B=self.B, N=self.N,
                                             n_epochs=n_epochs), in_axes=(0, 0, 0, 0))

      def run(state, experts, pools):
        self.traces += 1
        pos, mask = positions(experts.seed, state.step, experts.n, experts.b)
        return train_chunk(self.model, self.optimizer, state, experts, pools, pos, mask)

      out = sharding_lib.expert_sharding(self.mesh)
      self._chunk_fns[C] = jax.jit(run, donate_argnums=(0,), out_shardings=out)
    return self._chunk_fns[C]

  def chunk(self, milestones: Sequence[int]) -> int:
    """Steps per scanned chunk for these milestones (chunk boundaries hit every milestone)."""
    return plan_chunk(milestones, self.max_chunk)

  def run(self, state: TrainState, milestones: Sequence[int], *, start: int = 0,
          progress: Callable[[int, np.ndarray], None] | None = None,
          checkpoint: Callable[[int, TrainState], None] | None = None,
          checkpoint_due: Callable[[int], bool] = lambda k: False,
          ) -> Iterator[tuple[int, TrainState]]:
    """Advances `state` from step `start` (a chunk boundary), yielding (K, state) after each
    milestone's chunk.

    Yielded states are copies, safe to keep while training continues. `progress(steps_done,
    loss_E)` is called once per chunk with the previous chunk's losses (fetched after the next
    chunk is dispatched, so the host never stalls the device). `checkpoint(k, copy)` is called at
    chunk boundaries k where `checkpoint_due(k)`, after the consumer has finished with a milestone
    snapshot at k (so a checkpoint at k implies milestone k was handled).
    """
    check_milestones(milestones)
    C = self.chunk(milestones)
    if start % C or not 0 <= start <= int(milestones[-1]):
      raise ValueError(f"start: must be a chunk boundary (multiple of {C}) in "
                       f"[0, {milestones[-1]}]; got {start}")
    fn = self._fn(C)
    pending = None
    for k0 in range(start, int(milestones[-1]), C):
      state, loss = fn(state, self.experts, self.pools)
      if pending is not None and progress is not None:
        progress(pending[0], sharding_lib.to_host(pending[1])[:self.E])
      pending = (k0 + C, loss)
      snap = None
      if k0 + C in milestones:
        snap = jax.tree.map(lambda a: a.copy(), state)
        yield k0 + C, snap
      if checkpoint is not None and checkpoint_due(k0 + C):
        # The state is donated to the next chunk; the asynchronous save gets a copy.
        checkpoint(k0 + C, snap if snap is not None else jax.tree.map(lambda a: a.copy(), state))
    if pending is not None and progress is not None:
      progress(pending[0], sharding_lib.to_host(pending[1])[:self.E])

  def unpad(self, tree):
    """Drops padding experts from a stack returned by this trainer."""
    return jax.tree.map(lambda a: a[:self.E], tree)
