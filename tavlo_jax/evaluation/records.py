"""Per-frame records: computed on device from a batch, gathered to every host.

A record is everything the dataset scores need about one annotated frame, so
pooling, calibration and reports run on small host arrays and never touch a
heat map again. Computing them is one jitted function of the eval batch (its
batch dimension may be sharded over any mesh); gathering is
`process_allgather`, which EVERY process calls the same number of times
(padding examples keep the batch count equal) and which leaves the same
complete table on every host. Sorting by (clip_index, frame_index) then makes
the table independent of the batch size and of the number of processes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tavlo_jax.evaluation import metrics

# Eval batch keys the records need (WORKSPACE.md "Batches").
BATCH_KEYS = ('valid', 'ann_valid', 'gt_mask', 'tags', 'cross_event',
              'clip_index', 'frame_index')
# Used when present; a batch without `category` gives every frame -1 (unknown),
# one without `any_mask` a NaN `silent_margin`.
# `gt_votes` [B, T]: gt_mask counts covering instances and a pixel weighs
# min(gt_mask / gt_votes, 1) (Flickr's consensus); absent = 1, the union.
OPTIONAL_BATCH_KEYS = ('category', 'any_mask', 'gt_votes')
# The absolute map of a cosine map is (cos + 1) / 2 in [0, 1]; SLAVC's
# absolute rule keeps a >= 0.5, i.e. cos >= 0.
ABS_THRESHOLD = 0.5

# name -> (dtype, "K" when there is one value per AVATAR heatmap threshold).
FIELDS = {
    'clip_index': (np.int32, ''), 'frame_index': (np.int32, ''),
    'tags': (np.bool_, 'S'), 'cross_event': (np.bool_, ''),
    'category': (np.int32, ''),           # shared by the sounding instances, -1 none
    'gt_pixels': (np.int32, ''),
    'ciou': (np.float32, 'K'),            # fixed threshold on the normalised map
    'pia': (np.float32, 'K'),             # fraction predicted positive, same rule
    'ciou_top50_ge': (np.float32, ''), 'ciou_top50_gt': (np.float32, ''),
    'ciou_adaptive': (np.float32, ''),
    'ciou_abs': (np.float32, ''), 'pia_abs': (np.float32, ''),
    'hit': (np.bool_, ''), 'min_hit': (np.bool_, ''),
    'hit_1cell': (np.bool_, ''),          # a GT pixel within one model cell of the argmax
    'point_dy': (np.float32, ''), 'point_dx': (np.float32, ''),   # argmax - GT centroid, cells
    'silent_margin': (np.float32, ''),    # map on source - on visible silent instances
    'raw_max': (np.float32, ''), 'raw_min': (np.float32, ''),
    'raw_mean': (np.float32, ''),         # peak = raw_max - raw_mean (the loss's pooling)
    'confidence': (np.float32, ''),
    'oracle_best': (np.float32, ''), 'oracle_adaptive': (np.float32, ''),
    'finite': (np.bool_, ''),
}


def frame_scores(heatmap, gt, *, thresholds: Sequence[float], interpolation: str,
                 with_oracle: bool = True, silent=None, weighted: bool = False) -> dict:
  """Scores of N frames: heatmap [N, h, w] raw cosine, gt [N, H, W] 0/1 masks
  (weights in [0, 1] with weighted=True); silent [N, H, W]: the visible
  silent instances (None: silent_margin NaN).

  Every score is per frame; they are computed metrics.CHUNK_FRAMES frames at
  a time, which keeps the full-size maps near the cache. (The silent margin
  alone is computed on the whole batch, as before chunking: its float sums
  came out a rounding apart in chunks, and the tables must not move.)
  """
  out = metrics.over_frame_chunks(
      lambda h, g: _frame_scores(h, g, thresholds=thresholds,
                                 interpolation=interpolation,
                                 with_oracle=with_oracle, weighted=weighted), heatmap, gt)
  if silent is None:
    out['silent_margin'] = jnp.full(out['gt_pixels'].shape, jnp.nan)
  else:
    finite = jnp.isfinite(heatmap).all(axis=(-2, -1))
    up = metrics.upsample(jnp.where(finite[:, None, None], heatmap, 0.0),
                          gt.shape[-2:], interpolation)
    out['silent_margin'] = metrics.sounding_silent_margin(up, gt, silent)
  return out


def _frame_scores(heatmap, gt, *, thresholds: Sequence[float], interpolation: str,
                  with_oracle: bool, weighted: bool) -> dict:
  size = gt.shape[-2:]
  finite = jnp.isfinite(heatmap).all(axis=(-2, -1))
  heatmap = jnp.where(finite[:, None, None], heatmap, 0.0)   # keep NaN out of sorts
  up = metrics.upsample(heatmap, size, interpolation)
  p = metrics.normalize(up)
  a = (up + 1.0) / 2.0
  k = metrics.gt_pixels(gt)
  point_dy, point_dx, hit_1cell = metrics.pointing_offset(up, gt, heatmap.shape[-2:])
  raw_max, raw_min = up.max(axis=(-2, -1)), up.min(axis=(-2, -1))
  # avatar_fixed (p > t) at every threshold, on the raw map in packed passes.
  ciou_fixed, pia_fixed = metrics.fixed_threshold_scores(
      up, gt, thresholds, raw_min, raw_max, weighted=weighted)
  out = {
      'gt_pixels': k,
      'ciou': ciou_fixed,
      'pia': pia_fixed,
      'ciou_top50_ge': metrics.ciou(metrics.top50(p, strict=False), gt),
      'ciou_top50_gt': metrics.ciou(metrics.top50(p, strict=True), gt),
      'ciou_adaptive': metrics.ciou(metrics.adaptive_topk(p, k), gt),
      'ciou_abs': metrics.ciou(metrics.raw_threshold(a, ABS_THRESHOLD), gt),
      'pia_abs': metrics.pia(metrics.raw_threshold(a, ABS_THRESHOLD)),
      'hit': metrics.pointing_hit(up, gt),
      'min_hit': metrics.pointing_min_hit(up, gt),
      'hit_1cell': hit_1cell, 'point_dy': point_dy, 'point_dx': point_dx,
      'raw_max': raw_max,
      'raw_min': raw_min,
      'raw_mean': metrics.map_mean(up),
      'confidence': metrics.confidence(a),
      'finite': finite,
  }
  if with_oracle:
    out['oracle_best'], out['oracle_adaptive'] = metrics.oracle_ciou(
        gt, heatmap.shape[-2:], interpolation)
  else:
    out['oracle_best'] = out['oracle_adaptive'] = jnp.full(k.shape, jnp.nan)
  return out


@functools.partial(jax.jit, static_argnames=('thresholds', 'interpolation', 'size',
                                             'with_oracle'))
def batch_records(heatmap, batch, *, thresholds, interpolation, size, with_oracle):
  """Eval batch [B, T, ...] + heatmap [B, T, h, w] -> records [B*T, ...] + `keep`."""
  b, t = heatmap.shape[:2]
  def frame_masks(m):
    if tuple(m.shape[-2:]) != tuple(size):
      # Annotation size differs from the stored masks: nearest keeps the values.
      m = jax.image.resize(m, m.shape[:-2] + tuple(size), 'nearest')
    return m.reshape((b * t,) + tuple(size))
  counts = frame_masks(batch['gt_mask']).astype(jnp.float32)
  if 'gt_votes' in batch:   # weighted GT (Flickr's consensus), kept as weights
    votes = jnp.maximum(batch['gt_votes'].reshape(b * t), 1).astype(jnp.float32)
    gt = jnp.minimum(counts / votes[:, None, None], 1.0)
  else:
    gt = counts > 0          # a bool mask: the fixed-threshold counts pack it
  silent = ((frame_masks(batch['any_mask']) > 0) & (gt == 0)) if 'any_mask' in batch else None
  out = frame_scores(heatmap.astype(jnp.float32).reshape((b * t,) + heatmap.shape[2:]),
                     gt, thresholds=thresholds,
                     interpolation=interpolation, with_oracle=with_oracle, silent=silent,
                     weighted='gt_votes' in batch)
  frame = lambda x: x.reshape((b * t,) + x.shape[2:])
  out['clip_index'] = frame(jnp.broadcast_to(batch['clip_index'][:, None], (b, t)))
  out['frame_index'] = frame(batch['frame_index'])
  out['tags'] = frame(batch['tags'].astype(bool))
  out['cross_event'] = frame(batch['cross_event'].astype(bool))
  out['category'] = (frame(batch['category'].astype(jnp.int32)) if 'category' in batch
                     else jnp.full_like(out['frame_index'], -1, jnp.int32))
  out['keep'] = frame(batch['valid'].astype(bool)[:, None] & batch['ann_valid'].astype(bool))
  return out


def gather(records: dict) -> dict:
  """Every process gets the full table (collective: call it on EVERY process).

  Global (sharded) arrays come back whole; host-local arrays are concatenated
  in process order. Padding rows are dropped with `keep`.
  """
  host = multihost_utils.process_allgather(records, tiled=True)
  keep = np.asarray(host.pop('keep'), bool).reshape(-1)
  return {k: np.asarray(v)[keep] for k, v in host.items()}


def concat_sorted(chunks: list[dict], num_thresholds: int) -> dict:
  """Chunks of gathered records -> one table ordered by (clip, frame)."""
  if not chunks:
    return empty(num_thresholds)
  table = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  order = np.lexsort((table['frame_index'], table['clip_index']))
  return {k: v[order] for k, v in table.items()}


def empty(num_thresholds: int, num_tags: int = 4) -> dict:
  shapes = {'': (0,), 'K': (0, num_thresholds), 'S': (0, num_tags)}
  return {k: np.zeros(shapes[kind], dtype) for k, (dtype, kind) in FIELDS.items()}
