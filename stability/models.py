"""Models split into a backbone (merged) and a per-task head (never merged).

Parameters are plain pytrees `{'backbone': ..., 'head': ...}`; an expert stack is the same tree
with a leading axis E. Every head outputs `max_classes` logits; a task with fewer classes masks
the rest (`masked_logits`), so experts of different tasks share one tree structure and vmap.

A backbone with state (BatchNorm running statistics, `Model.state = ('batch_stats',)`) keeps it
in its tree as Flax variables: `backbone = {'params': ..., 'batch_stats': ...}`. So the state
rides with every expert through vmap, sharding, snapshots and merges (which average it like any
leaf; `merging.merge_batch_stats` sets it otherwise). Training (`apply_train`) normalises with the
batch's real rows and returns the updated statistics; evaluation (`apply`) uses the stored ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stability import backbones

Params = Any
_NEG = -1e9  # finite, so masked logits never make inf - inf in gradients


class MLPBackbone(nn.Module):
  widths: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return x


class CNNBackbone(nn.Module):
  channels: Sequence[int] = (16, 32)
  width: int = 64

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.relu(nn.Dense(self.width)(x))


class Head(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.num_classes)(h)


@dataclasses.dataclass(frozen=True)
class Model:
  """A backbone/head pair with pure init and apply functions on plain pytrees."""
  name: str
  backbone: nn.Module
  head: nn.Module
  loss: str = "cross_entropy"  # a key of LOSSES
  state: tuple[str, ...] = ()  # backbone collections updated by training (('batch_stats',))

  def init_backbone(self, key: jax.Array, image_shape: tuple[int, ...]) -> Params:
    # A parameter-free backbone (the `linear` model) has an empty params tree.
    variables = self.backbone.init(key, jnp.zeros((1,) + tuple(image_shape)))
    if self.state:
      return {c: variables[c] for c in ("params",) + self.state}
    return variables.get("params", {})

  def init_head(self, key: jax.Array, backbone: Params, image_shape: tuple[int, ...]) -> Params:
    h = jax.eval_shape(self.features, backbone, jnp.zeros((1,) + tuple(image_shape)))
    return self.head.init(key, jnp.zeros(h.shape, h.dtype))["params"]

  def features(self, backbone: Params, x: jax.Array) -> jax.Array:
    return self.backbone.apply(backbone if self.state else {"params": backbone}, x)

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Logits [N, max_classes] for images x [N, H, W, C] (evaluation mode)."""
    return self.head.apply({"params": params["head"]}, self.features(params["backbone"], x))

  def apply_train(self, params: Params, x: jax.Array, mask: jax.Array
                  ) -> tuple[jax.Array, Params]:
    """Training-mode logits and `params` with the backbone state updated by this forward pass
    (BatchNorm: batch statistics over the rows where mask [N] is true)."""
    if not self.state:
      return self.apply(params, x), params
    bb = params["backbone"]
    h, new = self.backbone.apply(bb, x, train=True, mask=mask, mutable=list(self.state))
    logits = self.head.apply({"params": params["head"]}, h)
    return logits, {**params, "backbone": {**bb, **{c: new[c] for c in self.state}}}

  def carry_state(self, params: Params, source: Params) -> Params:
    """`params` with the backbone state taken from `source` (state is set by forward passes,
    never by the optimizer)."""
    if not self.state:
      return params
    bb = {**params["backbone"], **{c: source["backbone"][c] for c in self.state}}
    return {**params, "backbone": bb}


def masked_logits(logits: jax.Array, num_classes: jax.Array) -> jax.Array:
  """Pushes logits of classes >= num_classes (per task) to a large negative value."""
  valid = jnp.arange(logits.shape[-1]) < num_classes
  return jnp.where(valid, logits, _NEG)


def _cross_entropy(logits, y, num_classes):
  logp = jax.nn.log_softmax(masked_logits(logits, num_classes))
  return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def _squared(logits, y, num_classes):
  # 0.5 * ||logits - onehot(y)||^2 over the task's classes: least squares on one-hot targets.
  valid = jnp.arange(logits.shape[-1]) < num_classes
  target = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
  return 0.5 * jnp.sum(jnp.where(valid, (logits - target) ** 2, 0.0), axis=-1)


LOSSES: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": _cross_entropy,
    "squared": _squared,
}


