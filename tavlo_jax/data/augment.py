"""Training augmentation, deterministic given the example's numpy Generator.

Video: one random resized crop, one flip decision and one colour jitter per
CLIP, applied identically to all its frames (a per-frame crop would make
objects jump between frames, and the temporal model would learn from the
jitter instead of the motion). Audio: SpecAugment time/frequency masks on the
log-mel. Everything is switched by `config.input.augment.*`; the pipeline
never calls this at evaluation.
"""

from __future__ import annotations

import math

import numpy as np

from tavlo_jax.data import sampling

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


def color_jitter(frames: np.ndarray, rng: np.random.Generator,
                 strength: float) -> np.ndarray:
  """Brightness, contrast and saturation factors in [1-s, 1+s], one set per clip.

  Contrast pulls towards the CLIP's mean grey (not each frame's), so the
  same pointwise function is applied to every frame.
  """
  if strength <= 0:
    return frames
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
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


def augment_geometry(rng: np.random.Generator, height: int, width: int,
                     aug) -> tuple[tuple | None, bool]:
  """(crop box or None, flip) for one clip. Draws in a fixed order."""
  box = None
  if aug.random_resized_crop:
    box = crop_box(rng, height, width, tuple(aug.crop_scale))
  flip = bool(aug.flip) and bool(rng.random() < 0.5)
  return box, flip


def augment_video(frames: np.ndarray, rng: np.random.Generator, aug,
                  image_size: int) -> np.ndarray:
  """uint8 [T, H, W, 3] -> [T, S, S, 3]: crop+resize, flip, jitter per clip."""
  box, flip = None, False
  if aug.enabled:
    box, flip = augment_geometry(rng, frames.shape[1], frames.shape[2], aug)
  frames = sampling.resize_frames(frames, image_size, box)
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

