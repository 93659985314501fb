"""stability.merging.registry: dispatch and error message; every entry runs with exactly its
declared needs; flags, study lists and filters."""
import jax
import numpy as np
import pytest

from stability import merging
from tests.merging.helpers import GROUPS, assert_tree_close, setup, trees


def test_registry_dispatches_and_lists_names():
  x0, stack = trees()
  assert merging.get("average") is merging.average
  assert_tree_close(merging.merge("task_arithmetic", x0, stack, GROUPS, lam=0.5),
                    merging.task_arithmetic(x0, stack, GROUPS, lam=0.5), rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"algorithm: unknown merge 'mean'; allowed: .*average"):
    merging.merge("mean", x0, stack, GROUPS)


# The study lists as the studies had them before the registry held them (order is what their
# error messages list).
STACK_ONLY = ("average", "task_arithmetic", "ties", "dare_average", "dare_task_arithmetic",
              "dare_ties", "uniform_soup", "model_stock")
# Issue #21's merges are appended after them (the pinned studies' names keep their order).
NEW = ("tsv_m", "iso_c", "breadcrumbs", "magmax", "iso_cts", "della")
NEW_EXCLUDED = ("emr", "metrics_weighted")
DATA = ("fisher", "regmean", "adamerging_task", "adamerging_layer", "greedy_soup")
NEW_DATA = ("regmean_plusplus",)


def test_registry_holds_every_merge_under_its_old_name():
  assert list(merging.ALGORITHMS) == [
      "average", "weighted_average", "task_arithmetic", "ties", "dare", "dare_average",
      "dare_task_arithmetic", "dare_ties", "fisher", "regmean", "adamerging", "adamerging_task",
      "adamerging_layer", "uniform_soup", "greedy_soup", "slerp", "model_stock", "tsv_m", "iso_c", "breadcrumbs", "magmax", "iso_cts", "della", "emr",
      "metrics_weighted", "regmean_plusplus"]
  for name, a in merging.ALGORITHMS.items():
    assert a.name == name and merging.get(name) is a.fn and merging.algorithm(name) is a
  # The fixed variants are the generic function with one argument bound.
  for name, kw in [("dare_average", {"base": "average"}), ("dare_ties", {"base": "ties"}),
                   ("dare_task_arithmetic", {"base": "task_arithmetic"}),
                   ("adamerging_task", {"granularity": "task"}),
                   ("adamerging_layer", {"granularity": "layer"})]:
    fn = merging.get(name)
    assert fn.func is merging.get(name.split("_")[0]) and fn.keywords == kw and fn.args == ()


def test_study_lists_keep_their_names_and_order():
  # Rejects a registry that reorders entries, lets a generic form (dare, adamerging), a
  # per-call-weights merge or slerp into a study, or lists the ensemble as a merge.
  assert merging.stack_only() == STACK_ONLY + NEW
  assert merging.data_merges() == DATA + NEW_DATA
  assert merging.compare_names() == STACK_ONLY + NEW + DATA + NEW_DATA + ("ensemble",)
  assert "ensemble" not in merging.ALGORITHMS
  with pytest.raises(ValueError, match=r"algorithm: unknown merge 'ensemble'"):
    merging.get("ensemble")


def test_excluded_entries_say_why_and_are_in_no_study_list():
  excluded = {n: a.excluded for n, a in merging.ALGORITHMS.items() if a.excluded is not None}
  assert set(excluded) == {"weighted_average", "dare", "adamerging", "slerp", *NEW_EXCLUDED}
  assert all(isinstance(why, str) and why for why in excluded.values())
  assert not set(excluded) & set(merging.compare_names())
  assert set(merging.ALGORITHMS) == (set(excluded) | set(STACK_ONLY) | set(NEW) | set(DATA)
                                     | set(NEW_DATA))


def test_flags_of_known_algorithms():
  A = merging.ALGORITHMS
  flags = lambda n: (A[n].linear, A[n].masked, A[n].random, A[n].data_dependent)
  #                                 linear masked random data
  assert flags("average") == (True, False, False, False)
  assert flags("task_arithmetic") == (True, False, False, False)
  assert flags("ties") == (False, True, False, False)            # mask depends on the taus
  assert flags("dare_average") == (True, True, True, False)      # masked-linear: mask from key
  assert flags("dare_ties") == (False, True, True, False)
  assert flags("dare") == (False, True, True, False)             # its base may be 'ties'
  assert flags("fisher") == (False, False, False, True)
  assert flags("adamerging_layer") == (False, False, True, True)
  assert flags("greedy_soup") == (False, False, False, True)
  assert flags("model_stock") == (False, False, False, False)
  assert flags("tsv_m") == (False, False, False, False)          # SVD truncation
  assert flags("iso_c") == (False, False, False, False)          # spectrum depends on taus
  assert flags("breadcrumbs") == (False, True, False, False)     # mask from the taus
  assert flags("magmax") == (False, True, False, False)          # selection by |tau|
  assert flags("iso_cts") == (False, False, False, False)
  assert flags("della") == (False, True, True, False)            # ranked drops, key-drawn
  assert flags("emr") == (False, True, False, False)
  assert flags("metrics_weighted") == (False, False, False, True)  # weights from train losses
  assert flags("regmean_plusplus") == (False, False, False, True)
  assert not any(a.mask_from_data for a in A.values())           # no mask from data yet
  assert {a.family for a in A.values()} == {"linear", "sparse", "data_aware", "learned",
                                            "geometric", "spectral", "magnitude"}
  for a in A.values():  # the family is the module that implements the function
    fn = getattr(a.fn, "func", a.fn)
    assert fn.__module__ == f"stability.merging.{a.family}", a.name


