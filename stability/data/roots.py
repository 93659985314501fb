"""A data root: where each task's dataset lives under it, which are missing, and reading one.

`locations` lists the (kind, path) candidates for a task in the order they are tried (folder,
npz, arrays, hf, then tfds when the task has a TFDS name); `locate` returns the first usable one.
`find_missing` and `describe_missing` say which datasets are absent and where they were looked
for, loading nothing; `discover` lists every dataset under a root. `read_dataset` locates and
loads one dataset, reusing preprocessed arrays from `cache_dir` when given (keyed by the loader
kind, the path, the files below it, the preprocessing and the row limits).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from stability.data import catalog
from stability.data import sources
from stability.data import transforms


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


# ---------------------------------------------------------------------------------------------
# Where datasets live under a data root.

def locations(data_root: str, spec: catalog.DatasetSpec | str) -> list[tuple[str, str]]:
  """(kind, path) candidates for one dataset, in the order they are tried."""
  spec = catalog.dataset_spec(spec) if isinstance(spec, str) else spec
  r, n = os.path.expanduser(data_root), spec.name
  out = [("folder", os.path.join(r, n)), ("npz", os.path.join(r, n + ".npz")),
         ("arrays", os.path.join(r, n)), ("hf", os.path.join(r, "hf", n))]
  if spec.tfds:
    out.append(("tfds", os.path.join(r, "tfds", *spec.tfds.split(":")[0].split("/"))))
  return out


def _looked_at(kind: str, path: str) -> str:
  return {"folder": os.path.join(path, "train", "<class>", ""),
          "npz": path, "arrays": os.path.join(path, "x_train.npy"),
          "hf": os.path.join(path, "") + "{*.parquet,*.arrow,dataset_dict.json}",
          "tfds": os.path.join(path, "")}[kind]


def _present(kind: str, path: str) -> bool:
  if kind == "folder":
    return os.path.isdir(os.path.join(path, "train"))
  if kind == "npz":
    return os.path.isfile(path)
  if kind == "arrays":
    return os.path.isfile(os.path.join(path, "x_train.npy"))
  if kind == "hf":
    return os.path.isdir(path) and (sources.is_hf_saved(path) or bool(
        glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
        or glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True)))
  return os.path.isdir(path)


def _probe(data_root: str, spec: catalog.DatasetSpec
           ) -> tuple[tuple[str, str] | None, list[str], list[str]]:
  """(first usable (kind, path) or None, paths looked at, notes on unusable finds)."""
  looked, notes = [], []
  for kind, path in locations(data_root, spec):
    looked.append(_looked_at(kind, path))
    if _present(kind, path):
      if sources.library_installed(kind):
        return (kind, path), looked, notes
      module, pip_name = sources.LIBRARIES[kind]
      notes.append(f"{path} exists but `{module}` is not installed (pip install {pip_name})")
  return None, looked, notes


def locate(data_root: str, task: str | catalog.DatasetSpec) -> tuple[str, str]:
  """(kind, path) of a task's dataset under `data_root`; ValueError saying where it looked."""
  spec = catalog.dataset_spec(task) if isinstance(task, str) else task
  found, looked, notes = _probe(data_root, spec)
  if found is None:
    _fail("data_root", f"no dataset for task {spec.name!r}; looked at {', '.join(looked)}"
          + (f" ({'; '.join(notes)})" if notes else ""))
  return found


def find_missing(data_root: str, tasks: Sequence[str] | None = None
                 ) -> list[tuple[str, tuple[str, ...]]]:
  """(task, paths looked at) for every task without usable data (default: the paper's 20)."""
  out = []
  for name in catalog.parse_task_names(tasks):
    found, looked, _ = _probe(data_root, catalog.dataset_spec(name))
    if found is None:
      out.append((name, tuple(looked)))
  return out


