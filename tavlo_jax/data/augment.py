"""Training augmentation, deterministic given the example's numpy Generator.

Video: one random resized crop, one flip decision and one colour jitter per
CLIP, applied identically to all its frames (a per-frame crop would make
objects jump between frames, and the temporal model would learn from the
jitter instead of the motion). Audio: SpecAugment time/frequency masks on the
log-mel. Everything is switched by `config.input.augment.*`; the pipeline
never calls this at evaluation.

Where the pixels are touched: the crop box and flip are drawn here and
applied by the decoder as it scales (clip_storage.gather_frames); the colour
jitter runs here (float64 numpy), or with `color_jitter_on='device'` inside
the jitted train step (`frames_for_model`) on factors drawn here, so both
places apply the same augmentation for the same seed and a resumed pipeline
state resumes it exactly.
"""

from __future__ import annotations

import math

import numpy as np

from tavlo_datasets import clip_storage

# Luma weights (ITU-R 601), as PIL's 'L' conversion and torchvision use.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: tuple[float, float], ratio=(3 / 4, 4 / 3),
             attempts: int = 10) -> tuple[float, float, float, float]:
  """Inception-style random resized crop box (x0, y0, x1, y1).

  Area fraction in `scale`, aspect ratio log-uniform in `ratio`; falls back
  to the largest centred crop of valid aspect after `attempts` misses.
  """
  area = height * width
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = math.sqrt(target * aspect)
    h = math.sqrt(target / aspect)
    if w <= width and h <= height:
      x0 = rng.uniform(0, width - w)
      y0 = rng.uniform(0, height - h)
      return (x0, y0, x0 + w, y0 + h)
  aspect = min(max(width / height, ratio[0]), ratio[1])
  w, h = (height * aspect, height) if aspect < width / height else (
      width, width / aspect)
  x0, y0 = (width - w) / 2, (height - h) / 2
  return (x0, y0, x0 + w, y0 + h)


JITTER_PLACES = ('host', 'device')


def jitter_factors(rng: np.random.Generator, strength: float) -> np.ndarray:
  """float64 [3]: the brightness, contrast and saturation factors of a clip,
  uniform in [1-s, 1+s] (one draw of three, the same on either side)."""
  return rng.uniform(1 - strength, 1 + strength, size=3)


def color_jitter(frames: np.ndarray, rng: np.random.Generator,
                 strength: float) -> np.ndarray:
  """Brightness, contrast and saturation factors in [1-s, 1+s], one set per clip.

  Contrast pulls towards the CLIP's mean grey (not each frame's), so the
  same pointwise function is applied to every frame.
  """
  if strength <= 0:
    return frames
  b, c, s = jitter_factors(rng, strength)
  # In place, one float64 buffer (the factors are float64, so this is the
  # precision the plain formula x = (x - mean) * c + mean ... computes in,
  # bit for bit): the temporaries made it a leading cost per paper-size clip.
  x = frames.astype(np.float64)
  x *= b
  mean = x.mean()
  x -= mean
  x *= c
  x += mean
  grey = (x @ _LUMA)[..., None]
  x -= grey
  x *= s
  x += grey
  np.rint(x, out=x)
  np.clip(x, 0, 255, out=x)
  return x.astype(np.uint8)


