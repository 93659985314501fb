"""Shared pieces of every merge: host-side validation, mapping over groups, task vectors, the
fused linear combination and the forward pass with each member's own head.

Validation runs on the host, before any compute: a bad input raises a one-line ValueError
naming the field (`check_*`, `prepare`). Inside the jitted merges: `map_rows` maps a per-group
function over groups (vmapped, in chunks of `chunk_size`), `flatten_stack` / `task_vectors` /
`member_leaves` gather a group's members as leaves [M, ...], `finish` writes x0 + scale * delta
back in the stack's dtype, `linear_combination` is x = c0 x0 + sum_m c_m x_m with coefficients
per member and leaf (`run_linear`: one coefficient per member), and `member_logits` runs one
backbone with each member's head on its own inputs (AdaMerging, greedy soup, ensemble).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from stability.models import masked_logits

Params = Any
Array = jax.Array

# Default groups per chunk for merges whose per-group intermediates are [M, ...] slabs of
# member parameters (so memory is O(CHUNK * M * |backbone|)). Linear merges default to all
# groups at once: XLA fuses their gathers into the output, so nothing larger is materialised.
CHUNK = 64


# ---------------------------------------------------------------------------------------------
# Validation (host side, before any compute).

def check_trees(x0: Params, stack: Params) -> int:
  """Checks that stack == x0 with a leading axis E on every leaf; returns E."""
  s0, ss = jax.tree.structure(x0), jax.tree.structure(stack)
  if s0 != ss:
    raise ValueError(f"stack: tree structure {ss} differs from x0's {s0}")
  paths = jax.tree_util.tree_flatten_with_path(x0)[0]
  leaves_s = jax.tree.leaves(stack)
  if not leaves_s:
    raise ValueError("stack: the backbone tree has no leaves")
  Es = set()
  for (path, a0), s in zip(paths, leaves_s):
    name = jax.tree_util.keystr(path)
    if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
      raise ValueError(f"stack: leaf {name} has dtype {jnp.result_type(s)}, expected floating")
    if np.ndim(s) != np.ndim(a0) + 1 or tuple(np.shape(s)[1:]) != tuple(np.shape(a0)):
      raise ValueError(f"stack: leaf {name} has shape {tuple(np.shape(s))}, expected "
                       f"(E,) + x0 shape {tuple(np.shape(a0))}")
    Es.add(np.shape(s)[0])
  if len(Es) != 1:
    raise ValueError(f"stack: leaves disagree on the expert axis E: {sorted(Es)}")
  return Es.pop()


def check_like_stack(name: str, tree: Params, stack: Params) -> None:
  """Checks that a statistics stack (e.g. Fisher) has the stack's structure and shapes."""
  if jax.tree.structure(tree) != jax.tree.structure(stack):
    raise ValueError(f"{name}: tree structure differs from the stack's")
  for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(stack)):
    if tuple(np.shape(a)) != tuple(np.shape(s)):
      raise ValueError(f"{name}: leaf shape {tuple(np.shape(a))} differs from the stack's "
                       f"{tuple(np.shape(s))}")


def check_groups(groups: Any, E: int, tasks: Any = None) -> np.ndarray:
  """groups [G, M] as int32 rows of [0, E); with tasks [E], no task twice in a group."""
  g = np.asarray(groups)
  if g.ndim != 2 or not np.issubdtype(g.dtype, np.integer):
    raise ValueError(f"groups: must be a 2-D integer array [G, M], got shape {g.shape} "
                     f"dtype {g.dtype}")
  if g.shape[0] == 0:
    raise ValueError("groups: no groups (G=0)")
  if g.shape[1] == 0:
    raise ValueError("groups: empty group (M=0); every group needs at least one expert")
  if g.min() < 0 or g.max() >= E:
    raise ValueError(f"groups: indices must lie in [0, E={E}), got min {g.min()} max {g.max()}")
  if tasks is not None:
    t = np.asarray(tasks)
    if t.shape != (E,) or not np.issubdtype(t.dtype, np.integer):
      raise ValueError(f"tasks: must be an int array of shape [E]=({E},), got shape {t.shape} "
                       f"dtype {t.dtype}")
    tg = np.sort(t[g], axis=1)
    dup = np.nonzero(np.any(tg[:, 1:] == tg[:, :-1], axis=1))[0]
    if dup.size:
      r = int(dup[0])
      raise ValueError(f"groups: group {r} repeats a task (experts {g[r].tolist()} have tasks "
                       f"{t[g[r]].tolist()}); each group must hold distinct tasks")
  return g.astype(np.int32)


