"""Heat-map overlays: PNG grids, an animated GIF per clip, arrays for TensorBoard.

A clip is drawn as two rows, T columns: the frames on top and, under each,
the frame with the min-max-normalised map in a perceptual colormap (inferno)
and the ground-truth outline (cyan) on annotated frames.

    write_clip(out_dir, 'single_clip3', frames, heatmaps, gt_masks, ann_valid)
    images = tensorboard_images(batch, heatmap, rows=[0, 2])   # {name: HWC uint8}
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import numpy as np
from PIL import Image

from tavlo_jax.evaluation import evaluator as evaluator_lib
from tavlo_jax.evaluation import metrics

COLORMAP = 'inferno'
OUTLINE_RGB = (0, 255, 255)
MIN_DISPLAY_HEIGHT = 128   # small frames (64 px) are enlarged to be readable


def _resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  """Float or uint8 2-D/3-D array -> (H, W) with PIL."""
  h, w = size
  if a.dtype == np.uint8:
    return np.asarray(Image.fromarray(a).resize((w, h), resample))
  return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), resample))


def colorize(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Raw map [h, w] -> uint8 RGB [H, W, 3], min-max normalised (flat -> dark).

  Flat is what `metrics.normalize` calls flat: a spread of float rounding only
  (the resize can wobble a constant map by an ulp) is not blown up to colours.
  """
  up = _resize(np.asarray(heat, np.float32), size, Image.BILINEAR)
  lo, hi = float(up.min()), float(up.max())
  flat = hi - lo <= metrics.FLAT_RTOL * max(abs(hi), abs(lo))
  p = np.zeros_like(up) if flat else (up - lo) / (hi - lo)
  rgb = matplotlib.colormaps[COLORMAP](p)[..., :3]
  return (rgb * 255).astype(np.uint8)


def outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Boundary pixels of a 0/1 mask resized (nearest) to size: bool [H, W]."""
  m = _resize((np.asarray(mask) > 0).astype(np.uint8) * 255, size, Image.NEAREST) > 0
  inner = m.copy()
  inner[1:] &= m[:-1]
  inner[:-1] &= m[1:]
  inner[:, 1:] &= m[:, :-1]
  inner[:, :-1] &= m[:, 1:]
  return m & ~inner


def overlay(frame: np.ndarray, heat: np.ndarray, gt_mask: np.ndarray | None = None,
            alpha: float = 0.55) -> np.ndarray:
  """Frame uint8 [H, W, 3] blended with the colorized map, GT outline on top."""
  size = frame.shape[:2]
  out = (1 - alpha) * frame.astype(np.float32) + alpha * colorize(heat, size)
  out = out.astype(np.uint8)
  if gt_mask is not None:
    out[outline(gt_mask, size)] = OUTLINE_RGB
  return out


def _display(frame: np.ndarray) -> np.ndarray:
  factor = max(1, -(-MIN_DISPLAY_HEIGHT // frame.shape[0]))
  return frame if factor == 1 else np.kron(frame, np.ones((factor, factor, 1), np.uint8))


def _panels(frames, heatmaps, gt_masks, ann_valid):
  """Per frame: (display frame, display overlay)."""
  t = len(frames)
  ann_valid = np.ones(t, bool) if ann_valid is None else np.asarray(ann_valid, bool)
  out = []
  for i in range(t):
    f = _display(np.asarray(frames[i], np.uint8))
    gt = gt_masks[i] if gt_masks is not None and ann_valid[i] else None
    out.append((f, overlay(f, np.asarray(heatmaps[i]), gt)))
  return out


def clip_grid(frames, heatmaps, gt_masks=None, ann_valid=None, pad: int = 2) -> np.ndarray:
  """Two rows (frames, overlays) x T columns, as one uint8 image."""
  panels = _panels(frames, heatmaps, gt_masks, ann_valid)
  h, w = panels[0][0].shape[:2]
  grid = np.full((2 * h + 3 * pad, len(panels) * (w + pad) + pad, 3), 255, np.uint8)
  for i, (f, o) in enumerate(panels):
    x = pad + i * (w + pad)
    grid[pad:pad + h, x:x + w] = f
    grid[2 * pad + h:2 * pad + 2 * h, x:x + w] = o
  return grid


def clip_frames(frames, heatmaps, gt_masks=None, ann_valid=None) -> list[np.ndarray]:
  """Per frame [frame | overlay] side by side (the GIF's frames)."""
  return [np.concatenate([f, o], axis=1)
          for f, o in _panels(frames, heatmaps, gt_masks, ann_valid)]


def write_clip(out_dir: str, name: str, frames, heatmaps, gt_masks=None, ann_valid=None,
               fps: float = 4.0) -> dict[str, str]:
  """`{name}.png` (grid) and `{name}.gif` (animated) in out_dir; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  png, gif = os.path.join(out_dir, f'{name}.png'), os.path.join(out_dir, f'{name}.gif')
  Image.fromarray(clip_grid(frames, heatmaps, gt_masks, ann_valid)).save(png)
  images = [Image.fromarray(a) for a in clip_frames(frames, heatmaps, gt_masks, ann_valid)]
  images[0].save(gif, save_all=True, append_images=images[1:],
                 duration=int(1000 / fps), loop=0)
  return {'png': png, 'gif': gif}


def tensorboard_images(batch: dict, heatmap, rows: Sequence[int],
                       prefix: str = 'eval/overlay/') -> dict[str, np.ndarray]:
  """{prefix + clip id: HWC uint8 grid} for the given rows of a host batch."""
  heatmap = np.asarray(heatmap)
  out = {}
  for r in rows:
    name = f"{prefix}clip{int(np.asarray(batch['clip_index'])[r])}"
    out[name] = clip_grid(np.asarray(batch['frames'][r]), heatmap[r],
                          np.asarray(batch['gt_mask'][r]), np.asarray(batch['ann_valid'][r]))
  return out


def select_clips(table: dict, frames: str, n: int) -> list[int]:
  """The first n clip indices having a frame in the pool `frames` (deterministic)."""
  pool = evaluator_lib.pool_mask(table, frames)
  return [int(c) for c in np.unique(table['clip_index'][pool])[:n]]