def color_jitter_batch(frames, factors):
  """`color_jitter` of a batch inside the jitted step (float32 on device).

  frames uint8 [B, T, H, W, 3], factors [B, 3] (`color_factors`, drawn on
  the host by `jitter_factors`) -> uint8 [B, T, H, W, 3]: the host's formula
  (same mean over the clip, same luma weights, same rounding and clipping);
  float32 instead of float64 moves a value across a rounding tie now and
  then (tests/test_data.py bounds it).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  f = jnp.asarray(factors, jnp.float32)[:, :, None, None, None, None]
  x = frames.astype(jnp.float32) * f[:, 0]
  mean = jnp.mean(x, axis=(1, 2, 3, 4), keepdims=True)
  x = (x - mean) * f[:, 1] + mean
  grey = (x @ jnp.asarray(_LUMA))[..., None]
  x = (x - grey) * f[:, 2] + grey
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


# What a training batch carries its frames as (`config.input.frame_format`,
# clip_storage.FRAME_FORMATS): uint8 RGB, or the decoder's 4:2:0 planes
# ('frames_y', 'frames_uv': half the bytes, and no colour conversion on the
# host), converted in the step.


def yuv420_to_rgb(y, uv):
  """uint8 4:2:0 planes -> uint8 RGB, inside the jitted step (float32).

  y [..., H, W], uv [..., 2, H/2, W/2] (U then V; BT.601 limited range, as
  clip_storage.Yuv420) -> [..., H, W, 3]. Each chroma sample covers its 2x2
  pixels, as in libswscale's own conversion of these frames; values are
  rounded to nearest, where libswscale's fast path truncates, so the two
  differ by about one level (at most 3, tests/test_clip_storage.py).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kr, kg, kb = (float(k) for k in _LUMA)
  luma = (y.astype(jnp.float32) - 16.0) * (255.0 / 219.0)
  chroma = (uv.astype(jnp.float32) - 128.0) * (255.0 / 224.0)
  chroma = jnp.repeat(jnp.repeat(chroma, 2, axis=-2), 2, axis=-1)
  u, v = chroma[..., 0, :, :], chroma[..., 1, :, :]
  rgb = jnp.stack([luma + 2 * (1 - kr) * v,
                   luma - (2 * (1 - kb) * kb * u + 2 * (1 - kr) * kr * v) / kg,
                   luma + 2 * (1 - kb) * u], axis=-1)
  return jnp.clip(jnp.round(rgb), 0, 255).astype(jnp.uint8)


