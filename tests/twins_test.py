"""Stability twins: neighbouring datasets, exact zero noise floor, never-drawn twins, the
least-squares closed form (float64, 1e-5), merged-twin distances == a per-group loop, the
1/M^2 law of the simple average, and the estimator."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from stability import evaluate
from stability import experts as experts_lib
from stability import merging
from stability import models
from stability import sharding
from stability import data as data_lib
from stability import train
from stability import twins

SUITE = data_lib.get_suite("tiny", 0)
ARRAYS = SUITE.arrays()
MODEL = models.get_model("mlp", SUITE.max_classes, widths=(16,))
BACKBONE = MODEL.init_backbone(jax.random.key(0), SUITE.image_shape)


def originals(task=(0, 1, 2, 3), eta=(0.1, 0.05, 0.2, 0.1), b=(4, 8, 5, 16), ratio=(1.0, 0.5,
              0.8, 1.0), seed=(0, 1, 2, 3), K=40, **kw):
  return experts_lib.make_experts(SUITE, task=task, eta=eta, b=b, K=K, data_ratio=ratio,
                                  seed=seed, **kw)


def train_stack(spec, milestones, model=MODEL, backbone=BACKBONE, mesh=None, pools=None,
                dtype=None, max_chunk=10):
  mesh = mesh or sharding.expert_mesh(jax.devices()[:1])
  pools = pools or train.Pools.from_arrays(ARRAYS)
  trainer = train.Trainer(model, "sgd", spec, pools, mesh=mesh, max_chunk=max_chunk)
  params = experts_lib.init_stack(model, backbone, spec, SUITE.image_shape)
  if dtype is not None:
    params = jax.tree.map(lambda a: a.astype(dtype), params)
  return {K: trainer.unpad(s) for K, s in trainer.run(trainer.init(params), milestones)}


def test_twins_are_neighbouring_datasets_with_shared_hyperparameters():
  spec = originals()
  both = twins.make_twins(spec, ARRAYS, m=3, seed=7)
  E = spec.size
  assert both.size == E * 5
  assert list(twins.roles(both)[:E]) == ["original"] * E
  assert list(twins.roles(both)[E:E + 4]) == ["twin"] * 3 + ["control"]
  for r in twins.twin_rows(both):
    i = both.origin[r]
    for f in ("task", "eta", "b", "K", "n", "seed", "momentum", "weight_decay", "num_classes"):
      assert getattr(both, f)[r] == getattr(both, f)[i], f
    diff = np.flatnonzero(both.subset[r] != both.subset[i])
    if both.replaced[r] < 0:
      assert diff.size == 0
    else:
      j, t = both.replaced[r], both.task[r]
      assert list(diff) == [j] and j < both.n[r]
      assert ARRAYS.n_train[t] <= both.subset[r, j] < ARRAYS.n_train[t] + ARRAYS.n_ghost[t]
  # The m positions of one expert are distinct; an eta-only change keeps them (common numbers).
  js = both.replaced[E:E + 3]
  assert len(set(js.tolist())) == 3
  other = twins.make_twins(originals(eta=(0.3, 0.3, 0.3, 0.3)), ARRAYS, m=3, seed=7)
  np.testing.assert_array_equal(other.subset, both.subset)
  moved = twins.make_twins(spec, ARRAYS, m=3, seed=8)
  assert not np.array_equal(moved.subset, both.subset)


@pytest.mark.parametrize("kw,field", [
    (dict(m=-1), "stability.num_twins"), (dict(m=1.5), "stability.num_twins"),
    (dict(m=1000), "stability.num_twins"), (dict(m=0, control=False), "stability.num_twins")])
def test_bad_twin_requests_name_the_field(kw, field):
  with pytest.raises(ValueError, match=f"^{field}: "):
    twins.make_twins(originals(), ARRAYS, **kw)


def test_twins_of_twins_and_groups_of_twins_are_refused():
  both = twins.make_twins(originals(), ARRAYS, m=1)
  with pytest.raises(ValueError, match="^experts: "):
    twins.make_twins(both, ARRAYS, m=1)
  with pytest.raises(ValueError, match="^groups: "):
    twins.twin_groups(np.array([[0, 5]]), both)


def test_control_twin_is_exactly_zero_when_sharded_and_perturbed_twins_move():
  """Noise floor on CPU: mixed b, momentum, 8 devices, twins on other devices than originals."""
  spec = originals(momentum=0.9, weight_decay=1e-4)
  both = twins.make_twins(spec, ARRAYS, m=2)
  snaps = train_stack(both, (20, 40), mesh=sharding.expert_mesh(jax.devices()[:8]))
  data = evaluate.EvalData.from_arrays(ARRAYS)
  roles = twins.roles(both)
  for K, snap in snaps.items():
    sq = twins.sq_distances(snap.params, both)
    ls = twins.loss_stability(evaluate.test_losses(MODEL, snap.params, both, data), both,
                              ARRAYS.n_test)
    assert np.all(sq["full"][roles == "control"] == 0.0)
    assert np.all(ls["max"][roles == "control"] == 0.0)
    assert np.all(sq["full"][roles == "original"] == 0.0)
    # By K = 40 every perturbed twin has drawn its sample (>= 1 epoch for every expert).
    if K == 40:
      assert np.all(sq["full"][roles == "twin"] > 0) and np.all(ls["mean"][roles == "twin"] > 0)
      # 'full' is every parameter of the row against its origin's, recomputed in float64 from
      # the raw leaves (rejects a missed leaf, the head left out, or the wrong origin row).
      leaves = [np.asarray(a, np.float64).reshape(a.shape[0], -1)
                for a in jax.tree.leaves(snap.params)]
      ref = sum(((a - a[both.origin]) ** 2).sum(1) for a in leaves)
      np.testing.assert_allclose(sq["full"], ref, rtol=1e-5, atol=1e-12)


def first_draw(expert, j):
  """First step at which subset position j is in the expert's minibatch."""
  B, N = int(expert.b), expert.subset.shape[0]
  for k in range(10_000):
    pos, mask = train.batch_positions(jnp.int32(expert.seed), k, jnp.int32(expert.n),
                                      jnp.int32(expert.b), B, N)
    if j in np.asarray(pos)[np.asarray(mask)]:
      return k
  raise AssertionError("never drawn")


