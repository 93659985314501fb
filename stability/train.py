"""Expert trainer: one pure step for one expert, vmapped over E, scanned over steps in chunks,
with the expert axis sharded over a 1-D device mesh.

Loop order. Each device runs a chunk block by block (`blockwise`, inside `shard_map`): all C
steps for a few experts whose parameters and optimizer state fit in cache, then the next few.
Streaming every expert's state through memory at every step was 1.5-2x slower on CPU
(BENCHMARKS.md). The block size does not change any expert's numbers (tested).

Sampling. Each expert reshuffles its n training positions every epoch (without replacement) and
drops the last partial batch, as a PyTorch DataLoader with shuffle=True, drop_last=True does.
Steps per epoch are n // b; step k reads positions perm_e[s*b:(s+1)*b] with e = k // (n//b),
s = k % (n//b) and perm_e keyed by fold_in(data_key, e). The batch sequence is a pure function of
(seed, n, b), so a stability twin (same seed, n, b) draws the same positions as its original.

Masking. Batches are padded to b_max = max b and masked; the loss is normalised by the true b.
Updates after step K_i are masked, and an expert whose loss or new parameters are non-finite
records `diverged_at` and is frozen, leaving every other expert bit-for-bit unchanged. A chunk
in which no expert's K falls and no expert diverges skips the per-step masks and checks
(`train_chunk`'s fast path, checked once at the chunk's end; otherwise the chunk is rerun with
them), with the same bits either way.

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

from stability import data as data_lib
from stability import experts as experts_lib
from stability import models as models_lib
from stability import sharding as sharding_lib

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
  def from_arrays(cls, arrays: data_lib.TaskArrays) -> "Pools":
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
  """A uniformly random ordering of positions [0, n) in the first n slots of an [N] array.

  Equals the stable `jnp.argsort(where(arange(N) < n, u, 2.0))` for u ~ U[0, 1)^N keyed by
  fold_in(data_key, epoch). It is computed with one sort of single int32 keys (a prefix of u
  above the index bits): XLA's CPU sort is ~8x faster on one operand than on key-index pairs,
  and the few pairs with equal prefixes are put in (u, index) order by transposition passes.
  """
  u = jax.random.uniform(jax.random.fold_in(data_key, epoch), (N,))
  valid = jnp.arange(N) < n
  x = jnp.where(valid, u, 2.0)
  ib = max(1, (N - 1).bit_length())  # bits of an index
  if ib > 16:  # too few prefix bits left: long runs of equal prefixes
    return jnp.argsort(x).astype(jnp.int32)
  P = 31 - ib  # bits of the prefix, monotone in x: floor(u 2^(P-1)) < 2^(P-1), padding 2^P - 1
  prefix = jnp.where(valid, jnp.floor(u * 2.0 ** (P - 1)).astype(jnp.int32), 2 ** P - 1)
  idx = jax.lax.sort((prefix << ib) | jnp.arange(N, dtype=jnp.int32)) & ((1 << ib) - 1)
  return _transposition_sort(x[idx], idx)


def _transposition_sort(x: jax.Array, idx: jax.Array) -> jax.Array:
  """idx reordered so that (x, idx) increases: odd-even transposition passes until none swaps
  (cheap for nearly sorted input, where out-of-order runs are a few elements long)."""
  N = x.shape[0]
  pad = 1 + N % 2  # sentinels: one in front, one or two behind, for an even length
  x = jnp.concatenate([jnp.full((1,), -jnp.inf, x.dtype), x, jnp.full((pad,), jnp.inf, x.dtype)])
  idx = jnp.concatenate([jnp.full((1,), -1, idx.dtype), idx, jnp.full((pad,), N, idx.dtype)])

  def pairs(x, i):
    x, i = x.reshape(-1, 2), i.reshape(-1, 2)
    swap = (x[:, :1] > x[:, 1:]) | ((x[:, :1] == x[:, 1:]) & (i[:, :1] > i[:, 1:]))
    return (jnp.where(swap, x[:, ::-1], x).reshape(-1), jnp.where(swap, i[:, ::-1], i).reshape(-1),
            jnp.any(swap))

  def passes(carry):
    x, i, _ = carry
    x, i, even = pairs(x, i)
    xo, io, odd = pairs(x[1:-1], i[1:-1])
    return (jnp.concatenate([x[:1], xo, x[-1:]]), jnp.concatenate([i[:1], io, i[-1:]]),
            even | odd)

  _, idx, _ = jax.lax.while_loop(lambda c: c[2], passes, (x, idx, jnp.bool_(True)))
  return idx[1:N + 1]


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

def _all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf is finite. p * 0 is 0 where p is finite and NaN
  elsewhere: one float reduction per leaf (XLA's boolean all() is several kernels per leaf on
  CPU)."""
  return jnp.isfinite(sum(jnp.sum(a * 0.0) for a in jax.tree.leaves(tree)))


