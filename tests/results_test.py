"""Results store: atomic units, no duplicates, load as one DataFrame."""
import json

import numpy as np
import pytest

from stability import results


def test_units_are_written_once_and_loaded_in_order(tmp_path):
  s = results.Store(str(tmp_path))
  assert s.write("K=1", [{"a": 1, "x": np.float32(0.5)}, {"a": 2, "x": float("nan")}])
  assert not s.write("K=1", [{"a": 3}])  # already done: nothing written
  assert s.write("K=2", [{"a": 4, "v": np.arange(2)}])
  df = results.load(str(tmp_path))
  assert list(df.a) == [1, 2, 4] and df.x.isna().tolist() == [False, True, True]
  assert s.done("K=2") and not s.done("K=3")


def test_failed_unit_leaves_nothing(tmp_path):
  s = results.Store(str(tmp_path))
  with pytest.raises(TypeError):
    s.write("K=1", [{"a": 1}, {"a": object()}])
  assert not s.done("K=1")
  with pytest.raises(FileNotFoundError, match="workdir"):
    results.load(str(tmp_path / "missing"))


def test_json_atomic_and_metrics_log(tmp_path):
  results.write_json_atomic(str(tmp_path / "c.json"), {"a": np.int64(3)})
  assert json.loads((tmp_path / "c.json").read_text()) == {"a": 3}
  log = results.MetricsLog(str(tmp_path))
  log.log(step=1, loss=np.float32(0.25))
  log.close()
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.25}