def test_twin_is_identical_until_its_replaced_sample_is_drawn():
  spec = originals(task=(1,), eta=(0.1,), b=(4,), ratio=(1.0,), seed=(3,), momentum=0.9)
  both = twins.make_twins(spec, ARRAYS, m=4, control=False)
  draws = [first_draw(jax.tree.map(lambda a: a[r], both), int(both.replaced[r]))
           for r in range(1, 5)]
  assert max(draws) >= 2, draws  # some twin stays untouched for a while
  last = max(draws) + 2
  snaps = train_stack(both, tuple(range(1, last + 1)), max_chunk=1)
  for r, k_star in zip(range(1, 5), draws):
    for K, snap in snaps.items():
      sq = twins.sq_distances(snap.params, both)["full"][r]
      # After K steps the update of step K - 1 is in: the twin moves once step k* is taken.
      assert (sq == 0.0) == (K <= k_star), (r, K, k_star, sq)


# ---------------------------------------------------------------------------------------------
# Closed form: least squares, linear model, plain SGD (momentum 0, weight decay 0), float64.

def closed_form_sq(expert, twin, pools_x, pools_y, theta0, eta, K_list):
  """||Delta_K||^2 from the exact linear recursion of the twin difference.

  Theta = [W; bias] (D+1, C), a~ = [a, 1]; per step with batch B_k and
  H_k = sum_{s in B_k} a~_s a~_s^T, R_k = sum_s a~_s e_s^T (one-hot targets, valid classes):
    Theta_{k+1} = Theta_k - eta/b (H_k Theta_k - R_k)            (original)
    Delta_{k+1} = (I - eta/b H_k) Delta_k
                  - eta/b 1[j in B_k] ((a'a'^T - a_j a_j^T) Theta'_k - (a' e'^T - a_j e_j^T))
  with Theta'_k = Theta_k + Delta_k, masked to the task's classes.
  """
  t, n, b, j = int(expert.task), int(expert.n), int(expert.b), int(twin.replaced)
  B, N = b, expert.subset.shape[0]
  C = theta0.shape[1]
  valid = (np.arange(C) < int(expert.num_classes)).astype(np.float64)

  def feat(row):
    return np.append(pools_x[t, row].reshape(-1), 1.0)

  def target(row):
    return np.eye(C)[pools_y[t, row]] * valid

  theta, delta = theta0.copy(), np.zeros_like(theta0)
  a_j, e_j = feat(expert.subset[j]), target(expert.subset[j])
  a_p, e_p = feat(twin.subset[j]), target(twin.subset[j])
  out = {}
  for k in range(max(K_list)):
    pos, mask = train.batch_positions(jnp.int32(expert.seed), k, jnp.int32(n), jnp.int32(b), B, N)
    pos = np.asarray(pos)[np.asarray(mask)]
    A = np.stack([feat(expert.subset[p]) for p in pos])
    Y = np.stack([target(expert.subset[p]) for p in pos])
    H, R = A.T @ A, A.T @ Y
    new_delta = delta - eta / b * (H @ delta) * valid
    if j in pos:
      forcing = (np.outer(a_p, a_p) - np.outer(a_j, a_j)) @ (theta + delta) \
          - (np.outer(a_p, e_p) - np.outer(a_j, e_j))
      new_delta = new_delta - eta / b * forcing * valid
    theta = theta - eta / b * (H @ theta - R) * valid
    delta = new_delta
    if k + 1 in K_list:
      out[k + 1] = float(np.sum(delta ** 2))
  return out


