"""Every notebook in notebooks/ runs headless (nbclient, offline) on a tiny results workdir.

The tiny studies run once per module through the library. `stability_hparams.py:tiny` runs with the G and
L constants on, so one workdir serves the stability notebooks and the theory comparison.
"""
import ast
import glob
import os
import re

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from stability import config, studies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
ENV = "MERGE_STABILITY_WORKDIR"

# tiny study: its config and overrides (no PNGs: the notebooks draw the figures). The merge
# comparison keeps one merge of each kind (linear, selecting, data-weighted, no parameters):
# the notebook needs no particular set, and tests/sweep_test.py runs all of them.
TINY = {
    "main": ("main.py:tiny", ()),
    "stability": ("stability_hparams.py:tiny", ("--config.stability.constants=true",)),
    "hetero": ("hetero.py:tiny", ()),
    "compare": ("compare_merges.py:tiny",
                ("--config.compare.merges=average,task_arithmetic,ties,fisher,ensemble",)),
}
# notebook (= the experiment config it analyses) -> the tiny study it reads in this test.
TINY_OF = {
    "main": "main",
    "stability_hparams": "stability",
    "stability_M": "stability",
    "stability_members": "stability",
    "theory_compare": "stability",
    "compare_merges": "compare",
    "hetero": "hetero",
}


def notebook_names() -> list[str]:
  return sorted(os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """study -> workdir, each tiny study run on first use, once per module."""
  done = {}
  cache = str(tmp_path_factory.mktemp("pretrain_cache"))

  def get(study: str) -> str:
    if study not in done:
      name, overrides = TINY[study]
      wd = str(tmp_path_factory.mktemp(study))
      cfg = config.load(os.path.join(ROOT, "experiments", name), overrides + (
          "--config.output.figures=false", f"--config.output.cache_dir={cache}"))
      studies.run(cfg, wd)
      done[study] = wd
    return done[study]
  return get


def test_every_notebook_is_covered_and_every_study_points_to_a_notebook():
  assert notebook_names() == sorted(TINY_OF), "add the new notebook to TINY_OF"
  # Each notebook analyses the experiment config of its name; every study config (not the
  # runner, not the shared section builders) names the notebook that analyses it in its docstring.
  for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in ("__init__", "run", "common"):
      continue
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    named = re.findall(r"notebooks/(\w+)\.ipynb", doc)
    assert named and set(named) <= set(TINY_OF), f"experiments/{name}.py: names no notebook"
    if name in TINY_OF:
      assert name in named
  assert set(TINY_OF) <= {os.path.splitext(os.path.basename(p))[0]
                          for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))}
  readme = open(os.path.join(NOTEBOOKS, "README.md")).read()
  assert set(re.findall(r"`(\w+)\.ipynb`", readme)) == set(TINY_OF)


@pytest.mark.parametrize("name", sorted(TINY_OF))
def test_notebook_is_committed_without_outputs_and_uses_only_the_library(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  # Imports and calls only: no definitions, loops or branches (they belong in the library).
  src = "\n".join(c.source for c in code)
  assert not re.search(r"^\s*(def|class|for|while|if|with|lambda)\b", src, re.M)
  assert f'os.environ.get("{ENV}", "../runs/{name}")' in src


@pytest.mark.parametrize("name", sorted(TINY_OF))
def test_notebook_executes_headless(name, tiny_workdir, monkeypatch):
  monkeypatch.setenv(ENV, tiny_workdir(TINY_OF[name]))
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  # The native kernel of this interpreter (ipykernel's spec built from sys.executable), not
  # whatever `python3` kernelspec the machine has installed.
  km = AsyncKernelManager(kernel_name="python3",
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  NotebookClient(nb, km=km, timeout=180,
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  draws = [c for c in nb.cells if c.cell_type == "code" and "plots." in c.source]
  assert draws
  for c in draws:  # every figure cell shows its figure once
    pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, c.source
