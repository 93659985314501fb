"""Experiment configs: load a config file, apply dotted command-line overrides, hash it.

A config file exposes `get_config(variant=None) -> ml_collections.ConfigDict`; `path:variant`
(big_vision style, e.g. `experiments/main.py:tiny`) passes the text after the colon. The dict is locked, so an
override of an unknown key is an error naming the key, never a silent new field. Override values
are parsed to the type of the field they replace; tuple fields take comma-separated lists
(`--config.sweep.lr=0.01,0.001`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from typing import Sequence

import ml_collections


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path`'s get_config() (`path:variant`: get_config(variant)) and applies
  `--config.a.b=value` overrides."""
  path, _, variant = path.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config: no config file at {path!r}")
  spec = importlib.util.spec_from_file_location(
      "_study_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config: {path!r} defines no get_config()")
  if variant and not inspect.signature(module.get_config).parameters:
    raise ValueError(f"config: {path!r} has no variants (got {variant!r})")
  cfg = module.get_config(variant) if variant else module.get_config()
  cfg.lock()
  for arg in overrides:
    apply_override(cfg, arg)
  return cfg


def _parse(text: str, like):
  if isinstance(like, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, (tuple, list)):
    items = [s for s in text.split(",") if s != ""]
    proto = like[0] if len(like) else _guess(items[0]) if items else ""
    return tuple(_parse(s, proto) for s in items)
  return text


def _guess(s: str):
  for t in (int, float):
    try:
      return t(s)
    except ValueError:
      pass
  return s


def apply_override(cfg: ml_collections.ConfigDict, arg: str) -> None:
  """Applies one `--config.a.b=value` (or `a.b=value`) override in place."""
  body = arg[2:] if arg.startswith("--") else arg
  if not body.startswith("config.") or "=" not in body:
    raise ValueError(f"{arg}: overrides look like --config.section.field=value")
  key, text = body[len("config."):].split("=", 1)
  node, parts = cfg, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      allowed = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise ValueError(f"config.{key}: unknown config key; allowed at "
                       f"config.{'.'.join(parts[:i]) or '<root>'}: {allowed}")
    if i < len(parts) - 1:
      node = node[part]
  old = node[parts[-1]]
  try:
    value = _parse(text, old)
  except ValueError as e:
    raise ValueError(f"config.{key}: cannot parse {text!r} ({e})") from None
  with node.unlocked():
    node[parts[-1]] = value


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


# Sections that change how a run reports, never what it computes: excluded from the hash and
# free to differ when a workdir is resumed.
PRESENTATION = ("output",)


def results_part(d: dict) -> dict:
  """A config dict without its presentation sections."""
  return {k: v for k, v in d.items() if k not in PRESENTATION}


def config_hash(cfg: ml_collections.ConfigDict) -> str:
  """Hash of everything that determines the results (not `output.*`)."""
  return hashlib.sha256(json.dumps(results_part(to_dict(cfg)), sort_keys=True).encode()
                        ).hexdigest()[:12]


def first_difference(a, b, prefix: str = "config") -> str | None:
  """Dotted path of the first field where two config dicts differ, or None."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"{prefix}.{k}"
      d = first_difference(a[k], b[k], f"{prefix}.{k}")
      if d:
        return d
    return None
  return None if a == b else prefix