@pytest.mark.parametrize("b,ratio", [(None, 0.5), (4, 1.0)], ids=["full_batch_gd", "sgd"])
def test_estimator_equals_least_squares_closed_form_float64(b, ratio):
  with jax.enable_x64(True):
    model = models.get_model("linear", SUITE.max_classes, loss="squared")
    n = data_lib.subset_size(SUITE.tasks[2].n_train, ratio)
    spec = originals(task=(2,), eta=(0.05,), b=(b or n,), ratio=(ratio,), seed=(5,), K=60,
                     momentum=0.0, weight_decay=0.0)
    both = twins.make_twins(spec, ARRAYS, m=3, control=False)
    pools = train.Pools(x=jnp.asarray(ARRAYS.x_pool, jnp.float64), y=jnp.asarray(ARRAYS.y_pool))
    milestones = (10, 30, 60)
    snaps = train_stack(both, milestones, model=model, backbone={}, pools=pools,
                        dtype=jnp.float64)
    head0 = experts_lib.init_stack(model, {}, spec, SUITE.image_shape)["head"]
    theta0 = np.concatenate([np.asarray(head0["Dense_0"]["kernel"][0], np.float64),
                             np.asarray(head0["Dense_0"]["bias"][0], np.float64)[None]])
    eta = float(np.float32(0.05))
    for r in range(1, 4):
      ref = closed_form_sq(jax.tree.map(lambda a: a[0], both), jax.tree.map(lambda a: a[r], both),
                           ARRAYS.x_pool, ARRAYS.y_pool, theta0, eta, milestones)
      for K in milestones:
        got = twins.sq_distances(snaps[K].params, both)["full"][r]
        np.testing.assert_allclose(got, ref[K], rtol=1e-5, atol=0)  # ref = 0 (not yet drawn): 0
      assert ref[milestones[-1]] > 0


# ---------------------------------------------------------------------------------------------
# Merged-model stability.

@pytest.fixture(scope="module")
def trained_twins():
  spec = originals(K=30)
  both = twins.make_twins(spec, ARRAYS, m=2)
  snap = train_stack(both, (30,))[30]
  return both, snap.params


GROUPS = np.array([[0, 1, 2], [1, 2, 3], [0, 2, 3]])


@pytest.mark.parametrize("name,hp", [
    ("average", {}), ("task_arithmetic", dict(lam=0.5)), ("ties", dict(k=0.3)),
    ("dare_average", dict(key=jax.random.key(3), p=0.3))])