def per_sample_loss(model: Model, params: Params, x: jax.Array, y: jax.Array,
                    num_classes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Loss [N] (`model.loss`) and correctness [N] of one model on a batch of its task."""
  logits = model.apply(params, x)
  loss = LOSSES[model.loss](logits, y, num_classes)
  return loss, (jnp.argmax(masked_logits(logits, num_classes), -1) == y)


_MODELS: dict[str, Callable[..., Model]] = {
    "mlp": lambda num_classes, widths=(128, 128): Model(
        "mlp", MLPBackbone(tuple(widths)), Head(num_classes)),
    "cnn": lambda num_classes, channels=(16, 32), width=64: Model(
        "cnn", CNNBackbone(tuple(channels), width), Head(num_classes)),
    # Parameter-free backbone (flatten) + linear head: a convex model (logistic regression with
    # cross-entropy, least squares with the squared loss); everything lives in the head.
    "linear": lambda num_classes: Model("linear", MLPBackbone(()), Head(num_classes)),
}


def _resnet(name: str, stage_sizes: tuple[int, ...], bottleneck: bool):
  def make(num_classes: int, *, stem: str = "imagenet", norm: str = "batch", width: int = 64,
           stage_sizes: Sequence[int] = stage_sizes, bn_momentum: float = 0.9) -> Model:
    if stem not in backbones.STEMS:
      raise ValueError(f"model.stem: unknown stem {stem!r}; allowed: {', '.join(backbones.STEMS)}")
    if norm not in backbones.NORMS:
      raise ValueError(f"model.norm: unknown norm {norm!r}; allowed: {', '.join(backbones.NORMS)}")
    if width < 1 or not stage_sizes or min(stage_sizes) < 1:
      raise ValueError(f"model.width/stage_sizes: must be positive, got {width}, {stage_sizes}")
    net = backbones.ResNet(tuple(stage_sizes), bottleneck, width, stem, norm, bn_momentum)
    state = ("batch_stats",) if norm in ("batch", "frozen_batch") else ()
    return Model(name, net, Head(num_classes), state=state)
  return make


def _vit(name: str, patch: int, dim: int, heads: int):
  def make(num_classes: int, *, patch: int = patch, dim: int = dim, depth: int = 12,
           heads: int = heads, mlp_dim: int | None = None, ln_eps: float = 1e-6) -> Model:
    if min(patch, dim, depth, heads) < 1 or dim % heads:
      raise ValueError(f"model.patch/dim/depth/heads: must be positive with dim % heads == 0, "
                       f"got {patch}, {dim}, {depth}, {heads}")
    net = backbones.ViT(patch, dim, depth, heads, 4 * dim if mlp_dim is None else mlp_dim, ln_eps)
    return Model(name, net, Head(num_classes))
  return make


# torchvision ResNets (norm 'batch': BatchNorm statistics live in the backbone tree).
_MODELS["resnet18"] = _resnet("resnet18", (2, 2, 2, 2), False)
_MODELS["resnet50"] = _resnet("resnet50", (3, 4, 6, 3), True)
# timm / HF ViTs (Dosovitskiy et al. 2021; Ti/S from DeiT): depth 12, mlp 4 * dim.
for _size, (_dim, _heads) in {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}.items():
  for _patch in (16, 32):
    _MODELS[f"vit_{_size}{_patch}"] = _vit(f"vit_{_size}{_patch}", _patch, _dim, _heads)
# ccexam's pretrained MNIST CNN (`importers`): 28x28 inputs, 128 features, Linear head.
_MODELS["digit_cnn"] = lambda num_classes, channels=(32, 64), width=128: Model(
    "digit_cnn", backbones.DigitCNN(tuple(channels), width), Head(num_classes))


def register_model(name: str, factory: Callable[..., Model]) -> None:
  _MODELS[name] = factory


def model_names() -> tuple[str, ...]:
  return tuple(sorted(_MODELS))


def get_model(name: str, num_classes: int, *, loss: str = "cross_entropy", **kwargs) -> Model:
  if name not in _MODELS:
    raise ValueError(f"model.name: unknown model {name!r}; allowed: {', '.join(model_names())}")
  if loss not in LOSSES:
    raise ValueError(f"model.loss: unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
  return dataclasses.replace(_MODELS[name](num_classes, **kwargs), loss=loss)