def check_weights(weights: Any, shape: tuple[int, int], *, average: bool) -> np.ndarray:
  """Returns float32 weights [G, M] (ones if None); averaging ones are normalised to sum 1."""
  if weights is None:
    w = np.ones(shape, np.float32)
  else:
    w = np.asarray(weights, np.float32)
    if w.shape != shape:
      raise ValueError(f"weights: must have shape [G, M]={shape}, got {w.shape}")
    if not np.all(np.isfinite(w)):
      raise ValueError("weights: must be finite")
  if average:
    if np.any(w < 0) or np.any(w.sum(1) <= 0):
      raise ValueError("weights: an average needs weights >= 0 with a positive sum per group")
    w = w / w.sum(1, keepdims=True)
  return w


def check_scalar(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False, what: str = "") -> float:
  """float(v), which must lie in [lo, hi] (open ends by lo_open / hi_open) and be finite."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: must be a number, got {v!r}") from None
  ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
  if not ok:
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{name}: must be in {rng}{what}, got {v!r}")
  return f


def check_chunk(chunk_size: Any) -> int | None:
  """chunk_size as an int >= 1, or None (all groups in one vmap)."""
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
  return int(chunk_size)


def check_group_ids(group_ids: Any, g: np.ndarray) -> Array:
  """RNG ids [G] of the groups (default: their rows); a twin group passes its original's id."""
  if group_ids is None:
    return jnp.arange(g.shape[0], dtype=jnp.int32)
  ids = np.asarray(group_ids)
  if ids.shape != (g.shape[0],) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
    raise ValueError(f"group_ids: must be non-negative ints of shape [G]=({g.shape[0]},), got "
                     f"shape {ids.shape} dtype {ids.dtype}")
  return jnp.asarray(ids, jnp.int32)


def check_key(key: Any) -> Array:
  """A single typed jax.random key (raw uint32[2] keys are wrapped); None is an error."""
  if key is None:
    raise ValueError("key: this merge draws random masks; pass an explicit jax.random key")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key: must be a single key, got a key array of shape {key.shape}")
    return key
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise ValueError(f"key: must be a jax.random key, got dtype {key.dtype} shape {key.shape}")
  return jax.random.wrap_key_data(key)


def prepare(x0, stack, groups, tasks, chunk_size):
  """Validates the trees, groups (and tasks) and chunk_size; returns (E, groups int32
  [G, M], chunk_size)."""
  E = check_trees(x0, stack)
  g = check_groups(groups, E, tasks)
  return E, g, check_chunk(chunk_size)


# ---------------------------------------------------------------------------------------------
# Mapping over groups, gathering members.

def map_rows(fn: Callable, xs: tuple, chunk_size: int | None):
  """fn(*row) over the leading axis of every array in xs: vmapped, in chunks of chunk_size."""
  n = jax.tree.leaves(xs)[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda row: fn(*row), xs, batch_size=chunk_size)


def flatten_stack(x0: Params, stack: Params):
  """(leaves of x0, leaves of the stack [E, ...], treedef), both in x0's tree order."""
  leaves0, treedef = jax.tree.flatten(x0)
  return leaves0, treedef.flatten_up_to(stack), treedef


def member_leaves(leaves_s: list, idx_M: Array) -> list:
  """Member parameters, leaves [M, ...] in float32."""
  return [s[idx_M].astype(jnp.float32) for s in leaves_s]


def task_vectors(leaves0: list, leaves_s: list, idx_M: Array) -> list:
  """Member task vectors tau_m = x_m - x0, leaves [M, ...] in float32."""
  return [s[idx_M].astype(jnp.float32) - a0.astype(jnp.float32)[None]
          for a0, s in zip(leaves0, leaves_s)]


def bcast(v: Array, like: Array) -> Array:
  """v [M] -> [M, 1, ..., 1] matching like [M, ...] (explicit, rank-promotion clean)."""
  return v.reshape(v.shape + (1,) * (like.ndim - 1))


def finish(leaves0: list, leaves_s: list, treedef, delta: list, scale) -> Params:
  """x0 + scale * delta, cast back to the stack dtype."""
  return treedef.unflatten([(a0.astype(jnp.float32) + scale * d).astype(s.dtype)
                            for a0, s, d in zip(leaves0, leaves_s, delta)])