def test_merged_twin_distances_equal_a_per_group_loop(trained_twins, name, hp):
  both, params = trained_twins
  out = twins.merged_sq_distances(twins.merge_fn(name, **hp), BACKBONE, params["backbone"],
                                  params["head"], GROUPS, both)
  roles = twins.roles(both)
  assert len(out["row"]) == GROUPS.size * 3  # 2 twins + 1 control per member
  fn = merging.get(name)
  extra = lambda g: {"group_ids": np.array([g])} if name.startswith("dare") else {}
  for t, (g, p, r) in enumerate(zip(out["base"], out["pos"], out["row"])):
    orig = GROUPS[g]
    twin = orig.copy()
    twin[p] = r
    a = fn(BACKBONE, params["backbone"], orig[None], **hp, **extra(g))
    c = fn(BACKBONE, params["backbone"], twin[None], **hp, **extra(g))
    ref = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    np.testing.assert_allclose(out["backbone"][t], ref, rtol=1e-4, atol=1e-12)
    if roles[r] == "control":
      assert out["backbone"][t] == 0.0 and out["full"][t] == 0.0
    # 'full' adds the distance of the replaced member's own head (task i's merged model is the
    # merged backbone with head i): rejects no head, every member's head, or the wrong row's.
    i = both.origin[r]
    head = sum(float(np.sum((np.asarray(h, np.float64)[r] - np.asarray(h, np.float64)[i]) ** 2))
               for h in jax.tree.leaves(params["head"]))
    np.testing.assert_allclose(out["full"][t] - out["backbone"][t], head, rtol=1e-4,
                               atol=1e-10)


def test_simple_average_scales_member_stability_by_one_over_M_squared(trained_twins):
  both, params = trained_twins
  member = twins.sq_distances(params, both)["backbone"]
  for groups in (GROUPS[:, :2], GROUPS, np.array([[0, 1, 2, 3]])):
    out = twins.merged_sq_distances(twins.merge_fn("average"), BACKBONE, params["backbone"],
                                    params["head"], groups, both)
    M = groups.shape[1]
    np.testing.assert_allclose(out["backbone"], member[out["row"]] / M ** 2, rtol=1e-4,
                               atol=1e-12)


def test_dare_twins_share_their_original_groups_masks(trained_twins):
  """Without the shared RNG id the twin group would get fresh masks: a much larger distance."""
  both, params = trained_twins
  fn = twins.merge_fn("dare_average", key=jax.random.key(0), p=0.5)
  shared = twins.merged_sq_distances(fn, BACKBONE, params["backbone"], params["head"], GROUPS,
                                     both)
  ctrl = twins.roles(both)[shared["row"]] == "control"
  assert np.all(shared["backbone"][ctrl] == 0.0)
  unshared = lambda x0, s, g, ids: merging.dare(x0, s, g, key=jax.random.key(0), p=0.5,
                                                base="average")
  fresh = twins.merged_sq_distances(unshared, BACKBONE, params["backbone"], params["head"],
                                    GROUPS, both)
  assert np.all(fresh["backbone"][ctrl] > 0)


# ---------------------------------------------------------------------------------------------
# The estimator.

def test_estimate_is_mean_standard_error_and_t_interval():
  x = np.random.default_rng(0).exponential(size=37)
  est = twins.estimate(x, level=0.9)
  se = x.std(ddof=1) / np.sqrt(37)
  lo, hi = scipy.stats.t.interval(0.9, 36, loc=x.mean(), scale=se)
  np.testing.assert_allclose([est["mean"], est["se"], est["ci_lo"], est["ci_hi"], est["max"]],
                             [x.mean(), se, lo, hi, x.max()], rtol=1e-12)
  assert est["count"] == 37
  one = twins.estimate([2.0])
  assert one["mean"] == 2.0 and np.isnan(one["se"])
  with pytest.raises(ValueError, match="^samples: "):
    twins.estimate([])
  with pytest.raises(ValueError, match="^level: "):
    twins.estimate(x, level=1.0)


def test_estimate_table_groups_rows():
  df = pd.DataFrame(dict(eta=[0.1, 0.1, 0.1, 0.2, 0.2], K=[1, 1, 2, 1, 1],
                         sq=[1.0, 3.0, 5.0, 2.0, 4.0]))
  t = twins.estimate_table(df, ["eta", "K"], "sq")
  assert t[["eta", "K", "mean", "count"]].values.tolist() == [[0.1, 1, 2.0, 2], [0.1, 2, 5.0, 1],
                                                              [0.2, 1, 3.0, 2]]
