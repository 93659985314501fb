"""Importing PyTorch / Hugging Face checkpoints into backbone/head params, without torch.

Reading:
  .safetensors                  `safetensors.numpy.load_file`.
  .pth / .pt / .bin / .ckpt     torch.save's zip format (torch >= 1.6): `<dir>/data.pkl` holds the
                                object with persistent ids for storages, `<dir>/data/<key>` the raw
                                storages, `<dir>/byteorder` their byte order. `_TensorUnpickler`
                                rebuilds ONLY tensors: its find_class allows
                                torch._utils._rebuild_tensor_v2 / _rebuild_parameter,
                                collections.OrderedDict and torch.<Type>Storage, and refuses every
                                other global, so loading runs no code from the file.

Mapping (`to_params`) walks the Flax parameter tree of the model and derives each leaf's PyTorch
key by rule (module names `a_i` -> `a.i`; kernel/scale -> weight, mean/var -> running_mean/var):
  resnet*     torchvision ResNet (`conv1`, `bn1`, `layer1.0.conv1`, `downsample.0`, head `fc`)
  vit*        timm VisionTransformer (`patch_embed.proj`, `blocks.0.attn.qkv`, head `head`);
              Hugging Face ViT (`vit.encoder.layer.0.attention.attention.query`, head
              `classifier`) is renamed to timm first, q/k/v fused into qkv
  digit_cnn   ccexam MNISTNet (`features.0`, `features.3`, `classifier.0`, head `classifier.2`)
Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O] and Linear weights [O, I] kernels
[I, O]. Every checkpoint key must be used (except `num_batches_tracked` and HF's `pooler`) and
every parameter found, or one ValueError lists each unmatched key, missing key and shape mismatch.
A checkpoint head with fewer classes than the model's is zero-padded (masked logits ignore the
extra classes). `to_state_dict` is the inverse.

Stacking: `stack_experts` imports a base (x_0's backbone) and expert checkpoints fine-tuned from
it into a params stack with leading axis E, the tree every merge, evaluation and twin takes.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_np

from stability import models as models_lib

Params = Any
StateDict = dict[str, np.ndarray]

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


# ---------------------------------------------------------------------------------------------
# Reading checkpoints.

class _StorageType:
  """Stands in for a torch.<Type>Storage class inside a persistent id (only its dtype is read)."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the storage, copied."""
  offset, size, stride = int(storage_offset), tuple(int(s) for s in size), tuple(
      int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f"checkpoint: bad tensor geometry size={size} stride={stride}")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if last >= storage.size:
    raise ValueError(f"checkpoint: tensor size={size} stride={stride} offset={offset} reads "
                     f"past its storage of {storage.size} elements")
  if not all(size):
    return np.zeros(size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


class _TensorUnpickler(pickle.Unpickler):
  """Unpickles torch.save's data.pkl, rebuilding tensors as numpy arrays and nothing else."""

  _ALLOWED = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ValueError(f"checkpoint: {self.path} references {module}.{name}; only tensors, "
                     "OrderedDict and plain containers can be imported")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f"checkpoint: {self.path} has an unsupported persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    if key not in self.storages:
      name = f"{self.prefix}data/{key}"
      if name not in self.archive.namelist():
        raise ValueError(f"checkpoint: {self.path} lacks storage entry {name}")
      dtype = stype.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
      raw = np.frombuffer(self.archive.read(name), dtype=dtype)
      if raw.size != int(numel):
        raise ValueError(f"checkpoint: storage {name} holds {raw.size} elements, its id says "
                         f"{numel}")
      self.storages[key] = raw.astype(stype.dtype)  # native byte order, writable copy
    return self.storages[key]


def _load_torch_zip(path: str) -> Any:
  if not zipfile.is_zipfile(path):
    raise ValueError(f"checkpoint: {path} is not a torch>=1.6 zip checkpoint (legacy torch "
                     "serialization is not supported; re-save it with torch.save)")
  with zipfile.ZipFile(path) as archive:
    pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise ValueError(f"checkpoint: {path} must hold exactly one <dir>/data.pkl, found {pkl}")
    prefix = pkl[0][:-len("data.pkl")]
    names = archive.namelist()
    byteorder = (archive.read(prefix + "byteorder").decode().strip()
                 if prefix + "byteorder" in names else "little")
    if byteorder not in ("little", "big"):
      raise ValueError(f"checkpoint: {path} has byteorder {byteorder!r}")
    with archive.open(pkl[0]) as f:
      return _TensorUnpickler(f, archive, prefix, byteorder, path).load()


def load_state_dict(source: str | os.PathLike | Mapping, *, key: str | None = None) -> StateDict:
  """A flat {name: array} state_dict from a .safetensors / torch zip file (or a mapping).

  `key` selects a nested entry (e.g. 'state_dict', 'model'); a leading 'module.' (DDP) is
  stripped from every key when all keys carry it.
  """
  if isinstance(source, Mapping):
    obj = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise ValueError(f"checkpoint: no such file {path}")
    if path.endswith(".safetensors"):
      obj = safetensors_np.load_file(path)
    elif path.endswith(_TORCH_SUFFIXES):
      obj = _load_torch_zip(path)
    else:
      raise ValueError(f"checkpoint: {path} must end with .safetensors or one of "
                       f"{', '.join(_TORCH_SUFFIXES)}")
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      raise ValueError(f"key: {key!r} is not a top-level entry of the checkpoint")
    obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint: expected a flat state_dict of tensors, got "
                     f"{type(obj).__name__}")
  bad = [f"{k} ({type(v).__name__})" for k, v in obj.items()
         if not (isinstance(k, str) and isinstance(v, (np.ndarray, np.generic)))]
  if bad:
    raise ValueError(f"checkpoint: expected a flat state_dict of tensors; not tensors: "
                     f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; pick the "
                     "state_dict with key=...")
  sd = {k: np.asarray(v) for k, v in obj.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a state_dict (e.g. `to_state_dict` of a merged model) as .safetensors."""
  safetensors_np.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                           os.fspath(path))


def ccexam_weights(name: str = "mnist") -> str:
  """Path of a pretrained checkpoint shipped in the MIT-licensed `ccexam` wheel (mnist, usps,
  svhn), found without importing ccexam (which needs torch)."""
  spec = importlib.util.find_spec("ccexam")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("ccexam: not installed; run `pip install --no-deps ccexam`")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", f"{name}.pth")
  if not os.path.isfile(path):
    raise ValueError(f"name: ccexam ships mnist, usps and svhn weights, not {name!r}")
  return path


# ---------------------------------------------------------------------------------------------
# Key mapping.

_HEAD_KEYS = {"resnet": "fc", "vit": "head", "digit_cnn": "classifier.2"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^(vit\.)?pooler\.")

# Hugging Face ViT -> timm names ({i}: layer index); q, k, v are fused separately.
_HF_VIT = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\."
                     r"(weight|bias)")


def _family(model: models_lib.Model) -> str:
  for family in _HEAD_KEYS:
    if model.name.startswith(family):
      return family
  raise ValueError(f"model: no checkpoint layout for {model.name!r}; allowed: resnet*, vit*, "
                   "digit_cnn")


def _hf_vit_to_timm(sd: StateDict) -> tuple[StateDict, dict[str, str]]:
  """Renames a Hugging Face ViT state_dict to timm keys; returns it and new -> original key."""
  out, origin, qkv = {}, {}, collections.defaultdict(dict)
  for k0, v in sd.items():
    k = k0[len("vit."):] if k0.startswith("vit.") else k0
    m = _HF_QKV.fullmatch(k)
    if m:
      qkv[(m.group(1), m.group(3))][m.group(2)] = (k0, v)
      continue
    new = k
    for pat, rep in _HF_VIT:
      if re.fullmatch(pat, k):
        new = re.sub(pat, rep, k)
        break
    out[new], origin[new] = v, k0
  for (i, kind), parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      for k, v in parts.values():  # incomplete: leave them to be reported
        out[k], origin[k] = v, k
      continue
    new = f"blocks.{i}.attn.qkv.{kind}"
    out[new] = np.concatenate([parts[n][1] for n in ("query", "key", "value")])
    origin[new] = " + ".join(parts[n][0] for n in ("query", "key", "value"))
  return out, origin


def _torch_key(path: Sequence[str]) -> str:
  *mods, leaf = path
  return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in mods] + [_LEAF_NAMES.get(leaf, leaf)])


def _to_flax_layout(leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel" and w.ndim == 2:
    return w.T  # [O, I] -> [I, O]
  return w


def _to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  if leaf == "kernel" and a.ndim == 2:
    return a.T
  return a


@functools.lru_cache(maxsize=16)
def _template(model: models_lib.Model, image_shape: tuple[int, ...]):
  """Abstract params {'backbone', 'head'} of the model at this image shape (traced once per
  model and shape: `stack_experts` imports one checkpoint per expert)."""
  def init():
    bb = model.init_backbone(jax.random.key(0), image_shape)
    return {"backbone": bb, "head": model.init_head(jax.random.key(1), bb, image_shape)}
  return jax.eval_shape(init)


def _leaves(model: models_lib.Model, tree, part: str):
  """(flax path, torch key, leaf name, value) for every leaf of tree['backbone' | 'head']."""
  head_key = _HEAD_KEYS[_family(model)]
  out = []
  for kp, v in jax.tree_util.tree_flatten_with_path(tree[part])[0]:
    path = tuple(str(k.key) for k in kp)
    # State models keep Flax collections in the backbone tree ('params', 'batch_stats').
    rel = path[1:] if part == "backbone" and model.state else path
    key = f"{head_key}.{_LEAF_NAMES[rel[-1]]}" if part == "head" else _torch_key(rel)
    out.append((path, key, rel[-1], v))
  return out


def _set(tree: dict, path: Sequence[str], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def to_params(model: models_lib.Model, state_dict: Mapping[str, np.ndarray],
              image_shape: tuple[int, ...], *, head: bool = True) -> Params:
  """Maps a PyTorch-layout state_dict onto {'backbone', 'head'} params (backbone only if
  head=False, ignoring the checkpoint's head); see the module docstring for the key rules."""
  family = _family(model)
  sd = dict(load_state_dict(state_dict))
  origin = {k: k for k in sd}
  if family == "vit" and any(re.match(r"(vit\.)?embeddings\.", k) for k in sd):
    sd, origin = _hf_vit_to_timm(sd)
  abstract = _template(model, tuple(image_shape))
  parts = ("backbone", "head") if head else ("backbone",)
  out: dict = {}
  used, problems = set(), []
  for part in parts:
    for path, key, leaf, spec in _leaves(model, abstract, part):
      where = "/".join((part,) + path)
      if key not in sd:
        problems.append(f"missing {key!r} for {where} {tuple(spec.shape)}")
        continue
      used.add(key)
      w = np.asarray(sd[key])
      if not (np.issubdtype(w.dtype, np.floating) or w.dtype == ml_dtypes.bfloat16):
        problems.append(f"{origin[key]!r}: dtype {w.dtype} is not floating")
        continue
      a = _to_flax_layout(leaf, w.astype(np.float32))
      if part == "head" and a.ndim >= 1 and a.shape[:-1] == spec.shape[:-1] \
          and a.shape[-1] < spec.shape[-1]:
        # Fewer checkpoint classes than the model's head: zero-pad (masked logits skip them).
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (spec.shape[-1] - a.shape[-1],),
                                        np.float32)], axis=-1)
      if a.shape != tuple(spec.shape):
        want = _to_torch_layout(leaf, np.empty(spec.shape, np.bool_)).shape
        problems.append(f"{origin[key]!r}: shape {w.shape} does not fit {where} "
                        f"{tuple(spec.shape)} (expected torch shape {want})")
        continue
      _set(out.setdefault(part, {}), path, a.astype(spec.dtype))
  head_key = _HEAD_KEYS[family]
  for k in sorted(set(sd) - used):
    if _IGNORED.search(origin[k]) or (not head and k.startswith(head_key + ".")):
      continue
    problems.append(f"unmatched checkpoint key {origin[k]!r} {sd[k].shape}: no parameter of "
                    f"{model.name} takes it")
  if problems:
    raise ValueError(f"checkpoint: {len(problems)} key(s) do not map onto {model.name}:\n  "
                     + "\n  ".join(problems))
  return out if head else out["backbone"]


