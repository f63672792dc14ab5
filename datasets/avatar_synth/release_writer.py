"""Writes records in the AVATAR release layout, so the real-data builder can be
tested end to end without the real data:

  <out>/video/<video_id>.mp4                 h264 video + aac mono audio
  <out>/metadata/<video_id>/<frame>.json     one per annotated frame

Each json: {"original_width", "original_height", "annotations": [...]}, one
annotation per SOUNDING instance (as in AVATAR):
  segmentation            COCO polygons: a list of flat [x0, y0, x1, y1, ...]
  bbox                    [x, y, w, h]
  audio_visual_category   the category name
  task                    "single" | "mixed" | "multi" | "Off-Screen"
Coordinates are continuous COCO pixels: pixel (row i, col j) covers
[j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). A hole in a mask
(the ring shape, or an object in front) is joined to its outer boundary by a
zero-width cut, so filling each polygon with the even-odd rule and taking the
union of the polygons gives back the mask (`polygons_to_mask`).

An Off-screen frame (sound, but no sounding instance in view) has exactly one
annotation: {"segmentation": [], "bbox": [], "audio_visual_category": "",
"task": "Off-Screen"}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import contourpy  # matplotlib's contour engine
import numpy as np

from tavlo_datasets import schema
from tavlo_datasets.media import write_mp4  # pylint: disable=unused-import (re-exported)

# The `task` strings written for each scenario (AVATAR's spellings).
TASK_STRINGS = {'single': 'single', 'mixed': 'mixed', 'multi': 'multi',
                'offscreen': 'Off-Screen'}


# ------------------------------------------------------------------- polygons


def _keyhole(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
  """Splices a hole ring into its outer ring through the closest vertex pair."""
  d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
  i, j = np.unravel_index(np.argmin(d), d.shape)
  hole_loop = np.concatenate([hole[j:-1], hole[:j + 1]])  # starts and ends at j
  return np.concatenate([outer[:i + 1], hole_loop, outer[i:]])


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
  """COCO polygons (flat [x0, y0, ...] lists) of a binary mask [H, W]."""
  m = np.pad(np.asarray(mask) > 0, 1).astype(np.float64)
  if not m.any():
    return []
  gen = contourpy.contour_generator(z=m, fill_type='OuterOffset')
  points, offsets = gen.filled(0.5, 2.0)
  polygons = []
  for pts, off in zip(points, offsets):
    rings = [pts[off[k]:off[k + 1]] for k in range(len(off) - 1)]
    ring = rings[0]
    for hole in rings[1:]:
      ring = _keyhole(ring, hole)
    # contour coords are (col, row) of the padded array at pixel centres;
    # -1 undoes the padding, +0.5 moves to continuous COCO coordinates.
    xy = ring - 0.5
    if len(xy) >= 3:
      polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
  return polygons


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
  """Rasterises COCO polygons to uint8 [H, W]: a pixel is in when its centre
  (j + 0.5, i + 0.5) is inside a polygon by the even-odd rule; the union is
  taken over polygons. Exact for this module's convention (no rounding)."""
  out = np.zeros((height, width), bool)
  yc = np.arange(height) + 0.5
  xc = np.arange(width) + 0.5
  for poly in polygons:
    p = np.asarray(poly, np.float64).reshape(-1, 2)
    if len(p) < 3:
      continue
    (x0, y0), (x1, y1) = p.T[:, :, None], np.roll(p, -1, 0).T[:, :, None]
    # Edge e crosses the row-centre line yc (half-open, so vertices count once).
    crosses = (y0 <= yc) != (y1 <= yc)                          # [E, H]
    with np.errstate(divide='ignore', invalid='ignore'):
      x_at = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)             # [E, H]
    left = crosses[:, :, None] & (x_at[:, :, None] < xc)         # [E, H, W]
    out |= (left.sum(0) % 2).astype(bool)
  return out.astype(np.uint8)


# -------------------------------------------------------------------- records


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def frame_jsons(record: dict[str, Any]) -> dict[int, dict]:
  """{frame_index: AVATAR json dict} for one record (generator or decoded)."""
  ann = record['frames_annotated']
  inst = record['instances']
  ann_index = np.asarray(inst['annotation_index'], np.int64).reshape(-1)
  out = {}
  for a, frame_index in enumerate(np.asarray(ann['frame_index']).reshape(-1)):
    tags = np.asarray(ann['tags'][a], bool)
    names = [s for s, on in zip(schema.SCENARIOS, tags) if on]
    # Synth frames carry exactly one tag; a multi-tag frame uses the first.
    task = TASK_STRINGS[names[0]] if names else TASK_STRINGS['single']
    entries = []
    for r in np.flatnonzero(ann_index == a):
      if not bool(inst['sounding'][r]):
        continue                              # AVATAR annotates sources only
      entries.append({
          'segmentation': mask_to_polygons(np.asarray(inst['mask'][r])),
          'bbox': [float(v) for v in np.asarray(inst['box'][r]).reshape(4)],
          'audio_visual_category': _text(inst['category_name'][r]),
          'task': task,
      })
    if not entries:
      entries = [{'segmentation': [], 'bbox': [], 'audio_visual_category': '',
                  'task': TASK_STRINGS['offscreen']}]
    out[int(frame_index)] = {
        'original_width': int(record['original_width']),
        'original_height': int(record['original_height']),
        'annotations': entries,
    }
  return out


def export_release(records: Iterable[dict[str, Any]], out_dir: str,
                   limit: int | None = None) -> list[str]:
  """Writes records (an iterable, or a TFDS data source) in the AVATAR layout.

  Returns the video ids written.
  """
  ids = []
  for k, record in enumerate(records):
    if limit is not None and k >= limit:
      break
    vid = _text(record['video_id'])
    write_mp4(os.path.join(out_dir, 'video', f'{vid}.mp4'),
              np.asarray(record['frames']), float(record['fps']),
              np.asarray(record['waveform']), int(record['sample_rate']))
    meta_dir = os.path.join(out_dir, 'metadata', vid)
    os.makedirs(meta_dir, exist_ok=True)
    for frame_index, content in frame_jsons(record).items():
      with open(os.path.join(meta_dir, f'{frame_index}.json'), 'w') as f:
        json.dump(content, f)
    ids.append(vid)
  return ids
