"""Real-scale backbones (Flax linen): ResNet-18/50, ViT-Ti/S/B, and ccexam's MNIST CNN.

Each module maps images [N, H, W, C] to features [N, D]; the classifier is the separate per-task
`models.Head`. Submodule names follow the PyTorch checkpoints they import from, with `.i` written
`_i` (torchvision `layer1.0.conv1` is `layer1_0/conv1`, timm `blocks.3.attn.qkv` is
`blocks_3/attn/qkv`), so `importers` maps keys by rule, not by table.

Normalisation (ResNet `norm`):
  batch         BatchNorm. Training updates the running statistics (the `batch_stats`
                collection, kept in the backbone tree next to `params`) from the batch's real
                rows (`mask`); evaluation uses them. PyTorch `model.train()` / `model.eval()`.
  frozen_batch  BatchNorm that always normalises with its running statistics (x_0's): the
                affine scale/bias train, the statistics never change.
  group         GroupNorm (gcd(32, C) groups): per sample, nothing to merge but parameters.
  none          no normalisation (convolutions get a bias).

Numerics against PyTorch: padding is explicit and symmetric as in torch (never 'SAME'), max
pooling pads with -inf, GELU is exact (erf), a flatten before a Linear layer is channel-major
(torch `x.flatten(1)` on NCHW). Flax BatchNorm updates the running variance with the biased
batch variance where torch uses the unbiased one (a factor m/(m-1) on m = N*H*W values).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "frozen_batch", "group", "none")
STEMS = ("imagenet", "cifar")

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(p: int):
  return ((p, p), (p, p))


def _norm(kind: str, momentum: float, name: str, x, train: bool, mask):
  """The ResNet normalisation layer `kind`, created in the calling module under `name`."""
  if kind in ("batch", "frozen_batch"):
    # Flax momentum m: running = m * running + (1 - m) * batch (torch momentum 0.1 -> 0.9).
    bn = nn.BatchNorm(use_running_average=not train or kind == "frozen_batch", momentum=momentum,
                      epsilon=1e-5, name=name)
    return bn(x, mask=None if mask is None else mask.reshape(mask.shape + (1,) * (x.ndim - 1)))
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(32, x.shape[-1]), epsilon=1e-5, name=name)(x)
  return x


def _conv(f: int, k: int, s: int, p: int, name: str, *, bias: bool) -> nn.Conv:
  """A k x k conv with stride s and padding p, torchvision's layout and init."""
  return nn.Conv(f, (k, k), (s, s), _pad(p), use_bias=bias, kernel_init=_conv_init, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, identity or 1x1 projection shortcut."""
  features: int
  strides: int
  norm: str
  bn_momentum: float
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    conv = functools.partial(_conv, bias=self.norm == "none")
    y = conv(self.features, 3, self.strides, 1, "conv1")(x)
    y = nn.relu(_norm(self.norm, self.bn_momentum, "bn1", y, train, mask))
    y = conv(self.features, 3, 1, 1, "conv2")(y)
    y = _norm(self.norm, self.bn_momentum, "bn2", y, train, mask)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, 0, "downsample_0")(x)
      x = _norm(self.norm, self.bn_momentum, "downsample_1", x, train, mask)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: the stride sits on the 3x3): 1x1 -> 3x3 -> 1x1 (x4)."""
  features: int
  strides: int
  norm: str
  bn_momentum: float
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    conv = functools.partial(_conv, bias=self.norm == "none")
    out = self.features * self.expansion
    y = conv(self.features, 1, 1, 0, "conv1")(x)
    y = nn.relu(_norm(self.norm, self.bn_momentum, "bn1", y, train, mask))
    y = conv(self.features, 3, self.strides, 1, "conv2")(y)
    y = nn.relu(_norm(self.norm, self.bn_momentum, "bn2", y, train, mask))
    y = conv(out, 1, 1, 0, "conv3")(y)
    y = _norm(self.norm, self.bn_momentum, "bn3", y, train, mask)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, 0, "downsample_0")(x)
      x = _norm(self.norm, self.bn_momentum, "downsample_1", x, train, mask)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision ResNet up to the global average pool; features [N, width * 8 * expansion].

  stem 'imagenet': 7x7/2 conv + 3x3/2 max pool; 'cifar': one 3x3/1 conv, no pool (He et al.
  2016, Sec. 4.2 style, for 32x32 inputs). `width` is the first stage's channels (64).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool = False
  width: int = 64
  stem: str = "imagenet"
  norm: str = "batch"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    bias = self.norm == "none"
    if self.stem == "imagenet":
      x = _conv(self.width, 7, 2, 3, "conv1", bias=bias)(x)
    else:
      x = _conv(self.width, 3, 1, 1, "conv1", bias=bias)(x)
    x = nn.relu(_norm(self.norm, self.bn_momentum, "bn1", x, train, mask))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), (2, 2), _pad(1))
    block = Bottleneck if self.bottleneck else BasicBlock
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = block(self.width * 2 ** i, 2 if (i > 0 and j == 0) else 1, self.norm,
                  self.bn_momentum, name=f"layer{i + 1}_{j}")(x, train, mask)
    return jnp.mean(x, axis=(-3, -2))


