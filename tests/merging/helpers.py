"""Shared fixtures-as-functions of the tests of stability.merging: small random trees, numpy
references, the tiny MLP setup of the data-dependent merges."""
import functools

import jax
import numpy as np

TOL = dict(rtol=1e-5, atol=1e-5)
GROUPS = np.array([[0, 1, 2], [3, 4, 5], [6, 0, 3], [2, 5, 1]], np.int32)


def trees(seed=0, E=7, scale=0.1):
  """Small random backbone-like tree (x0, stack [E, ...]) in float32."""
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": {"kernel": (5, 4), "bias": (4,)}, "Conv_0": {"kernel": (3, 3, 2, 3)}}
  x0 = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                    is_leaf=lambda s: isinstance(s, tuple))
  stack = jax.tree.map(lambda a: (a + scale * rng.normal(size=(E,) + a.shape)).astype(np.float32),
                       x0)
  return x0, stack


def items(tree):
  """(path, numpy leaf) pairs in a fixed order, for reference loops."""
  return [(jax.tree_util.keystr(p), np.asarray(a, np.float64))
          for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_tree_close(got, want, **tol):
  tol = tol or TOL
  for (p, a), (_, b) in zip(items(got), items(want)):
    np.testing.assert_allclose(a, b, err_msg=p, **tol)


def stack_ref(per_group, like):
  """List over groups of {path: leaf} -> tree like `like` with leaves [G, ...]."""
  paths = [p for p, _ in items(like)]
  leaves = [np.stack([d[p] for d in per_group]) for p in paths]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def flat_taus(x0, stack, row):
  """Task vectors of a group's members, flattened over leaves in tree order; float32 tau."""
  taus = [np.concatenate([(np.asarray(s[i], np.float32) - np.asarray(a0, np.float32)).ravel()
                          for a0, s in zip(jax.tree.leaves(x0), jax.tree.leaves(stack))])
          for i in row]
  return np.stack(taus).astype(np.float64)


def ref_trim(tau, k):
  n = int(np.ceil(round(k * tau.size, 6)))
  thr = np.sort(np.abs(tau))[::-1][n - 1]
  return np.where(np.abs(tau) >= thr, tau, 0.0)


def ref_ties_update(trimmed):
  """Elect sign by total mass (zeros -> majority), disjoint mean over agreeing entries."""
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
  return (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


def positive_like(stack, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.uniform(0.0, 2.0, s.shape).astype(np.float32), stack)


def random_grams(E, seed, d_in=5):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(E, 12, d_in))
  return {"Dense_0": (np.einsum("eni,enj->eij", A, A) / 12 + 0.5 * np.eye(d_in)).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def setup(E=5, N=8, seed=0):
  """A tiny MLP, E experts (pretrained backbone + noise, random heads), per-expert data."""
  from stability.models import get_model
  model = get_model("mlp", 3, widths=(6, 5))
  shape = (4, 4, 1)
  k0, k1 = jax.random.split(jax.random.key(seed))
  x0 = jax.jit(model.init_backbone, static_argnums=1)(k0, shape)
  rng = np.random.default_rng(seed)
  stack = jax.tree.map(
      lambda a: (a[None] + 0.3 * rng.normal(size=(E,) + a.shape)).astype(np.float32), x0)
  heads = jax.jit(jax.vmap(lambda k: model.init_head(k, x0, shape)))(jax.random.split(k1, E))
  x = rng.uniform(0, 1, (E, N) + shape).astype(np.float32)
  nc = np.array([2, 3, 3, 2, 3][:E], np.int32)
  y = (rng.integers(0, 6, (E, N)) % nc[:, None]).astype(np.int32)
  mask = np.ones((E, N), np.float32)
  mask[1, -3:] = 0.0  # padding rows
  return model, x0, stack, heads, x, y, nc, mask


def ref_member_logits(model, backbone, heads, rows, x_rows, nc):
  """Masked logits per member m (its head, its inputs), Python loop over members."""
  from stability.models import masked_logits
  out = []
  for m, i in enumerate(rows):
    params = {"backbone": backbone, "head": jax.tree.map(lambda a: a[i], heads)}
    out.append(masked_logits(model.apply(params, x_rows[m]), nc[i]))
  return out


def identical():
  """Seven identical experts, shaped like `trees()` so the compiled merges are reused."""
  x0, stack = trees()
  return x0, jax.tree.map(lambda s: np.repeat(s[:1], 7, axis=0), stack)
