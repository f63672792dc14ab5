"""Plain float64 numpy restatement of metrics.py / aggregates.py, one frame at a time.

Written from the metric definitions stated in metrics.py, not from the jnp
code: loops, slices and sorts the way the peers' evaluators read. Used by the
tests as the independent check and by benchmarks/eval_metrics.py as the
"straightforward per-frame loop" baseline. Every function takes ONE frame
([H, W]) unless it says otherwise.
"""

from __future__ import annotations

import functools
import math

import numpy as np

AUC_THRESHOLDS = [0.05 * i for i in range(21)]
ORACLE_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]


# ---- maps -------------------------------------------------------------------

def normalize(s):
  """Min-max to [0, 1]. As metrics.normalize documents it: a map whose spread
  is at most 16 float32 epsilons of its magnitude is float32 rounding, not a
  peak, and becomes its max everywhere."""
  s = np.asarray(s, np.float64)
  lo, hi = s.min(), s.max()
  if hi - lo <= 16 * np.finfo(np.float32).eps * max(abs(hi), abs(lo)):
    return np.full_like(s, hi)
  return (s - lo) / (hi - lo)


def _triangle(x):
  return np.maximum(0.0, 1.0 - np.abs(x))


def _keys_cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@functools.lru_cache(maxsize=64)   # a pure function of its sizes: build it once
def _weights(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] resampling matrix with half-pixel centres.

  Interpolating kernels (no antialias): output pixel i samples the input at
  (i + 0.5) * n_in / n_out - 0.5; weights outside the image are dropped and
  the rest renormalised (the same as clamping, for the triangle kernel).
  'area': overlap length of output cell [i, i+1) * n_in/n_out with input pixels.
  """
  w = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for i in range(n_out):
    if method == 'nearest':
      w[i, min(int(math.floor((i + 0.5) * scale)), n_in - 1)] = 1.0
      continue
    if method == 'area':
      lo, hi = i * scale, (i + 1) * scale
      for j in range(n_in):
        w[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    else:
      src = (i + 0.5) * scale - 0.5
      kernel = _triangle if method == 'bilinear' else _keys_cubic
      w[i] = kernel(np.arange(n_in) - src)
    w[i] /= w[i].sum()
  w.flags.writeable = False   # cached: nobody may modify it
  return w


def resize(s, size, method='bilinear'):
  s = np.asarray(s, np.float64)
  if s.shape == tuple(size):
    return s.copy()
  return _weights(s.shape[0], size[0], method) @ s @ _weights(s.shape[1], size[1], method).T


# ---- binarisation ------------------------------------------------------------

def avatar_fixed(p, thr):
  return p > thr


def top50(p, strict):
  thr = np.sort(p.ravel())[p.size // 2]
  return p > thr if strict else p >= thr


def adaptive_topk(p, k):
  keep = np.zeros(p.size, bool)
  keep[np.argsort(-p.ravel(), kind='stable')[:int(k)]] = True
  return keep.reshape(p.shape)


def raw_threshold(s, thr):
  return s >= thr


# ---- ground truth ------------------------------------------------------------

def box_union(boxes, height, width):
  """boxes: list of normalised [x0, y0, x1, y1] (VGG-SS)."""
  g = np.zeros((height, width))
  for box in boxes:
    x0, y0, x1, y1 = (int(min(max(float(v), 0.0), 1.0) * n)
                      for v, n in zip(box, (width, height, width, height)))
    g[y0:y1, x0:x1] = 1
  return g


def consensus_map(boxes, size=224, source_size=256):
  """boxes: list of [x0, y0, x1, y1] in `source_size` px (Flickr-SoundNet)."""
  g = np.zeros((size, size))
  for box in boxes:
    x0, y0, x1, y1 = (min(max(int(size * float(v) / source_size), 0), size) for v in box)
    g[y0:y1, x0:x1] += 1
  return np.minimum(g / 2, 1)


# ---- per-frame scores --------------------------------------------------------

def ciou(pred, gt):
  pred = pred.astype(np.float64)
  denom = gt.sum() + (pred * (gt == 0)).sum()
  return float((pred * gt).sum() / denom) if denom > 0 else 0.0


def pointing_hit(s, gt):
  return bool(gt.ravel()[int(np.argmax(s.ravel()))] > 0)


def pointing_offset(s, gt, grid):
  """(dy, dx, near) in model cells: argmax minus GT centroid; GT within a cell."""
  s, gt = np.asarray(s, np.float64), np.asarray(gt) > 0
  h, w = s.shape
  y, x = divmod(int(np.argmax(s.ravel())), w)
  cell_y, cell_x = h / grid[0], w / grid[1]
  if not gt.any():
    return math.nan, math.nan, False
  ys, xs = np.nonzero(gt)
  near = bool(((np.abs(ys - y) <= cell_y) & (np.abs(xs - x) <= cell_x)).any())
  return (y - ys.mean()) / cell_y, (x - xs.mean()) / cell_x, near


def sounding_silent_margin(s, gt, silent):
  """mean(s on the source) - mean(s on the visible silent instances), or NaN."""
  s, gt, silent = (np.asarray(x, np.float64) for x in (s, gt, silent))
  if not (gt > 0).any() or not (silent > 0).any():
    return math.nan
  return float(s[gt > 0].mean() - s[silent > 0].mean())


def confidence(a):
  v = np.sort(np.abs(np.asarray(a, np.float64)).ravel())[::-1]
  return float(v[:max(1, v.size // 4)].mean())


def pia(pred):
  return float(pred.mean())


def oracle(gt, grid, method='bilinear'):
  """(best cIoU over ORACLE_THRESHOLDS, adaptive top-k cIoU) of the grid oracle."""
  gt = np.asarray(gt, np.float64)
  pooled = resize(gt, grid, 'area') if gt.shape != tuple(grid) else gt
  p = normalize(resize(pooled, gt.shape, method))
  best = max(ciou(p > t, gt) for t in ORACLE_THRESHOLDS)
  return best, ciou(adaptive_topk(p, (gt > 0).sum()), gt)


def frame_scores(s, gt, size, thresholds, method='bilinear', abs_threshold=0.5,
                 silent=None):
  """Every per-frame record of the evaluator for one raw map s [h, w];
  `silent` (the visible silent instances' mask) adds 'silent_margin'."""
  up = resize(s, size, method)
  p = normalize(up)
  a = (up + 1) / 2   # the "absolute" map of cosine scores
  out = {
      'ciou': [ciou(avatar_fixed(p, t), gt) for t in thresholds],
      'pia': [pia(avatar_fixed(p, t)) for t in thresholds],
      'ciou_top50_ge': ciou(top50(p, False), gt),
      'ciou_top50_gt': ciou(top50(p, True), gt),
      'ciou_adaptive': ciou(adaptive_topk(p, (gt > 0).sum()), gt),
      'ciou_abs': ciou(raw_threshold(a, abs_threshold), gt),
      'pia_abs': pia(raw_threshold(a, abs_threshold)),
      'hit': pointing_hit(up, gt),
      'min_hit': pointing_hit(-up, gt),
      'raw_max': float(up.max()),
      'raw_mean': float(up.mean()),
      'confidence': confidence(a),
  }
  out['oracle_best'], out['oracle_adaptive'] = oracle(gt, np.shape(s), method)
  out['point_dy'], out['point_dx'], out['hit_1cell'] = pointing_offset(up, gt, np.shape(s))
  if silent is not None:
    out['silent_margin'] = sounding_silent_margin(up, gt, silent)
  return out


# ---- aggregates --------------------------------------------------------------

def auc(cious):
  c = np.asarray(cious, np.float64)
  y = [np.sum(c >= t) / len(c) for t in AUC_THRESHOLDS]
  return float(sum((y[i] + y[i + 1]) / 2 * (AUC_THRESHOLDS[i + 1] - AUC_THRESHOLDS[i])
                   for i in range(20)))


def pia_aoc(pias):
  v = np.asarray(pias, np.float64)
  y = [np.sum(v <= t) / len(v) for t in AUC_THRESHOLDS]
  return float(sum((y[i] + y[i + 1]) / 2 * (AUC_THRESHOLDS[i + 1] - AUC_THRESHOLDS[i])
                   for i in range(20)))


def precision_recall(is_pos, cious, conf, c, ciou_thr=0.5):
  tp = fp = fn = 0
  for pos, ci, cf in zip(is_pos, cious, conf):
    if not pos:
      fp += cf >= c
    elif cf >= c:
      if ci >= ciou_thr:
        tp += 1
      else:
        fp += 1
    else:
      fn += 1
  precision = 1.0 if tp + fp == 0 else tp / (tp + fp)
  recall = 1.0 if tp + fn == 0 else tp / (tp + fn)
  return precision, recall


def slavc_ap(is_pos, cious, conf, ciou_thr=0.5):
  precision, recall = [], []
  for c in np.sort(np.asarray(conf, np.float64))[:-1][::-max(1, len(conf) // 200)]:
    p, r = precision_recall(is_pos, cious, conf, c, ciou_thr)
    precision.append(p)
    recall.append(r)
  best = [max(precision[i:]) for i in range(len(precision))]
  return float(sum(best[i] * (recall[i + 1] - recall[i]) for i in range(len(best) - 1)))


def slavc_max_f1(is_pos, cious, conf, ciou_thr=0.5):
  f1 = []
  for c in sorted(conf)[::max(1, len(conf) // 10)]:
    p, r = precision_recall(is_pos, cious, conf, c, ciou_thr)
    f1.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
  return max(f1)


def calibrate_raw_threshold(onscreen_raw_max, target_tpr):
  """The largest threshold keeping >= target_tpr of on-screen frames positive."""
  v = sorted(float(x) for x in onscreen_raw_max)
  best = v[0]
  for thr in v:
    if sum(x >= thr for x in v) / len(v) >= target_tpr - 1e-12:
      best = thr
  return best


def window_quantile(clip_index, frame_index, values, half_width, q):
  """Per frame, frame by frame: the q-quantile (linear between order
  statistics, as numpy's default) of its clip's values within +-half_width."""
  out = []
  for c, f in zip(clip_index, frame_index):
    near = sorted(float(v) for c2, f2, v in zip(clip_index, frame_index, values)
                  if c2 == c and abs(int(f2) - int(f)) <= half_width)
    pos = q * (len(near) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(near) - 1)
    out.append(near[lo] + (pos - lo) * (near[hi] - near[lo]))
  return out
