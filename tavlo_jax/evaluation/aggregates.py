"""Dataset-level scores from per-frame values: host-side float64 numpy.

Inputs are 1-D arrays over the frames of one pool; outputs are fractions in
[0, 1] (the evaluator turns them into percent). Each function states the
exact rule the field uses (as the peers' evaluators compute it) because off-by-one
choices here (>= vs >, where the thresholds start) move published numbers.
"""

from __future__ import annotations

import math

import numpy as np

# The 21 cIoU thresholds exactly as the peers write them (0.05 * i, so e.g.
# 0.15000000000000002: a cIoU of exactly 0.15 counts below that threshold,
# like in LVS / SLAVC).
AUC_THRESHOLDS = tuple(0.05 * i for i in range(21))
OFFSCREEN_RULES = ('no_pixel_above', 'raw_max', 'peak_window')


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64).reshape(-1)


def mean(values) -> float:
  v = _f64(values)
  return float(v.mean()) if v.size else math.nan


def success_rate(cious, at: float = 0.5) -> float:
  """Fraction of frames with cIoU >= `at` (the classic tables' "cIoU")."""
  v = _f64(cious)
  return float((v >= at).mean()) if v.size else math.nan


def auc(cious) -> float:
  """Trapezoid area under t -> fraction(cIoU >= t) over AUC_THRESHOLDS."""
  v = _f64(cious)
  if not v.size:
    return math.nan
  y = [(v >= t).mean() for t in AUC_THRESHOLDS]
  return float(np.trapezoid(y, AUC_THRESHOLDS))


def pia_aoc(pias) -> float:
  """Negative-audio assessment: area under t -> fraction(pIA <= t); ideal 1."""
  v = _f64(pias)
  if not v.size:
    return math.nan
  y = [(v <= t).mean() for t in AUC_THRESHOLDS]
  return float(np.trapezoid(y, AUC_THRESHOLDS))


def true_negative_rate(predicted_negative) -> float:
  """TN / (TN + FP) over negative (off-screen) frames."""
  v = np.asarray(predicted_negative, bool).reshape(-1)
  return float(v.mean()) if v.size else math.nan


def offscreen_negative(rule: str, *, pia_at_threshold=None, raw_max=None,
                       raw_threshold: float | None = None) -> np.ndarray:
  """Which frames a model calls "nothing here" under a named TN rule.

  'no_pixel_above': no pixel of the min-max-normalised map is above
    heatmap_threshold (pIA == 0). A non-flat normalised map always has a
    pixel at 1, so under this rule only flat maps can be true negatives.
  'raw_max': the raw map's maximum is below a threshold calibrated on
    validation data (`calibrate_raw_threshold`).
  'peak_window': the same test on the map's peak (raw max - raw mean)
    pooled over the clip's neighbouring frames by `window_quantile` (pass
    that score as raw_max).
  """
  if rule == 'no_pixel_above':
    return np.asarray(pia_at_threshold) == 0
  if rule in ('raw_max', 'peak_window'):
    if raw_threshold is None:
      raise ValueError(f'offscreen rule {rule!r} needs a calibrated raw_threshold')
    return np.asarray(raw_max) < raw_threshold
  raise ValueError(f'offscreen rule {rule!r}: expected one of {OFFSCREEN_RULES}')


def window_quantile(clip_index, frame_index, values, half_width: int,
                    q: float) -> np.ndarray:
  """Per frame: the q-quantile (numpy's linear rule) of `values` over the
  frames of the SAME clip whose frame_index is within +-half_width of its own.

  Pools the 'peak_window' off-screen score. Why: a silent look-alike of the
  sound's category can match the sound on one frame by chance, but whether
  ANYTHING in view moves with the sound is a property of a stretch of time;
  a high quantile (not the max) of the neighbours' scores keeps a real
  source's high frames and discounts a look-alike's isolated ones.
  half_width=0 gives the values back.
  """
  clip = np.asarray(clip_index).reshape(-1)
  frame = np.asarray(frame_index).reshape(-1)
  v = _f64(values)
  if not clip.size == frame.size == v.size:
    raise ValueError(f'clip_index, frame_index and values differ in length: '
                     f'{clip.size}, {frame.size}, {v.size}')
  if half_width < 0 or not 0.0 <= q <= 1.0:
    raise ValueError(f'window half_width must be >= 0 and q in [0, 1]; got '
                     f'{half_width}, {q}')
  out = np.empty_like(v)
  if not v.size:
    return out
  order = np.argsort(clip, kind='stable')
  starts = np.flatnonzero(np.r_[True, np.diff(clip[order]) != 0])
  for rows in np.split(order, starts[1:]):
    # [n, n] neighbourhoods of one clip (n = its scored frames, ~30).
    near = np.abs(frame[rows][:, None] - frame[rows][None]) <= half_width
    out[rows] = np.nanquantile(np.where(near, v[rows][None], np.nan), q, axis=1)
  return out


