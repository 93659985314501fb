"""Results store: an append-only SQLite table in the workdir, one transaction per unit of work.

Why SQLite: it ships with Python, and a transaction that inserts a unit's rows together with its
"done" marker is atomic under kill -9 (journal rollback), so a crash leaves no torn or
duplicated rows and a rerun knows exactly which units are finished. Rows are stored as JSON so
studies can add columns freely; `load` returns one pandas DataFrame.

Also per workdir: `config.json` (the run's config, written atomically) and `metrics.jsonl`
(training-progress log, one JSON object per line).
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from typing import Any, Iterable

import numpy as np
import pandas as pd

from stability import config as config_lib

DB = "results.sqlite"


def _jsonable(v):
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.floating,)):
    return None if not np.isfinite(v) else float(v)
  if isinstance(v, float) and not np.isfinite(v):
    return None
  if isinstance(v, np.ndarray):
    return [_jsonable(x) for x in v.tolist()]
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


class Store:
  """Append-only results of one workdir. Only process 0 should write."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, DB)
    self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=FULL")
    self._db.execute("CREATE TABLE IF NOT EXISTS units (unit TEXT PRIMARY KEY, t REAL)")
    self._db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                     "unit TEXT NOT NULL, data TEXT NOT NULL)")

  def done(self, unit: str) -> bool:
    return self._db.execute("SELECT 1 FROM units WHERE unit=?", (unit,)).fetchone() is not None

  def write(self, unit: str, rows: Iterable[dict[str, Any]]) -> bool:
    """Atomically records a unit's rows; returns False (writing nothing) if already done."""
    payload = [(unit, json.dumps({k: _jsonable(v) for k, v in r.items()})) for r in rows]
    try:
      self._db.execute("BEGIN IMMEDIATE")
      if self.done(unit):
        self._db.execute("ROLLBACK")
        return False
      self._db.executemany("INSERT INTO rows (unit, data) VALUES (?, ?)", payload)
      self._db.execute("INSERT INTO units (unit, t) VALUES (?, ?)", (unit, time.time()))
      self._db.execute("COMMIT")
    except BaseException:
      if self._db.in_transaction:
        self._db.execute("ROLLBACK")
      raise
    return True

  def close(self) -> None:
    self._db.close()


def load(workdir: str) -> pd.DataFrame:
  """All rows of a workdir as one DataFrame, in insertion order."""
  path = os.path.join(workdir, DB)
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir: no results store at {path}")
  with sqlite3.connect(path) as db:
    rows = [json.loads(d) for (d,) in db.execute("SELECT data FROM rows ORDER BY id")]
  return pd.DataFrame(rows)


CONFIG = "config.json"


def check_workdir(workdir: str, cfg: dict) -> None:
  """Fails (creating nothing) unless `workdir` can be written and holds no other config.

  A workdir belongs to one study config: resuming with the same results-determining fields
  (`config.results_part`) continues it; anything else is an error naming the first difference.
  """
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"workdir: cannot create {workdir!r}: {probe!r} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"workdir: {probe!r} is not writable")
  saved_path = os.path.join(path, CONFIG)
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      saved = json.load(f)
    if saved.get("study") != cfg.get("study"):
      raise ValueError(f"workdir: {workdir!r} holds a {saved.get('study')!r} study; this run is "
                       f"{cfg.get('study')!r}; use another workdir")
    diff = config_lib.first_difference(config_lib.results_part(saved),
                                       config_lib.results_part(cfg))
    if diff:
      raise ValueError(f"workdir: {workdir!r} holds a different {cfg.get('study')!r} config "
                       f"(first difference: {diff}); use another workdir or the same config")
  elif os.path.exists(os.path.join(path, DB)):
    raise ValueError(f"workdir: {workdir!r} has results but no {CONFIG}; use another workdir")


def write_config(workdir: str, cfg: dict) -> None:
  """Records the run's config (atomically) so a rerun can check it resumes the same sweep."""
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, CONFIG), cfg)


def write_json_atomic(path: str, obj: Any) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsLog:
  """Append-only JSONL log of training progress."""

  def __init__(self, workdir: str):
    self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def log(self, **record) -> None:
    self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()
