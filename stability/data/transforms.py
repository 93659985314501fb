"""Image transforms: pixels in [0, 1] -> resized, re-channelled, normalised or augmented pixels.

Two families, both pure numpy (PIL only for decoding and the antialiased resize):

  [N, H, W] grey images (the embedded suites): `pool2` (2x2 mean pooling), `resize_bilinear`
    (align-corners bilinear, no PIL), `pixel_permutation`, `quadrant_swap` and the named
    `IMAGE_TRANSFORMS` (rotations, flips, inversion, shift, ...).
  [N, H, W, C] images (datasets on disk): `Preprocess` / `preprocess` (decode, central square
    crop, antialiased bilinear `resize` to S x S, grey <-> RGB), `channel_stats`, `normalize`,
    and keyed random-crop + flip `augment`.

Legend: N rows, H, W input image dims, S output side, C channels.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
from typing import Callable, Sequence

import numpy as np

try:
  from PIL import Image
except ImportError:  # pillow ships with matplotlib; the numpy resize is the fallback
  Image = None

Array = np.ndarray

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _fail(field: str, allowed: str):
  raise ValueError(f"{field}: {allowed}")


# ---------------------------------------------------------------------------------------------
# Transforms on [N, H, W] images in [0, 1].

def pool2(x: Array) -> Array:
  """2x2 mean pooling: 28x28 MNIST -> 14x14."""
  N, H, W = x.shape
  return x.reshape(N, H // 2, 2, W // 2, 2).mean(axis=(2, 4))


def resize_bilinear(x: Array, size: int) -> Array:
  """Bilinear resize of [N, h, w] to [N, size, size] (align-corners), pure numpy."""
  N, h, w = x.shape
  ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
  top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
  bot = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
  return top * (1 - wy) + bot * wy


def pixel_permutation(seed: int, key: int) -> Callable[[Array], Array]:
  """A fixed permutation of the H * W pixel positions, keyed by (seed, key)."""
  def f(x):
    N, H, W = x.shape
    perm = np.random.default_rng([seed, key]).permutation(H * W)
    return x.reshape(N, H * W)[:, perm].reshape(N, H, W)
  return f


def quadrant_swap(x: Array) -> Array:
  """Swaps diagonally opposite quadrants."""
  h, w = x.shape[1] // 2, x.shape[2] // 2
  out = x.copy()
  out[:, :h, :w], out[:, h:, w:] = x[:, h:, w:], x[:, :h, :w]
  out[:, :h, w:], out[:, h:, :w] = x[:, h:, :w], x[:, :h, w:]
  return out


IMAGE_TRANSFORMS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip": lambda x: x[:, :, ::-1],
    "transpose": lambda x: np.transpose(x, (0, 2, 1)),
    "invert": lambda x: 1.0 - x,
    "shift": lambda x: np.roll(x, (3, 3), axis=(1, 2)),
    "quadrants": quadrant_swap,
}


# ---------------------------------------------------------------------------------------------
# Preprocessing of [N, H, W, C] images.

@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Per-image preprocessing shared by every loader."""
  size: int | None = 32       # output side S in pixels (None: keep; images must share a shape)
  channels: int | None = 3    # 1 (luminance) or 3 (grey replicated; alpha dropped); None: keep
  center_crop: bool = True    # crop the central square before resizing (no aspect distortion)

  def __post_init__(self):
    if self.size is not None and (not isinstance(self.size, (int, np.integer)) or self.size < 1):
      raise ValueError(f"image_size: {self.size!r} is not a positive int or None")
    if self.channels not in (None, 1, 3):
      raise ValueError(f"channels: {self.channels!r}; allowed: 1, 3 or None")


def _scale_to_unit(x: Array, field: str) -> Array:
  """uint8/int 0-255, uint16 0-65535, bool or float [0, 1] -> float32 [0, 1]."""
  if x.dtype == np.bool_:
    return x.astype(np.float32)
  if x.dtype == np.uint16:
    return x.astype(np.float32) / 65535.0
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      _fail(field, f"integer images must lie in [0, 255]; got [{x.min()}, {x.max()}]")
    return x.astype(np.float32) / 255.0
  if np.issubdtype(x.dtype, np.floating):
    if x.size and not (np.isfinite(x).all() and x.min() >= -1e-6 and x.max() <= 1 + 1e-6):
      _fail(field, f"float images must be finite and lie in [0, 1]; got [{np.nanmin(x)}, "
            f"{np.nanmax(x)}] (store 0-255 data as uint8)")
    return np.clip(x, 0.0, 1.0).astype(np.float32)
  _fail(field, f"unsupported image dtype {x.dtype}")


def _pil_to_array(img) -> Array:
  """A decoded PIL image as [H, W, C] float32 in [0, 1] (palette, alpha, CMYK -> RGB)."""
  if img.mode in ("1", "LA", "La"):
    img = img.convert("L")
  elif img.mode.startswith("I;16") or img.mode == "I":
    return np.clip(np.asarray(img, np.float32) / 65535.0, 0, 1)[..., None]
  elif img.mode not in ("L", "RGB", "F"):
    img = img.convert("RGB")
  return _scale_to_unit(np.asarray(img), "image").reshape(img.size[1], img.size[0], -1)


def _set_channels(x_HxWxC: Array, channels: int | None) -> Array:
  C = x_HxWxC.shape[-1]
  if C not in (1, 3, 4):
    _fail("x", f"images need 1, 3 or 4 channels (channels last); got {C}")
  if C == 4:  # RGBA: drop alpha
    x_HxWxC, C = x_HxWxC[..., :3], 3
  if channels is None or channels == C:
    return x_HxWxC
  if channels == 3:
    return np.repeat(x_HxWxC, 3, axis=-1)
  # ITU-R 601-2 luma, as PIL's convert("L").
  luma = np.asarray([0.299, 0.587, 0.114], np.float32)
  return (x_HxWxC @ luma)[..., None].astype(np.float32)


