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