class _Attention(nn.Module):
  """timm Attention: fused qkv [D -> 3D] laid out (3, heads, head_dim), softmax(q k^T / sqrt d)."""
  heads: int

  @nn.compact
  def __call__(self, x):
    B, T, D = x.shape
    hd = D // self.heads
    qkv = nn.Dense(3 * D, name="qkv")(x).reshape(B, T, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) * hd ** -0.5, axis=-1)
    return nn.Dense(D, name="proj")(jnp.einsum("bhts,bshd->bthd", att, v).reshape(B, T, D))


class _Mlp(nn.Module):
  """timm Mlp: fc1 -> exact GELU -> fc2."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
    return nn.Dense(x.shape[-1], name="fc2")(y)


class _Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  heads: int
  mlp_dim: int
  ln_eps: float

  @nn.compact
  def __call__(self, x):
    x = x + _Attention(self.heads, name="attn")(nn.LayerNorm(self.ln_eps, name="norm1")(x))
    return x + _Mlp(self.mlp_dim, name="mlp")(nn.LayerNorm(self.ln_eps, name="norm2")(x))


class _PatchEmbed(nn.Module):
  patch: int
  dim: int

  @nn.compact
  def __call__(self, x):
    p = self.patch
    x = nn.Conv(self.dim, (p, p), (p, p), "VALID", name="proj")(x)
    return x.reshape(x.shape[0], -1, self.dim)  # row-major patches, as torch flatten(2)


class ViT(nn.Module):
  """timm VisionTransformer (class token, learned positions, pre-norm blocks) up to the final
  LayerNorm; features = the class token [N, dim] (timm global_pool='token', HF ViT pooling).

  Images must be a multiple of `patch` on each side; the number of position embeddings is
  fixed by the image size at init (1 + (H/patch)(W/patch)).
  """
  patch: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  ln_eps: float = 1e-6  # timm; HF ViT uses 1e-12

  @nn.compact
  def __call__(self, x):
    H, W = x.shape[-3], x.shape[-2]
    if H % self.patch or W % self.patch:
      raise ValueError(f"image_shape: ViT needs H and W multiples of patch={self.patch}, "
                       f"got {H}x{W}")
    x = _PatchEmbed(self.patch, self.dim, name="patch_embed")(x)
    B, T = x.shape[0], x.shape[1] + 1
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim))
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, T, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, self.dim)), x], axis=1) + pos
    for i in range(self.depth):
      x = _Block(self.heads, self.mlp_dim, self.ln_eps, name=f"blocks_{i}")(x)
    return nn.LayerNorm(self.ln_eps, name="norm")(x)[:, 0]


class DigitCNN(nn.Module):
  """ccexam `MNISTNet` up to its hidden layer (features [N, 128]); its last Linear is the head.

  conv3x3(32) -> ReLU -> maxpool2 -> conv3x3(64) -> ReLU -> maxpool2 -> flatten (channel-major,
  as torch) -> Linear(64 (H/4)(W/4), 128) -> ReLU. Inputs in [0, 1] are normalised inside with
  ccexam's MNIST statistics (constants.DATASET_STATS['mnist']: mean 0.1307, std 0.3081).
  """
  channels: Sequence[int] = (32, 64)
  width: int = 128
  mean: float = 0.1307
  std: float = 0.3081

  @nn.compact
  def __call__(self, x):
    x = (x - self.mean) / self.std
    for i, c in enumerate(self.channels):
      # torch indices in `features`: Conv2d, ReLU, MaxPool2d per stage -> 0, 3, ...
      x = nn.relu(nn.Conv(c, (3, 3), (1, 1), _pad(1), name=f"features_{3 * i}")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = jnp.moveaxis(x, -1, -3).reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.width, name="classifier_0")(x))
