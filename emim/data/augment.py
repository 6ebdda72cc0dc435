"""Image augmentations on device, in JAX, one key per example.

Every op takes a single float32 image (H, W, 3) in [0, 1] and a key; ``augment_batch``
vmaps the whole chain over a batch with one key per example. The view recipe
(SimCLR/BYOL) is, per view: random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation, hue, in random order) with probability, grayscale,
Gaussian blur and solarisation, each with the view's own probability, so the
asymmetric BYOL recipe (blur 1.0/0.1, solarise 0.0/0.2) is two configs.
Brightness/contrast/saturation are multiplicative factors in [1 - s, 1 + s] and hue a
shift in [-h, h] of a turn, as torchvision's ColorJitter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array

# A NumPy constant: a jnp array made at import would start JAX's backends before
# jax.distributed.initialize() (multi-host) or XLA_FLAGS (deterministic GPU ops) can act.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------
def crop_and_resize(image: Array, top: Array, left: Array, height: Array, width: Array, size: int) -> Array:
  """Crop the box (top, left, height, width) in pixels and resize it to (size, size)."""
  scale = jnp.stack([size / height, size / width])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(
      image, (size, size, image.shape[-1]), (0, 1), scale, translation, method="linear", antialias=True)


def random_resized_crop(
    key: Array, image: Array, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Array:
  """Inception-style crop: area fraction ~ U(scale), log aspect ratio ~ U(log ratio).

  The box is clipped to the image rather than re-sampled (no rejection loop on device),
  and placed uniformly where it fits.
  """
  h, w = image.shape[0], image.shape[1]
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
  crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
  top = jax.random.uniform(k_top, ()) * (h - crop_h)
  left = jax.random.uniform(k_left, ()) * (w - crop_w)
  return crop_and_resize(image, top, left, crop_h, crop_w, size)


def center_crop(image: Array, size: int, crop_fraction: float = 1.0) -> Array:
  """The central crop_fraction of the image, resized to (size, size)."""
  h, w = image.shape[0], image.shape[1]
  ch, cw = h * crop_fraction, w * crop_fraction
  return crop_and_resize(image, (h - ch) / 2, (w - cw) / 2, jnp.float32(ch), jnp.float32(cw), size)


def random_flip(key: Array, image: Array, p: float = 0.5) -> Array:
  return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


def pad_and_random_crop(key: Array, image: Array, padding: int = 4) -> Array:
  """The CIFAR linear-probe crop: pad by reflection, crop back at a random offset."""
  h, w = image.shape[0], image.shape[1]
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
  k1, k2 = jax.random.split(key)
  top = jax.random.randint(k1, (), 0, 2 * padding + 1)
  left = jax.random.randint(k2, (), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (top, left, 0), (h, w, image.shape[2]))


# ----------------------------------------------------------------------------------
# Colour.
# ----------------------------------------------------------------------------------
def _luma(image: Array) -> Array:
  """ITU-R 601 luma, (..., H, W). The channels as three planes and elementwise sums and
  maxima, not reductions over the last axis: on a TPU the channels lie in a major
  dimension, where a reduction is a separate pass over the image that XLA does not fuse
  with the elementwise work around it (python -m emim.aot --breakdown)."""
  return _LUMA[0] * image[..., 0] + _LUMA[1] * image[..., 1] + _LUMA[2] * image[..., 2]


def grayscale(image: Array) -> Array:
  """ITU-R 601 luma, repeated over the three channels."""
  return jnp.repeat(_luma(image)[..., None], 3, axis=-1)


def adjust_brightness(image: Array, factor: Array) -> Array:
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: Array, factor: Array) -> Array:
  mean = jnp.mean(_luma(image))
  return jnp.clip(mean + factor * (image - mean), 0.0, 1.0)


def adjust_saturation(image: Array, factor: Array) -> Array:
  gray = _luma(image)[..., None]
  return jnp.clip(gray + factor * (image - gray), 0.0, 1.0)


def _hsv_planes(rgb: Array) -> tuple[Array, Array, Array]:
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)  # (see _luma: elementwise, not a reduction)
  c = v - jnp.minimum(jnp.minimum(r, g), b)
  safe_c = jnp.where(c > 0, c, 1.0)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  h = jnp.where(v == r, (g - b) / safe_c, jnp.where(v == g, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c))
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def _rgb_from_hsv_planes(h: Array, s: Array, v: Array) -> Array:
  k = (jnp.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def rgb_to_hsv(rgb: Array) -> Array:
  return jnp.stack(_hsv_planes(rgb), axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
  return _rgb_from_hsv_planes(hsv[..., 0], hsv[..., 1], hsv[..., 2])


def adjust_hue(image: Array, delta: Array) -> Array:
  """Rotate the hue by delta turns (delta in [-0.5, 0.5]). On the three planes, never an
  (..., 3) HSV array: writing its hue with ``.at[..., 0].set`` was a scatter under vmap,
  which XLA does not fuse with the conversions around it (python -m emim.aot --breakdown:
  the ImageNet views' augmentation moved 7.7 GB of a v5e chip's memory per step with it)."""
  h, s, v = _hsv_planes(image)
  return jnp.clip(_rgb_from_hsv_planes((h + delta) % 1.0, s, v), 0.0, 1.0)


def color_jitter(key: Array, image: Array, brightness: float, contrast: float, saturation: float, hue: float) -> Array:
  """The four jitters with random strengths, applied in a random order."""
  k_order, kb, kc, ks, kh = jax.random.split(key, 5)
  factor = lambda k, s: jax.random.uniform(k, (), minval=max(0.0, 1.0 - s), maxval=1.0 + s)
  ops = [
      lambda x: adjust_brightness(x, factor(kb, brightness)),
      lambda x: adjust_contrast(x, factor(kc, contrast)),
      lambda x: adjust_saturation(x, factor(ks, saturation)),
      lambda x: adjust_hue(x, jax.random.uniform(kh, (), minval=-hue, maxval=hue)),
  ]
  order = jax.random.permutation(k_order, 4)
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], ops, x), image)


# ----------------------------------------------------------------------------------
# Blur and solarisation.
# ----------------------------------------------------------------------------------
def gaussian_blur(image: Array, sigma: Array, kernel_size: int) -> Array:
  """Separable Gaussian blur with a per-example sigma and reflected borders."""
  radius = kernel_size // 2
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w = image.shape[0], image.shape[1]
  # Sum shifted copies: kernel_size is small, and this avoids per-example conv kernels.
  rows = sum(kernel[i] * padded[i : i + h] for i in range(kernel_size))
  return sum(kernel[i] * rows[:, i : i + w] for i in range(kernel_size))


def solarize(image: Array, threshold: float = 0.5) -> Array:
  return jnp.where(image < threshold, image, 1.0 - image)


# ----------------------------------------------------------------------------------
# The view recipe.
# ----------------------------------------------------------------------------------
def augment_view(key: Array, image: Array, cfg: ml_collections.ConfigDict, size: int, crop: bool = True) -> Array:
  """One augmented view of one image (float32 in [0, 1]) under the view config ``cfg``.

  Keys of cfg: crop_scale (min, max), flip_p, jitter_p, brightness, contrast,
  saturation, hue, grayscale_p, blur_p, blur_sigma (min, max), solarize_p.
  ``crop=False`` when the random resized crop was already taken (on the host, from the
  full image, for streamed data): the image must then be (size, size).
  """
  keys = jax.random.split(key, 10)
  x = random_resized_crop(keys[0], image, size, scale=tuple(cfg.crop_scale)) if crop else image
  x = random_flip(keys[1], x, cfg.flip_p)

  def maybe(k_apply, p, fn, x):
    return jnp.where(jax.random.bernoulli(k_apply, p), fn(x), x)

  x = maybe(keys[2], cfg.jitter_p, lambda x: color_jitter(keys[3], x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue), x)
  x = maybe(keys[4], cfg.grayscale_p, grayscale, x)
  if cfg.blur_p > 0:
    kernel_size = max(3, (size // 10) | 1)  # ~10% of the image, odd
    sigma = jax.random.uniform(keys[6], (), minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
    x = maybe(keys[5], cfg.blur_p, lambda x: gaussian_blur(x, sigma, kernel_size), x)
  x = maybe(keys[7], cfg.solarize_p, solarize, x)
  return x


def to_float(images: Array) -> Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def normalize(images: Array, mean, std) -> Array:
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment_batch(key: Array, images: Array, cfg: ml_collections.ConfigDict, size: int, crop: bool = True) -> Array:
  """Augment a uint8 (or [0, 1] float) batch with one key per example."""
  if images.dtype == jnp.uint8:
    images = to_float(images)
  if not crop and images.shape[1:3] != (size, size):
    raise ValueError(f"Pre-cropped views must be {size}x{size}, got {images.shape[1:3]}.")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: augment_view(k, x, cfg, size, crop))(keys, images)


# ----------------------------------------------------------------------------------
# Vectors (the Gaussian-mixture experiment).
# ----------------------------------------------------------------------------------
def augment_vectors(key: Array, vectors: Array, cfg: ml_collections.ConfigDict) -> Array:
  """A view of a batch of vectors: Gaussian noise of std ``cfg.noise_std`` added, then
  each coordinate zeroed with probability ``cfg.mask_p`` (one draw per coordinate)."""
  k_noise, k_mask = jax.random.split(key)
  x = vectors.astype(jnp.float32) + cfg.noise_std * jax.random.normal(k_noise, vectors.shape, jnp.float32)
  if cfg.mask_p > 0:
    x = jnp.where(jax.random.bernoulli(k_mask, cfg.mask_p, x.shape), 0.0, x)
  return x
