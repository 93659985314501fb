"""The tiny studies' results, pinned: every stored row, summary.json (less wall time) and CSV of
the four tiny studies equal the files in tests/studies/pinned/ exactly.

The pins were recorded before the studies, merging and data packages were split out of
`sweep.py`, `merge.py`, `tasks.py` and `loaders.py`; the refactor kept them bit-identical. Any
change to what a study computes (a merge, an estimator, a seed, a row field) fails here. On a
machine other than the one that recorded them (`pinned/MACHINE.json`: CPU model and library
versions; XLA's CPU code differs by instruction set), floats are compared to rtol 1e-4 instead.
A deliberate change of results re-pins with `python tests/studies/pinned_test.py` and says why
in its commit.
"""
import glob
import gzip
import json
import math
import os
import platform
import sqlite3

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = os.path.join(HERE, "pinned")
# pin name -> config (names of the pre-refactor config files)
STUDIES = {"main_tiny": "main.py:tiny", "stability_tiny": "stability_hparams.py:tiny",
           "theory_compare_tiny": "theory_compare.py:tiny",
           "compare_merges_tiny": "compare_merges.py:tiny"}


def machine() -> dict:
  import jax
  import jaxlib
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor())
  return dict(cpu=cpu, jax=jax.__version__, jaxlib=jaxlib.__version__, numpy=np.__version__)


def rows(workdir: str) -> list[dict]:
  with sqlite3.connect(os.path.join(workdir, "results.sqlite")) as db:
    return [json.loads(d) for (d,) in db.execute("SELECT data FROM rows ORDER BY id")]


def summary(workdir: str) -> dict:
  s = json.load(open(os.path.join(workdir, "summary.json")))
  s.pop("wall_time", None)
  return s


def csvs(workdir: str) -> dict[str, str]:
  return {os.path.basename(p): open(p).read() for p in sorted(glob.glob(f"{workdir}/*.csv"))}


def _close(got, want, path: str, rtol: float) -> None:
  if isinstance(want, dict):
    assert isinstance(got, dict) and sorted(got) == sorted(want), f"{path}: keys differ"
    for k in want:
      _close(got[k], want[k], f"{path}.{k}", rtol)
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), f"{path}: lengths differ"
    for i, (a, b) in enumerate(zip(got, want)):
      _close(a, b, f"{path}[{i}]", rtol)
  elif isinstance(want, float) and math.isnan(want):
    assert isinstance(got, float) and math.isnan(got), f"{path}: {got!r} != nan"
  elif isinstance(want, float) and rtol:
    assert got == pytest.approx(want, rel=rtol, abs=1e-12), f"{path}: {got!r} != {want!r}"
  else:
    assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_tiny_study_results_equal_the_pins(name, tiny_run):
  wd = tiny_run(STUDIES[name])
  same = json.load(open(os.path.join(PINNED, "MACHINE.json"))) == machine()
  rtol = 0.0 if same else 1e-4
  with gzip.open(os.path.join(PINNED, f"{name}.rows.jsonl.gz"), "rt") as f:
    want_rows = [json.loads(line) for line in f if line.strip()]
  _close(rows(wd), want_rows, f"{name}.rows", rtol)
  _close(summary(wd), json.load(open(os.path.join(PINNED, f"{name}.summary.json"))),
         f"{name}.summary", rtol)
  want_csv = {os.path.basename(p)[len(name) + 1:]: open(p).read()
              for p in sorted(glob.glob(os.path.join(PINNED, f"{name}.*.csv")))}
  got_csv = csvs(wd)
  assert sorted(got_csv) == sorted(want_csv)
  if same:
    for k in want_csv:
      assert got_csv[k] == want_csv[k], f"{name}: {k} differs"


def test_the_pins_catch_a_changed_number(tmp_path):
  """The comparison is exact on the pinning machine: one ulp in one row fails it."""
  with gzip.open(os.path.join(PINNED, "main_tiny.rows.jsonl.gz"), "rt") as f:
    want = [json.loads(line) for line in f if line.strip()]
  got = json.loads(json.dumps(want))
  got[5]["test_loss"] = float(np.nextafter(got[5]["test_loss"], np.inf))
  with pytest.raises(AssertionError, match=r"rows\[5\]\.test_loss"):
    _close(got, want, "rows", 0.0)
  _close(json.loads(json.dumps(want)), want, "rows", 0.0)


def repin() -> None:
  """Reruns the four tiny studies and rewrites the pins and MACHINE.json."""
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as tests/conftest.py
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import tempfile
  import jax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  from experiments import run as runner
  for name, config in STUDIES.items():
    wd = tempfile.mkdtemp()
    assert runner.main([f"experiments/{config}", "--workdir", wd,
                        "--config.output.figures=false"]) == 0
    with gzip.open(os.path.join(PINNED, f"{name}.rows.jsonl.gz"), "wt") as f:
      f.write("\n".join(json.dumps(r) for r in rows(wd)) + "\n")
    json.dump(summary(wd), open(os.path.join(PINNED, f"{name}.summary.json"), "w"),
              sort_keys=True, indent=1)
    for k, text in csvs(wd).items():
      open(os.path.join(PINNED, f"{name}.{k}"), "w").write(text)
  json.dump(machine(), open(os.path.join(PINNED, "MACHINE.json"), "w"), indent=1)


if __name__ == "__main__":
  repin()
