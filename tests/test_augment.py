"""Each augmentation op does what it says on a known image; the chain is in range and
deterministic per key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emim.config_base import view_config
from emim.data import augment as A


def gradient_image(size=16):
  """A colourful known image: R ramps left-right, G top-bottom, B constant."""
  ramp = jnp.linspace(0.0, 1.0, size)
  r = jnp.tile(ramp[None, :], (size, 1))
  g = jnp.tile(ramp[:, None], (1, size))
  return jnp.stack([r, g, jnp.full((size, size), 0.3)], axis=-1)


def test_flip_reverses_columns():
  img = gradient_image()
  np.testing.assert_array_equal(A.random_flip(jax.random.PRNGKey(0), img, p=1.0), img[:, ::-1])
  np.testing.assert_array_equal(A.random_flip(jax.random.PRNGKey(0), img, p=0.0), img)


def test_grayscale_is_luma_on_every_channel():
  img = gradient_image()
  gray = A.grayscale(img)
  np.testing.assert_allclose(gray[..., 0], gray[..., 1])
  np.testing.assert_allclose(gray[..., 0], 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * 0.3, rtol=1e-6)


def test_solarize_inverts_bright_pixels_only():
  img = jnp.array([[[0.2, 0.5, 0.9]]])
  np.testing.assert_allclose(A.solarize(img), [[[0.2, 0.5, 0.1]]], rtol=1e-6)


def test_brightness_contrast_saturation():
  img = gradient_image()
  np.testing.assert_allclose(A.adjust_brightness(img, 0.5), img * 0.5, rtol=1e-6)
  np.testing.assert_allclose(A.adjust_brightness(img, 1.0), img)
  flat = A.adjust_contrast(img, 0.0)  # every pixel the mean luma
  np.testing.assert_allclose(flat, jnp.full_like(img, jnp.mean(A.grayscale(img))), rtol=1e-5)
  np.testing.assert_allclose(A.adjust_saturation(img, 0.0), A.grayscale(img), rtol=1e-6)
  np.testing.assert_allclose(A.adjust_saturation(img, 1.0), img, rtol=1e-6)


def test_hue_rotation_on_primaries_and_hsv_round_trip():
  red = jnp.array([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(A.adjust_hue(red, 1.0 / 3.0), [[[0.0, 1.0, 0.0]]], atol=1e-5)
  np.testing.assert_allclose(A.adjust_hue(red, -1.0 / 3.0), [[[0.0, 0.0, 1.0]]], atol=1e-5)
  img = gradient_image()
  np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(img)), img, atol=1e-5)
  np.testing.assert_allclose(A.adjust_hue(img, 0.0), img, atol=1e-5)


def test_blur_keeps_constants_and_mass():
  const = jnp.full((16, 16, 3), 0.4)
  np.testing.assert_allclose(A.gaussian_blur(const, 1.5, 5), const, rtol=1e-5)
  impulse = jnp.zeros((16, 16, 3)).at[8, 8].set(1.0)
  blurred = A.gaussian_blur(impulse, 1.0, 5)
  np.testing.assert_allclose(jnp.sum(blurred, axis=(0, 1)), 1.0, rtol=1e-5)  # away from the border
  assert float(blurred[8, 8, 0]) < 0.5 and float(blurred[8, 9, 0]) > 0.0
  np.testing.assert_allclose(blurred[8, 7], blurred[8, 9], rtol=1e-6)  # symmetric


def test_resized_crop_of_the_whole_image_is_identity():
  img = gradient_image()
  full = A.random_resized_crop(jax.random.PRNGKey(3), img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(full, img, atol=1e-5)
  np.testing.assert_allclose(A.center_crop(img, 16), img, atol=1e-5)
  # The left half, upsampled, keeps R within the left half's range.
  left = A.crop_and_resize(img, jnp.float32(0), jnp.float32(0), jnp.float32(16), jnp.float32(8), 16)
  assert float(left[..., 0].max()) <= float(img[0, 8, 0]) + 1e-5
  np.testing.assert_allclose(left[..., 1], img[..., 1], atol=1e-5)  # rows untouched


def test_pad_and_random_crop_is_a_shift():
  img = gradient_image()
  out = A.pad_and_random_crop(jax.random.PRNGKey(1), img, padding=4)
  assert out.shape == img.shape
  # Some shift (dy, dx) in [-4, 4]^2 of the reflected image reproduces it.
  padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect")
  assert any(np.allclose(padded[dy : dy + 16, dx : dx + 16], out) for dy in range(9) for dx in range(9))


@pytest.mark.parametrize("blur_p", [0.0, 1.0])
def test_view_chain_in_range_and_deterministic_per_key(blur_p):
  cfg = view_config(blur_p=blur_p, solarize_p=0.5)
  images = (np.random.default_rng(0).uniform(size=(8, 20, 20, 3)) * 255).astype(np.uint8)
  a = A.augment_batch(jax.random.PRNGKey(7), jnp.asarray(images), cfg, 16)
  b = A.augment_batch(jax.random.PRNGKey(7), jnp.asarray(images), cfg, 16)
  c = A.augment_batch(jax.random.PRNGKey(8), jnp.asarray(images), cfg, 16)
  assert a.shape == (8, 16, 16, 3) and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # One key per example: identical images get different views.
  same = jnp.asarray(np.repeat(images[:1], 4, axis=0))
  views = A.augment_batch(jax.random.PRNGKey(7), same, cfg, 16)
  assert not np.allclose(views[0], views[1])


def test_probability_zero_ops_leave_the_image_alone():
  cfg = view_config(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
  img = gradient_image()
  out = A.augment_view(jax.random.PRNGKey(0), img, cfg, 16)
  # crop_scale 1 with a random aspect ratio still crops; the centre pixel's colour survives.
  np.testing.assert_allclose(out[8, 8, 2], 0.3, atol=1e-5)
  assert float(jnp.std(out[..., 2])) < 1e-5  # B stays constant: no colour op ran
