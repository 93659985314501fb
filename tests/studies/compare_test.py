"""stability.studies.compare through the runner: every algorithm on the same groups and K."""
import json
import os

import numpy as np
import pytest

from stability import config as config_lib
from stability import merging, results

CONFIG = "compare_merges.py:tiny"


@pytest.fixture(scope="module")
def compare_dir(tiny_run):
  return tiny_run(CONFIG)


def test_compare_study_runs_every_algorithm_on_the_same_groups(compare_dir):
  df = results.load(compare_dir)
  mc, dg = df[df.kind == "merge_compare"], df[df.kind == "diagnostics"]
  algos = set(config_lib.load(f"experiments/{CONFIG}").compare.merges)
  assert algos <= set(merging.registry.compare_names())
  assert set(mc.algorithm) == algos and len(algos) == 14 and "regmean" in algos
  G = 2 * 3  # configs x groups
  assert (mc.groupby(["K", "algorithm"]).size() == G).all() and len(dg) == G * 2
  sig = mc.groupby(["K", "algorithm"]).apply(lambda d: tuple(map(tuple, d.tasks)),
                                             include_groups=False)
  assert len(set(sig)) == 1  # identical groups for every algorithm and K
  by = mc.set_index(["K", "algorithm", "config", "group"])
  # uniform soup is the average; the ensemble has no parameters, hence no stability.
  np.testing.assert_allclose(by.xs("uniform_soup", level=1).test_acc,
                             by.xs("average", level=1).test_acc)
  assert by.xs("ensemble", level=1).merged_eps2.isna().all()
  ratio = mc.merged_eps2 / mc.member_eps2
  np.testing.assert_allclose(ratio[mc.algorithm == "average"], 1 / 4, rtol=1e-4)
  np.testing.assert_allclose(ratio[mc.algorithm == "task_arithmetic"], 0.09, rtol=1e-4)
  assert mc.test_acc.between(0, 1).all() and (dg.sign_conflict.between(0, 1)).all()
  s = json.load(open(os.path.join(compare_dir, "summary.json")))
  assert set(s["table_at_Kmax"]) == algos
  assert os.path.getsize(os.path.join(compare_dir, "merge_comparison.png")) > 10_000


@pytest.mark.parametrize("arg,msg", [
    ("--config.compare.merges=average,bogus", "compare.merges: unknown merge 'bogus'"),
    ("--config.compare.samples=0", "compare.samples"),
    ("--config.compare.adamerging_steps=-1", "compare.adamerging_steps")])
def test_compare_bad_input_fails_before_compute(fails_before_compute, arg, msg):
  assert msg in fails_before_compute(CONFIG, arg)