# ---------------------------------------------------------------------------------------------
# The linear combination: x = c0 * x0 + sum_m c_m x_m, coefficients per leaf.

@functools.partial(jax.jit, static_argnames=("chunk_size",))
def linear_combination(x0: Params, stack: Params, groups: Array, coef_GxMxL: Array,
                       coef0_GxL: Array, chunk_size: int | None) -> Params:
  """x = c0 x0 + sum_m c_m x_m per group, with coefficients per member and leaf: coef_GxMxL
  [G, M, L], coef0_GxL [G, L] (L leaves in tree order); leaves [G, ...] in the stack dtype."""
  leaves0, leaves_s, treedef = flatten_stack(x0, stack)
  M = groups.shape[1]

  def one(idx_M, c_MxL, c0_L):
    out = []
    for l, (a0, s) in enumerate(zip(leaves0, leaves_s)):
      # One fused multiply-add per member: XLA reads each gathered row once and never
      # materialises the [M, ...] slab of member parameters.
      acc = c0_L[l] * a0.astype(jnp.float32)
      for m in range(M):
        acc = acc + c_MxL[m, l] * s[idx_M[m]].astype(jnp.float32)
      out.append(acc.astype(s.dtype))
    return treedef.unflatten(out)

  return map_rows(one, (groups, coef_GxMxL, coef0_GxL), chunk_size)


def num_leaves(x0: Params) -> int:
  """L, the number of leaves ("layers" of the layer-wise merges)."""
  return len(jax.tree.leaves(x0))


def run_linear(x0, stack, g, c_GxM, c0_G, chunk_size):
  """`linear_combination` with one coefficient per member c_GxM [G, M] and c0_G [G]."""
  L = num_leaves(x0)
  G, M = g.shape
  c = jnp.broadcast_to(jnp.asarray(c_GxM, jnp.float32).reshape(G, M, 1), (G, M, L))
  c0 = jnp.broadcast_to(jnp.asarray(c0_G, jnp.float32).reshape(G, 1), (G, L))
  return linear_combination(x0, stack, jnp.asarray(g), c, c0, chunk_size)


# ---------------------------------------------------------------------------------------------
# Data for the merges with a forward pass (AdaMerging, greedy soup, logit ensemble).

def check_data(E: int, x: Any, num_classes: Any, mask: Any, heads: Params,
               y: Any = None) -> tuple:
  """Validates per-expert data; returns (x, num_classes int32 [E], mask float32 [E, N], y)."""
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[0] != E:
    raise ValueError(f"x: must be per-expert inputs [E={E}, N, ...], got shape {x.shape}")
  N = x.shape[1]
  nc = np.asarray(num_classes)
  if nc.shape != (E,) or not np.issubdtype(nc.dtype, np.integer) or np.any(nc < 1):
    raise ValueError(f"num_classes: must be a positive int array [E]=({E},), got {nc.shape}")
  m = np.ones((E, N), np.float32) if mask is None else np.asarray(mask, np.float32)
  if m.shape != (E, N):
    raise ValueError(f"mask: must have shape [E, N]=({E}, {N}), got {m.shape}")
  if np.any(m.sum(1) <= 0):
    raise ValueError("mask: every expert needs at least one real sample")
  for h in jax.tree.leaves(heads):
    if np.shape(h)[:1] != (E,):
      raise ValueError(f"heads: leaves must have a leading expert axis E={E}, got "
                       f"{np.shape(h)}")
  if y is not None:
    y = np.asarray(y)
    if y.shape != (E, N) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"y: must be int labels [E, N]=({E}, {N}), got {y.shape} {y.dtype}")
    y = jnp.asarray(y)
  return x, jnp.asarray(nc, jnp.int32), jnp.asarray(m), y


def member_logits(model, backbone, heads_M, x_MxN, nc_M):
  """Masked logits [M, N, C] of one backbone with each member's head on its own inputs."""
  M, N = x_MxN.shape[:2]
  h = model.features(backbone, x_MxN.reshape((M * N,) + x_MxN.shape[2:]))
  h = h.reshape((M, N) + h.shape[1:])
  logits = jax.vmap(lambda hd, hm: model.head.apply({"params": hd}, hm))(heads_M, h)
  return jax.vmap(masked_logits)(logits, nc_M)


def gather_tree(tree, idx):
  """Rows idx of every leaf of a stacked tree."""
  return jax.tree.map(lambda a: a[idx], tree)