def describe_missing(data_root: str, tasks: Sequence[str] | None = None) -> str:
  """Header line, then one line per missing dataset with the paths looked at (for --dry-run)."""
  names = catalog.parse_task_names(tasks)
  root = os.path.abspath(os.path.expanduser(data_root))
  lines = []
  for name in names:
    found, looked, notes = _probe(root, catalog.dataset_spec(name))
    if found is None:
      lines.append(f"  missing {name}: looked at {', '.join(looked)}"
                   + (f"; {'; '.join(notes)}" if notes else ""))
  if not lines:
    return f"all {len(names)} datasets found under {root}"
  where = "" if os.path.isdir(root) else " (the data root does not exist)"
  return "\n".join([f"{len(lines)} of {len(names)} datasets missing under {root}{where}:"]
                   + lines)


def discover(data_root: str) -> tuple[str, ...]:
  """Task names of every dataset under a root (folder, npz, arrays, hf layouts; not tfds)."""
  data_root = os.path.expanduser(data_root)
  if not os.path.isdir(data_root):
    _fail("data_root", f"{data_root} is not a directory")
  names = set()
  for entry in os.listdir(data_root):
    p = os.path.join(data_root, entry)
    if entry.startswith(".") or entry in ("hf", "tfds"):
      continue
    if entry.endswith(".npz") and os.path.isfile(p):
      names.add(entry[:-4])
    elif _present("folder", p) or _present("arrays", p):
      names.add(entry)
  hf = os.path.join(data_root, "hf")
  if os.path.isdir(hf):
    names |= {e for e in os.listdir(hf) if _present("hf", os.path.join(hf, e))}
  return tuple(sorted(names))


# ---------------------------------------------------------------------------------------------
# Reading one dataset, through the preprocessed-array cache.

def _stamp(path: str) -> tuple[int, int, int]:
  """(files, bytes, latest mtime in ns) of a file or of every file below a directory: a
  directory's own mtime misses edits and additions inside its class subfolders."""
  if os.path.isfile(path):
    st = os.stat(path)
    return 1, st.st_size, st.st_mtime_ns
  n = size = latest = 0
  for d, _, files in os.walk(path):
    for f in files:
      st = os.stat(os.path.join(d, f))
      n, size, latest = n + 1, size + st.st_size, max(latest, st.st_mtime_ns)
  return n, size, latest


def _cache_key(kind: str, path: str, prep: transforms.Preprocess, **extra) -> str:
  blob = json.dumps(dict(kind=kind, path=os.path.abspath(path), stamp=_stamp(path),
                         prep=dataclasses.asdict(prep), **extra), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_dataset(data_root: str, task: str | catalog.DatasetSpec,
                 prep: transforms.Preprocess = transforms.Preprocess(), *,
                 max_train: int | None = None, max_test: int | None = None, seed: int = 0,
                 cache_dir: str | None = None) -> dict[str, sources.Split]:
  """Locates and loads one task's dataset; with `cache_dir`, preprocessed arrays are reused."""
  spec = catalog.dataset_spec(task) if isinstance(task, str) else task
  kind, path = locate(data_root, spec)
  limits = dict(max_train=max_train, max_test=max_test, seed=seed)
  if not cache_dir:
    return sources.load(kind, path, prep, spec=spec, **limits)
  key = _cache_key(kind, path, prep, **limits)
  file = os.path.join(cache_dir, f"{spec.name}-{key}.npz")
  if os.path.isfile(file):
    with np.load(file, allow_pickle=False) as f:
      classes = tuple(f["classes"].tolist())
      return {s: sources.Split(f[f"x_{s}"], f[f"y_{s}"], classes) for s in ("train", "test")
              if f"x_{s}" in f.files}
  splits = sources.load(kind, path, prep, spec=spec, **limits)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = file + f".tmp{os.getpid()}.npz"
  arrays = {f"{k}_{s}": getattr(v, k) for s, v in splits.items() for k in ("x", "y")}
  np.savez(tmp, classes=np.array(splits["train"].classes), **arrays)
  os.replace(tmp, file)  # atomic: a crash never leaves a torn cache file
  return splits
