"""Image transforms: resize (PIL and the numpy fallback), centre crop, channels, keyed
augmentation, normalisation statistics, preprocessing options."""
import numpy as np
import pytest
from PIL import Image

from stability.data import transforms

RAW = transforms.Preprocess(size=None, channels=None)  # no resize, no channel change


def test_resize_reproduces_affine_images_at_pixel_centres():
  """Bilinear with a symmetric, normalised filter is exact on affine images away from the border:
  output pixel j samples the input at (j + 0.5) * in / out - 0.5 (half-pixel centres)."""
  def ramp(r, c):
    return 0.1 + 0.02 * r + 0.01 * c

  for h, w, S in ((24, 24, 8), (6, 6, 9), (30, 30, 10)):
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = ramp(r, c).astype(np.float32)[..., None]
    got = transforms.resize(x, S)[..., 0]
    j = (np.arange(S) + 0.5) * h / S - 0.5
    ref = ramp(j[:, None], ((np.arange(S) + 0.5) * w / S - 0.5)[None, :])
    m = 2 if S < h else 1  # skip the border, where the filter is clipped and renormalised
    np.testing.assert_allclose(got[m:-m, m:-m], ref[m:-m, m:-m], atol=2e-6)
  const = np.full((13, 17, 3), 0.3, np.float32)
  np.testing.assert_allclose(transforms.resize(const, 5, center_crop=False), 0.3, atol=1e-6)
  # uint8 data and its float version resize identically (one float code path)
  u8 = np.random.default_rng(2).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
  prep = transforms.Preprocess(size=7, channels=None)
  np.testing.assert_allclose(transforms.preprocess(u8, prep),
                             transforms.preprocess(u8 / np.float32(255), prep), atol=1e-6)


def test_resize_without_pil_is_the_align_corners_bilinear_resize(monkeypatch):
  x = np.random.default_rng(3).random((5, 7, 2)).astype(np.float32)
  monkeypatch.setattr(transforms, "Image", None)
  got = transforms.resize(x, 9, center_crop=False)
  ref = transforms.resize_bilinear(np.moveaxis(x, -1, 0), 9)
  np.testing.assert_allclose(got, np.moveaxis(ref, 0, -1), atol=1e-6)


def test_center_crop_keeps_the_central_square():
  cols = np.tile(np.arange(14, dtype=np.float32) / 14, (10, 1))[..., None]  # 10 x 14
  np.testing.assert_array_equal(transforms.resize(cols, 10)[..., 0], cols[:, 2:12, 0])


def test_channels_grey_to_rgb_and_rgb_to_luma(random_rgb):
  rng = np.random.default_rng(4)
  grey = rng.integers(0, 256, (2, 5, 5), dtype=np.uint8)
  rgb = random_rgb(rng, 2, 5)
  x3 = transforms.preprocess(grey, transforms.Preprocess(size=None, channels=3))
  assert x3.shape == (2, 5, 5, 3) and np.all(x3[..., 0] == x3[..., 2])
  x1 = transforms.preprocess(rgb, transforms.Preprocess(size=None, channels=1))
  pil_luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
  np.testing.assert_allclose(x1[..., 0] * 255, pil_luma, atol=0.51)
  rgba = np.concatenate([rgb, np.full((2, 5, 5, 1), 7, np.uint8)], -1)  # alpha is dropped
  np.testing.assert_array_equal(transforms.preprocess(rgba, RAW), transforms.preprocess(rgb, RAW))


def test_augment_is_keyed_deterministic_and_a_padded_crop_or_flip():
  x = np.random.default_rng(5).random((16, 6, 6, 2)).astype(np.float32)
  a, b = transforms.augment(x, 7), transforms.augment(x, 7)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, transforms.augment(x, 8))
  np.testing.assert_array_equal(transforms.augment(x, 7, pad=0, flip=False), x)
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flipped = 0
  for i in range(len(x)):
    views = [(f, padded[i, dy:dy + 6, dx:dx + 6][:, ::-1 if f else 1])
             for dy in range(9) for dx in range(9) for f in (0, 1)]
    match = [f for f, v in views if np.array_equal(v, a[i])]
    assert match, f"row {i} is not a crop of the padded image"
    flipped += min(match)
  assert 0 < flipped < len(x)  # both flips happen


def test_normalisation_statistics():
  rng = np.random.default_rng(6)
  x = rng.random((50, 4, 4, 3)).astype(np.float32) * [0.2, 0.5, 1.0]
  mean, std = transforms.channel_stats(x)
  z = transforms.normalize(x, mean, std)
  np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)


def test_bad_preprocess_options_name_the_field():
  with pytest.raises(ValueError, match="image_size"):
    transforms.Preprocess(size=0)
  with pytest.raises(ValueError, match="channels"):
    transforms.Preprocess(channels=2)
