"""Models split into a backbone (merged) and a per-task head (never merged).

Parameters are plain pytrees `{'backbone': ..., 'head': ...}`; an expert stack is the same tree
with a leading axis E. Every head outputs `max_classes` logits; a task with fewer classes masks
the rest (`masked_logits`), so experts of different tasks share one tree structure and vmap.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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

  def init_backbone(self, key: jax.Array, image_shape: tuple[int, ...]) -> Params:
    # A parameter-free backbone (the `linear` model) has an empty params tree.
    return self.backbone.init(key, jnp.zeros((1,) + tuple(image_shape))).get("params", {})

  def init_head(self, key: jax.Array, backbone: Params, image_shape: tuple[int, ...]) -> Params:
    h = jax.eval_shape(self.features, backbone, jnp.zeros((1,) + tuple(image_shape)))
    return self.head.init(key, jnp.zeros(h.shape, h.dtype))["params"]

  def features(self, backbone: Params, x: jax.Array) -> jax.Array:
    return self.backbone.apply({"params": backbone}, x)

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Logits [N, max_classes] for images x [N, H, W, C]."""
    return self.head.apply({"params": params["head"]}, self.features(params["backbone"], x))


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