def to_state_dict(model: models_lib.Model, params: Params) -> StateDict:
  """Inverse of `to_params`: torchvision / timm / ccexam keys and layouts, float32 numpy.

  `params` is {'backbone': ..., 'head': ...} (head optional); a padded head is written whole.
  """
  if not isinstance(params, Mapping) or "backbone" not in params:
    raise ValueError("params: must be {'backbone': ..., 'head': ...} (head optional)")
  sd = {}
  for part in ("backbone", "head"):
    if part in params:
      for _, key, leaf, v in _leaves(model, params, part):
        sd[key] = np.ascontiguousarray(_to_torch_layout(leaf, np.asarray(v, np.float32)))
  return sd


def import_checkpoint(model: models_lib.Model, source: str | os.PathLike | Mapping,
                      image_shape: tuple[int, ...], *, head: bool = True,
                      key: str | None = None) -> Params:
  """`to_params(model, load_state_dict(source, key=key), image_shape, head=head)`."""
  return to_params(model, load_state_dict(source, key=key), image_shape, head=head)


def stack_experts(model: models_lib.Model, base: str | os.PathLike | Mapping,
                  experts: Sequence[str | os.PathLike | Mapping], image_shape: tuple[int, ...],
                  *, key: str | None = None) -> tuple[Params, Params]:
  """(x_0 backbone, params stack [E]) from the base checkpoint and expert checkpoints
  fine-tuned from it; each expert keeps its own head (padded to the model's classes)."""
  if len(experts) == 0:
    raise ValueError("experts: at least one expert checkpoint is required")
  backbone0 = import_checkpoint(model, base, image_shape, head=False, key=key)
  members = [import_checkpoint(model, e, image_shape, key=key) for e in experts]
  return backbone0, jax.tree.map(lambda *a: np.stack(a), *members)