def train_step(model: models_lib.Model, optimizer: str, state: TrainState,
               expert: experts_lib.Experts, pools: Pools, pos: jax.Array, mask: jax.Array,
               checked: bool = True):
  """One SGD step of ONE expert: (state, batch) -> (state, loss). Pure; vmap it over experts.

  checked=False commits the update unconditionally (no K mask, no finiteness check): for an
  expert known to be active, whose finiteness the caller checks afterwards (`train_chunk`).
  Where the checked step commits, both give the same bits.
  """
  rows = expert.subset[pos]
  x, y = pools.x[expert.task, rows], pools.y[expert.task, rows]

  def loss_fn(params):
    logits, forward = model.apply_train(params, x, mask)
    loss = models_lib.LOSSES[model.loss](logits, y, expert.num_classes)
    return jnp.sum(jnp.where(mask, loss, 0.0)) / expert.b, forward

  (loss, forward), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  opt = get_optimizer(optimizer)(learning_rate=0.0, momentum=0.0, weight_decay=0.0)
  updates, opt_state = opt.update(grads, state.opt_state, state.params)  # uses state's hparams
  # Backbone state (BatchNorm statistics) comes from the forward pass; whatever the optimizer
  # did to it (weight decay) is discarded.
  params = model.carry_state(optax.apply_updates(state.params, updates), forward)
  if not checked:
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), loss
  finite = jnp.isfinite(loss) & _all_finite(params)
  active = (state.step < expert.K) & (state.diverged_at < 0)
  commit = active & finite
  keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(commit, a, c), new, old)
  new = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                   step=state.step + 1,
                   diverged_at=jnp.where(active & ~finite, state.step, state.diverged_at))
  return new, jnp.where(active, loss, jnp.nan)


def train_chunk(model: models_lib.Model, optimizer: str, state: TrainState,
                experts: experts_lib.Experts, pools: Pools, pos_ExCxB, mask_ExCxB,
                fast: bool = True):
  """Scans `train_step`, vmapped over experts, over the C steps of a chunk.

  Returns the new state and the per-expert mean loss over the chunk's active steps [E].

  Fast path (fast=True): when every expert is either active for the whole chunk or idle for
  all of it (its K reached, or diverged), the chunk runs the unchecked step (no per-step K
  masks, commit selects or finiteness reductions: ~18% of a step on CPU), then restores the
  idle experts' state. If any active expert's loss or final state is non-finite, or some
  expert's K falls inside the chunk, the chunk is rerun from its start with the checked step,
  so `diverged_at` and the frozen state are exactly the checked step's. Both paths give the
  same bits (tested); fast=False always runs the checked step.
  """
  C = pos_ExCxB.shape[1]

  def scan(checked):
    step = jax.vmap(functools.partial(train_step, model, optimizer, checked=checked),
                    in_axes=(0, 0, None, 0, 0))

    def body(state, inputs):
      pos, mask = inputs
      return step(state, experts, pools, pos, mask)

    xs = (jnp.swapaxes(pos_ExCxB, 0, 1), jnp.swapaxes(mask_ExCxB, 0, 1))
    return jax.lax.scan(body, state, xs)

  def checked_chunk():
    new, loss_CxE = scan(True)
    return new, jnp.nanmean(loss_CxE, axis=0)

  if not fast:
    return checked_chunk()
  active = (state.step + C <= experts.K) & (state.diverged_at < 0)
  idle = (state.step >= experts.K) | (state.diverged_at >= 0)

  def fast_chunk():
    new, loss_CxE = scan(False)
    ok = jnp.all(~active | (jnp.all(jnp.isfinite(loss_CxE), axis=0)
                            & jax.vmap(_all_finite)((new.params, new.opt_state))))
    keep = lambda a, b: jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    new = TrainState(params=jax.tree.map(keep, new.params, state.params),
                     opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                     step=new.step, diverged_at=state.diverged_at)
    loss = jnp.nanmean(jnp.where(active[None], loss_CxE, jnp.nan), axis=0)
    return jax.lax.cond(ok, lambda: (new, loss), checked_chunk)

  return jax.lax.cond(jnp.all(active | idle), fast_chunk, checked_chunk)


