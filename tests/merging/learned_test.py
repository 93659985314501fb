"""stability.merging.learned: AdaMerging == a per-group loop of Adam steps on the entropy;
the greedy soup == Algorithm 1 of Wortsman et al., never worse than its best member."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import (assert_tree_close, items, ref_member_logits, setup,
                                   stack_ref)


@pytest.mark.parametrize("granularity,chunk", [("task", None), ("layer", 1)])
def test_adamerging_matches_per_group_loop(granularity, chunk):
  import optax
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1], [2, 4]], np.int32)
  key, steps, bs, L = jax.random.key(3), 3, 4, len(jax.tree.leaves(x0))
  kw = dict(model=model, heads=heads, x=x, num_classes=nc, key=key, mask=mask,
            granularity=granularity, steps=steps, batch_size=bs, lr=0.05, chunk_size=chunk)
  lam = merging.adamerging_coefficients(x0, stack, groups, **kw)
  assert lam.shape == ((2, 2) if granularity == "task" else (2, 2, L))

  def entropy(lam_m, kb, rows):
    lam_ml = jnp.broadcast_to(jnp.reshape(lam_m, (2, -1)), (2, L))
    leaves = [a0 + sum(lam_ml[m, l] * (s[rows[m]] - a0) for m in range(2))
              for l, (a0, s) in enumerate(zip(jax.tree.leaves(x0), jax.tree.leaves(stack)))]
    merged = jax.tree.unflatten(jax.tree.structure(x0), leaves)
    keys = jax.random.split(kb, 2)
    total = 0.0
    for m in range(2):
      i = rows[m]
      p_i = jnp.asarray(mask)[i] / jnp.sum(jnp.asarray(mask)[i])
      xb = jnp.asarray(x)[i][jax.random.choice(keys[m], x.shape[1], (bs,), p=p_i)]
      logits = ref_member_logits(model, merged, heads, [i], [xb], jnp.asarray(nc))[0]
      logp = jax.nn.log_softmax(logits)
      total = total + jnp.mean(-jnp.sum(jnp.exp(logp) * logp, -1))
    return total

  opt = optax.adam(0.05)

  @jax.jit
  def run_group(g, rows):
    """One group, step by step: Adam on the entropy, then clip to [0, 1]."""
    lam_g = jnp.full((2,) if granularity == "task" else (2, L), 0.3)
    state = opt.init(lam_g)
    for i in range(steps):
      gr = jax.grad(entropy)(lam_g, jax.random.fold_in(jax.random.fold_in(key, g), i), rows)
      upd, state = opt.update(gr, state, lam_g)
      lam_g = jnp.clip(optax.apply_updates(lam_g, upd), 0.0, 1.0)
    return lam_g

  for g, rows in enumerate(groups):
    np.testing.assert_allclose(lam[g], run_group(g, rows), rtol=1e-4, atol=1e-5)
  # The merged backbone is x0 + sum_m lam_m tau_m with those coefficients.
  lam_gml = np.broadcast_to(np.asarray(lam).reshape(2, 2, -1), (2, 2, L))
  want = []
  for g, rows in enumerate(groups):
    want.append({p: a0 + sum(lam_gml[g, m, l] * (s[i] - a0) for m, i in enumerate(rows))
                 for l, ((p, a0), (_, s)) in enumerate(zip(items(x0), items(stack)))})
  got = merging.adamerging(x0, stack, groups, **kw)
  assert_tree_close(got, stack_ref(want, x0), rtol=1e-5, atol=1e-5)


def _ref_accuracy(model, backbone, heads, rows, x, y, nc, mask):
  accs = []
  for m, logits in enumerate(ref_member_logits(model, backbone, heads, rows,
                                               [x[i] for i in rows], nc)):
    i = rows[m]
    accs.append(np.sum((np.argmax(logits, -1) == y[i]) * mask[i]) / mask[i].sum())
  return float(np.mean(accs))


def test_greedy_soup_matches_reference_and_never_loses_to_its_best_member():
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1, 2], [3, 4, 0], [2, 3, 4], [1, 3, 0]], np.int32)
  soup, info = merging.greedy_soup(x0, stack, groups, model=model, heads=heads, x=x, y=y,
                                   num_classes=nc, mask=mask, return_info=True, chunk_size=2)
  for g, rows in enumerate(groups):
    members = [jax.tree.map(lambda a: np.asarray(a[i], np.float64), stack) for i in rows]
    acc = lambda bb: _ref_accuracy(model, bb, heads, rows, x, y, nc, mask)
    member_acc = [acc(b) for b in members]
    np.testing.assert_allclose(info["member_accuracy"][g], member_acc, atol=1e-6)
    ingredients, best, included = [], -1.0, np.zeros(3, bool)
    for j in np.argsort(-np.asarray(member_acc), kind="stable"):
      cand = jax.tree.map(lambda *a: np.mean(a, 0), *(ingredients + [members[j]]))
      a = acc(cand)
      if not ingredients or a >= best:
        ingredients, best, included[j] = ingredients + [members[j]], a, True
    np.testing.assert_array_equal(info["included"][g], included)
    want = jax.tree.map(lambda *a: np.mean(a, 0), *ingredients)
    assert_tree_close(jax.tree.map(lambda a: a[g], soup), want)
    got_acc = acc(jax.tree.map(lambda a: np.asarray(a[g]), soup))
    assert got_acc >= max(member_acc) - 1e-9
    assert float(info["accuracy"][g]) == pytest.approx(got_acc)