def resize(x_HxWxC: Array, size: int, center_crop: bool = True) -> Array:
  """Central square crop, then antialiased bilinear resize to [size, size, C] (PIL, float)."""
  H, W = x_HxWxC.shape[:2]
  if center_crop and H != W:
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    x_HxWxC = x_HxWxC[top:top + s, left:left + s]
  if x_HxWxC.shape[:2] == (size, size):
    return np.asarray(x_HxWxC, np.float32)
  chans = np.moveaxis(np.asarray(x_HxWxC, np.float32), -1, 0)
  if Image is None:
    out = resize_bilinear(chans, size)
  else:
    # Mode "F" per channel: one code path for uint8 and float data, no 8-bit rounding.
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(
        (size, size), Image.Resampling.BILINEAR)) for c in chans])
  return np.clip(np.moveaxis(out, 0, -1), 0.0, 1.0).astype(np.float32)


def preprocess(images, prep: Preprocess, field: str = "x", workers: int = 1) -> Array:
  """Images ([N, H, W(, C)] array, or a sequence of PIL images, arrays, encoded bytes or file
  paths) -> float32 [N, S, S, C]; `workers` threads decode and resize a sequence."""
  if isinstance(images, np.ndarray):
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4:
      _fail(field, f"expected [N, H, W] or [N, H, W, C] (channels last); got shape "
            f"{images.shape}")
    if images.shape[-1] not in (1, 3, 4):
      _fail(field, f"expected channels last with C in 1, 3, 4; got shape {images.shape}")
    x = _scale_to_unit(images, field)
    if prep.channels is not None or x.shape[-1] == 4:
      x = _set_channels(x, prep.channels)
    if prep.size is None or x.shape[1:3] == (prep.size, prep.size):
      return np.ascontiguousarray(x, np.float32)
    out = [resize(im, prep.size, prep.center_crop) for im in x]
    return np.stack(out) if out else np.zeros((0, prep.size, prep.size, x.shape[-1]), np.float32)
  one = lambda im: preprocess_one(im, prep, field)
  if workers > 1:  # PIL releases the GIL while decoding and resizing; map keeps the order
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return stack_images(list(pool.map(one, images)), field)
  return stack_images([one(im) for im in images], field)


def preprocess_one(im, prep: Preprocess, field: str) -> Array:
  """One image (see `preprocess`) -> float32 [S, S, C]."""
  a = _set_channels(_image_to_array(im, field), prep.channels)
  return a if prep.size is None else resize(a, prep.size, prep.center_crop)


def stack_images(images: list[Array], field: str) -> Array:
  """Preprocessed [S, S, C] images -> [N, S, S, C]; an error names what differs."""
  if not images:
    _fail(field, "no images")
  shapes = {a.shape for a in images}
  if len(shapes) > 1:
    which = "image_size" if len({s[:2] for s in shapes}) > 1 else "channels"
    _fail(which, f"{field} has images of shapes {sorted(shapes)[:3]}...; set {which}")
  return np.stack(images).astype(np.float32)


def _image_to_array(im, field: str) -> Array:
  """A PIL image, encoded bytes dict (HF), file path, or [H, W(, C)] array -> [H, W, C] float."""
  if isinstance(im, dict):  # HF Image feature with decode=False, or parquet without metadata
    im = im.get("bytes") or im.get("path")
  if isinstance(im, (bytes, str)):
    if Image is None:
      raise ImportError("decoding images needs pillow: pip install pillow")
    with Image.open(io.BytesIO(im) if isinstance(im, bytes) else im) as f:
      f.load()
      return _pil_to_array(f)
  if Image is not None and isinstance(im, Image.Image):
    return _pil_to_array(im)
  a = np.asarray(im)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3:
    _fail(field, f"an image must be [H, W] or [H, W, C]; got shape {a.shape}")
  return _scale_to_unit(a, field)


def channel_stats(x_NxHxWxC: Array) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation (float64 accumulation)."""
  flat = np.asarray(x_NxHxWxC, np.float64).reshape(-1, x_NxHxWxC.shape[-1])
  return tuple(flat.mean(0).tolist()), tuple(flat.std(0).tolist())


def normalize(x_NxHxWxC: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
  """(x - mean) / std per channel, float32."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  C = x_NxHxWxC.shape[-1]
  if mean.shape != (C,) or std.shape != (C,):
    _fail("normalize", f"mean and std need {C} values (one per channel); got {mean.shape}, "
          f"{std.shape}")
  if not np.all(std > 0):
    _fail("normalize", f"std must be > 0; got {std.tolist()}")
  return ((x_NxHxWxC - mean) / std).astype(np.float32)


def augment(x_NxHxWxC: Array, seed: int, *, pad: int = 4, flip: bool = True) -> Array:
  """Random crop of the zero-padded image (pad px each side) and random horizontal flip.

  Keyed: a pure function of (x, seed, pad, flip), never the global RNG.
  """
  if pad < 0:
    _fail("augment_pad", f"must be >= 0; got {pad}")
  N, H, W, _ = x_NxHxWxC.shape
  rng = np.random.default_rng([int(seed), 0xA06])
  dy = rng.integers(0, 2 * pad + 1, N)
  dx = rng.integers(0, 2 * pad + 1, N)
  flips = rng.random(N) < 0.5 if flip else np.zeros(N, bool)
  padded = np.pad(x_NxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = dy[:, None] + np.arange(H)[None, :]                          # [N, H]
  cols = dx[:, None] + np.arange(W)[None, :]                          # [N, W]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(N)[:, None, None], rows[:, :, None], cols[:, None, :]]