def calibrate_raw_threshold(onscreen_raw_max, target_tpr: float) -> float:
  """Largest-keeping raw threshold such that >= target_tpr of on-screen frames
  stay positive (raw_max >= threshold).

  Sorted ascending, the threshold is element floor((1 - tpr) * M): at most
  that many on-screen frames fall below it.
  """
  v = np.sort(_f64(onscreen_raw_max))
  if not v.size:
    raise ValueError('calibration needs at least one on-screen frame')
  if not 0.0 < target_tpr <= 1.0:
    raise ValueError(f'offscreen_target_tpr must be in (0, 1], got {target_tpr}')
  drop = int(math.floor((1.0 - target_tpr) * v.size + 1e-9))
  return float(v[min(drop, v.size - 1)])


# ---- SLAVC: AP and max-F1 over a per-frame confidence ----------------------

def slavc_counts(is_positive, cious, conf, thresholds, ciou_threshold: float = 0.5):
  """(precision, recall) at each confidence threshold, vectorised.

  A negative with conf >= c is FP; a positive with conf >= c is TP if its
  cIoU >= ciou_threshold else FP; a positive with conf < c is FN. As in
  SLAVC, precision is 1 when nothing is predicted, recall 1 when no positive.
  """
  pos = np.asarray(is_positive, bool).reshape(-1)
  conf = _f64(conf)
  good = pos & (_f64(cious) >= ciou_threshold)
  c = _f64(thresholds)

  def at_or_above(values):  # how many values are >= each threshold
    return values.size - np.searchsorted(np.sort(values), c, side='left')

  tp = at_or_above(conf[good])
  fp = at_or_above(conf[~pos]) + at_or_above(conf[pos & ~good])
  fn = pos.sum() - at_or_above(conf[pos])
  with np.errstate(invalid='ignore', divide='ignore'):
    precision = np.where(tp + fp == 0, 1.0, tp / np.maximum(tp + fp, 1))
    recall = np.where(tp + fn == 0, 1.0, tp / np.maximum(tp + fn, 1))
  return precision, recall


def slavc_ap(is_positive, cious, conf, ciou_threshold: float = 0.5) -> float:
  """SLAVC's AP (not VOC/COCO AP): thresholds = ascending confidences without
  the largest, walked high to low with step max(1, M//200); precision made
  monotone (max over later points); AP = sum P_i (R_{i+1} - R_i), no R=0 anchor.
  """
  conf = _f64(conf)
  if not conf.size:
    return math.nan
  thresholds = np.sort(conf)[:-1][::-max(1, conf.size // 200)]
  precision, recall = slavc_counts(is_positive, cious, conf, thresholds, ciou_threshold)
  monotone = np.maximum.accumulate(precision[::-1])[::-1]
  return float(np.sum(monotone[:-1] * np.diff(recall)))


def slavc_max_f1(is_positive, cious, conf, ciou_threshold: float = 0.5) -> float:
  """Max F1 over thresholds sorted(conf)[::max(1, M//10)] (SLAVC)."""
  conf = _f64(conf)
  if not conf.size:
    return math.nan
  thresholds = np.sort(conf)[::max(1, conf.size // 10)]
  p, r = slavc_counts(is_positive, cious, conf, thresholds, ciou_threshold)
  with np.errstate(invalid='ignore', divide='ignore'):
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
  return float(f1.max())


def negative_aware_f(positive_mean_ciou_pct: float, negative_mean_pia_pct: float) -> float:
  """Harmonic mean of positive mean cIoU and (100 - mean pIA), both in percent."""
  a, b = positive_mean_ciou_pct, 100.0 - negative_mean_pia_pct
  if math.isnan(a) or math.isnan(b):
    return math.nan
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)