def test_flags_agree_with_needs_and_signatures():
  # `random` drives twins.merge_fn: a merge flagged random must take group_ids (else the twin
  # merge crashes) and one that takes group_ids must be flagged (else twins get fresh masks).
  import inspect
  for n, a in merging.ALGORITHMS.items():
    params = inspect.signature(a.fn).parameters
    assert a.random == ("group_ids" in params) == ("key" in a.needs), n
    assert a.data_dependent == bool(set(a.needs) & set(merging.registry.DATA_INPUTS)), n
    assert set(a.needs) <= set(merging.registry.INPUTS), n
    assert not (a.linear and a.data_dependent), n
  for n in merging.stack_only():
    assert set(merging.ALGORITHMS[n].needs) <= {"key"}, n


def test_names_filters_by_any_field():
  assert merging.names() == tuple(merging.ALGORITHMS)
  assert merging.names(data_dependent=False) == (
      "average", "weighted_average", "task_arithmetic", "ties", "dare", "dare_average",
      "dare_task_arithmetic", "dare_ties", "uniform_soup", "slerp", "model_stock", "tsv_m", "iso_c", "breadcrumbs", "magmax", "iso_cts", "della",
      "emr")
  assert merging.names(linear=True, masked=True) == ("dare_average", "dare_task_arithmetic")
  assert merging.names(family="geometric", excluded=None) == ("model_stock",)
  with pytest.raises(ValueError, match=r"filters: unknown field 'kind'; allowed: family"):
    merging.names(kind="linear")


def stack_rows(stack):
  return jax.tree.leaves(stack)[0].shape[0]


def _inputs(need, model, stack, heads, x, y, nc, mask, G):
  """Tiny inputs for one need of the registry (as `merging.inputs` builds them for a study)."""
  if need == "key":
    return {"key": jax.random.key(0)}
  if need == "fishers":
    F = jax.vmap(lambda p, xx, yy, c, m: merging.diag_fisher(model, p, xx, yy, c, m))(
        {"backbone": stack, "head": heads}, x, y, nc, mask)
    return {"fishers": F}
  if need == "grams":
    return {"grams": jax.vmap(lambda bb, xx, m: merging.gram_matrices(model, bb, xx, m))(
        stack, x, mask)}
  if need == "weights":
    return {"weights": np.ones((G, 2), np.float32)}
  if need == "samples":
    return {"model": model, "x": x, "mask": mask}
  if need == "losses":
    return {"losses": np.linspace(0.1, 1.0, stack_rows(stack))}
  data = dict(model=model, heads=heads, x=x, num_classes=nc, mask=mask)
  return dict(data, y=y) if need == "heldout" else data


@pytest.mark.parametrize("name", list(merging.ALGORITHMS))
def test_every_entry_runs_with_exactly_its_declared_needs(name):
  """Rejects an entry that declares too little (a required keyword would be missing) or too
  much (an unexpected keyword), and merges that return something other than [G, ...] trees."""
  model, x0, stack, heads, x, y, nc, mask = setup()
  groups = np.array([[0, 1], [2, 4], [3, 1]], np.int32)  # M = 2: slerp merges pairs
  a = merging.ALGORITHMS[name]
  kw = {}
  for need in a.needs:
    kw.update(_inputs(need, model, stack, heads, x, y, nc, mask, len(groups)))
  if "unlabelled" in a.needs:
    kw["steps"] = 2
  merged = a(x0, stack, groups, **kw)
  assert jax.tree.structure(merged) == jax.tree.structure(x0)
  lead = (3, 2) if name == "emr" else (3,)   # EMR: one backbone per member [G, M, ...]
  for m, a0 in zip(jax.tree.leaves(merged), jax.tree.leaves(x0)):
    assert m.shape == lead + a0.shape and np.all(np.isfinite(m))