def blockwise(f: Callable, args: Any, blocks: int) -> Any:
  """f(*args) on `blocks` slices of the leading (expert) axis, one after the other (lax.map).

  Row e goes to block e % blocks, so each device's contiguous rows spread evenly over the blocks
  and the loop needs no communication. Used to run a whole chunk on one block of experts at a
  time: its parameters and optimizer state then stay in cache over the C steps, instead of
  streaming every expert's state through memory at every step (measured 1.5-2x on CPU).
  """
  if blocks == 1:
    return f(*args)
  split = lambda a: jnp.moveaxis(a.reshape((-1, blocks) + a.shape[1:]), 1, 0)
  out = jax.lax.map(lambda a: f(*a), jax.tree.map(split, args))
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape((-1,) + a.shape[2:]), out)


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


# Per device: a block of experts whose parameters, optimizer state and gradients fit in here
# stays in cache (L2) over a chunk's steps.
BLOCK_BYTES = 1024 * 1024


def param_bytes(model: models_lib.Model, image_shape: tuple[int, ...]) -> int:
  """Bytes of one expert's parameters (backbone and head)."""
  def init():
    backbone = model.init_backbone(jax.random.key(0), image_shape)
    return {"backbone": backbone,
            "head": model.init_head(jax.random.key(0), backbone, image_shape)}
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(init)))


class Trainer:
  """Trains an expert stack, yielding snapshots at K milestones.

  The expert axis is sharded with `NamedSharding`; pools are replicated. Each chunk trains the
  experts in `blocks` blocks one after the other (`blockwise`), at most `block` experts per device
  each (default: as many as `BLOCK_BYTES` holds at 4x their parameter bytes). The expert axis is
  padded to a multiple of mesh size x blocks (padding experts have K = 0). `state` is donated
  chunk to chunk.
  """

  def __init__(self, model: models_lib.Model, optimizer: str, experts: experts_lib.Experts,
               pools: Pools, *, mesh: jax.sharding.Mesh | None = None, max_chunk: int = 100,
               block: int | None = None):
    get_optimizer(optimizer)
    self.model, self.optimizer, self.max_chunk = model, optimizer, max_chunk
    self.mesh = mesh if mesh is not None else sharding_lib.expert_mesh()
    self.E = experts.size
    per_device = -(-self.E // self.mesh.size)
    if block is None:
      block = BLOCK_BYTES // (4 * param_bytes(model, tuple(pools.x.shape[2:])))
    self.blocks = -(-per_device // min(max(block, 1), per_device))
    self.experts_host = sharding_lib.pad_experts(experts, self.mesh.size * self.blocks)
    self.experts = sharding_lib.shard(self.experts_host, self.mesh)
    self.pools = sharding_lib.replicate(pools, self.mesh)
    self.B, self.N = int(np.max(experts.b)), int(experts.subset.shape[1])
    self._chunk_fns: dict[int, Callable] = {}
    self._init_state = jax.jit(functools.partial(init_state, optimizer))  # compiled once
    self.traces = 0  # number of times the chunk function was traced (for no-recompile checks)

  def init(self, params: Params) -> TrainState:
    """Initial state from an unpadded params stack [E, ...]."""
    params = sharding_lib.pad_tree(params, self.mesh.size * self.blocks)
    state = self._init_state(sharding_lib.shard(params, self.mesh), self.experts)
    return sharding_lib.shard(state, self.mesh)

  def _fn(self, C: int):
    if C not in self._chunk_fns:
      n_epochs = chunk_epochs(self.experts_host, C)
      positions = jax.vmap(functools.partial(chunk_positions, C=C, B=self.B, N=self.N,
                                             n_epochs=n_epochs), in_axes=(0, 0, 0, 0))

      def local(state, experts, pools):  # one device's experts
        def block(state, experts):
          pos, mask = positions(experts.seed, state.step, experts.n, experts.b)
          return train_chunk(self.model, self.optimizer, state, experts, pools, pos, mask)
        return blockwise(block, (state, experts), self.blocks)

      # Per-device code: each device loops over its own blocks, and the sampler's
      # data-dependent loop ends on the device's own rows, so devices never wait for each other
      # within a chunk (under plain jit every such loop was an all-reduce).
      rows = jax.sharding.PartitionSpec(sharding_lib.AXIS)
      per_device = jax.shard_map(local, mesh=self.mesh, out_specs=rows, check_vma=False,
                                 in_specs=(rows, rows, jax.sharding.PartitionSpec()))

      def run(state, experts, pools):
        self.traces += 1
        return per_device(state, experts, pools)

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