def _bilinear_weights(out_size: int, valid, in_size: int, flip):
  """f32 [B, out_size, in_size]: row o averages the first `valid[b]` input
  samples around output sample o's centre, (o + 0.5) * valid / out_size,
  with a triangle of half-width max(valid / out_size, 1) (widened when
  shrinking, as PIL's and libswscale's bilinear resize), rows summing to 1;
  in reverse row order where `flip[b]`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  valid = valid.astype(jnp.float32)[:, None, None]
  scale = valid / out_size
  support = jnp.maximum(scale, 1.0)
  centre = (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
  position = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(1.0 - jnp.abs(position - centre) / support, 0.0)
  weights = jnp.where(position < valid, weights, 0.0)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.where(flip[:, None, None], weights[:, ::-1], weights)


def scale_unscaled_frames(y, uv, box_hw, flip, size: int):
  """`frame_format='yuv420_unscaled'` batches in the jitted step: each
  clip's box (the top-left box_hw of its window) scaled bilinearly to
  size x size, plane by plane, and mirrored where `flip`; rounded to uint8
  as the host's scaling would. y uint8 [B, T, WH, WW], uv [B, T, 2, WH/2,
  WW/2], box_hw int [B, 2], flip bool [B] -> (y [B, T, S, S], uv [B, T, 2,
  S/2, S/2]), what `yuv420_to_rgb` takes."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  no_flip = jnp.zeros_like(flip)

  def scale(plane, height, width, out):
    rows = _bilinear_weights(out, height, plane.shape[-2], no_flip)
    cols = _bilinear_weights(out, width, plane.shape[-1], flip)
    lead = 'bt' if plane.ndim == 4 else 'btc'
    scaled = jnp.einsum(f'bhH,{lead}HW,bwW->{lead}hw', rows,
                        plane.astype(jnp.float32), cols)
    return jnp.clip(jnp.round(scaled), 0, 255).astype(jnp.uint8)

  height, width = box_hw[:, 0], box_hw[:, 1]
  return (scale(y, height, width, size),
          scale(uv, height // 2, width // 2, size // 2))


def frames_for_model(batch, image_size: int | None = None):
  """The uint8 RGB clip frames a batch feeds the model, inside the jitted
  step: scaled to `image_size` and mirrored (`frame_format=
  'yuv420_unscaled'`), converted from 4:2:0 planes (`'yuv420'` too), then
  with `color_factors` (colour jitter on the device) jittered."""
  if 'frames_box_hw' in batch:
    if image_size is None:
      raise ValueError('unscaled frames need the image_size to scale them to')
    frames = yuv420_to_rgb(*scale_unscaled_frames(
        batch['frames_y'], batch['frames_uv'], batch['frames_box_hw'],
        batch['frames_flip'], int(image_size)))
  elif 'frames_y' in batch:
    frames = yuv420_to_rgb(batch['frames_y'], batch['frames_uv'])
  else:
    frames = batch['frames']
  if 'color_factors' in batch:
    return color_jitter_batch(frames, batch['color_factors'])
  return frames


def augment_geometry(rng: np.random.Generator, height: int, width: int,
                     aug) -> tuple[tuple | None, bool]:
  """(crop box or None, flip) for one clip. Draws in a fixed order."""
  box = None
  if aug.random_resized_crop:
    box = crop_box(rng, height, width, tuple(aug.crop_scale))
  flip = bool(aug.flip) and bool(rng.random() < 0.5)
  return box, flip


class ClipGeometry:
  """geometry(height, width) -> (crop box or None, flip) of a clip, drawn
  when its frame size is known: the `geometry` of `sampling.cut_clip` (the
  decoder asks once). Without augmentation: the whole frame, no flip, and
  nothing drawn."""

  def __init__(self, rng: np.random.Generator, aug):
    self.rng, self.aug = rng, aug

  def __call__(self, height: int, width: int) -> tuple[tuple | None, bool]:
    if not self.aug.enabled:
      return None, False
    return augment_geometry(self.rng, height, width, self.aug)


def jitter_video(frames: np.ndarray | clip_storage.Yuv420,
                 rng: np.random.Generator, aug) -> dict[str, np.ndarray]:
  """Cropped, resized, flipped frames -> {'frames'} colour-jittered on the
  host, or {'frames', 'color_factors'} (f32 [3]) to jitter on the device
  (`aug.color_jitter_on`); the same draws from `rng` either way. 4:2:0
  frames give {'frames_y', 'frames_uv'} instead of 'frames', and are only
  jittered on the device (the host formula works on RGB)."""
  place = aug.color_jitter_on
  if place not in JITTER_PLACES:
    raise ValueError(f'config.input.augment.color_jitter_on={place!r}; '
                     f'expected one of {JITTER_PLACES}')
  yuv = isinstance(frames, (clip_storage.Yuv420, clip_storage.Yuv420Unscaled))
  pixels = ({'frames_y': frames.y, 'frames_uv': frames.uv} if yuv
            else {'frames': frames})
  if isinstance(frames, clip_storage.Yuv420Unscaled):
    pixels.update(frames_box_hw=frames.box_hw, frames_flip=frames.flip)
  jitter = aug.enabled and aug.color_jitter > 0
  if jitter and place == 'device':
    return {**pixels, 'color_factors': jitter_factors(
        rng, aug.color_jitter).astype(np.float32)}
  if jitter and yuv:
    name = ('yuv420' if isinstance(frames, clip_storage.Yuv420)
            else 'yuv420_unscaled')
    raise ValueError(f"config.input.frame_format='{name}' ships frames that "
                     "the host cannot colour-jitter: set "
                     "config.input.augment.color_jitter_on='device'")
  if aug.enabled:
    pixels['frames'] = color_jitter(frames, rng, aug.color_jitter)
  return pixels


def augment_video(frames: np.ndarray, rng: np.random.Generator, aug,
                  image_size: int) -> np.ndarray:
  """uint8 [T, H, W, 3] -> [T, S, S, 3]: crop+resize, flip, jitter per clip
  (all on the host, whatever `aug.color_jitter_on` says)."""
  box, flip = ClipGeometry(rng, aug)(frames.shape[1], frames.shape[2])
  frames = clip_storage.resize_frames(frames, image_size, box)
  if flip:
    frames = frames[:, :, ::-1]
  if aug.enabled:
    frames = color_jitter(frames, rng, aug.color_jitter)
  return np.ascontiguousarray(frames)


def sample_spec_masks(rng: np.random.Generator, num_columns: int,
                      num_mels: int, aug) -> tuple[np.ndarray, np.ndarray]:
  """SpecAugment masks: bool [num_columns] and [num_mels], True = masked.

  `spec_time_masks` bands of 0..`spec_time_mask_width` columns and
  `spec_freq_masks` bands of 0..`spec_freq_mask_width` mel bins, each at a
  uniform position.
  """
  def bands(n, count, max_width):
    mask = np.zeros((n,), bool)
    for _ in range(int(count)):
      w = int(rng.integers(0, min(int(max_width), n) + 1))
      x0 = int(rng.integers(0, n - w + 1))
      mask[x0:x0 + w] = True
    return mask
  return (bands(num_columns, aug.spec_time_masks, aug.spec_time_mask_width),
          bands(num_mels, aug.spec_freq_masks, aug.spec_freq_mask_width))

