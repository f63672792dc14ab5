"""The evaluation loop's bookkeeping: add batches, pool per scenario, score.

    evaluator = Evaluator(config)                  # config.eval + config.evals
    for batch, heatmap in ...:                     # heatmap [B, T, h, w], cosine
      evaluator.add(batch, heatmap)                # on EVERY process
    results = evaluator.finalize(calibration)      # same dict on every process

`calibration` comes from a validation pass (`evaluator.calibrate()` there, or
`calibrate(records, ...)`); it is only needed by the 'raw_max' and
'peak_window' off-screen rules, and holds both rules' thresholds. All scores
in `results` are in percent; every choice that moves them (thresholds, tie
rule, interpolation, TN rule, calibration) is recorded in
`results['settings']`.

Pools: `config.evals[name].frames` selects the frames ('single', 'mixed',
'multi', 'offscreen' by tag, 'cross_event' by flag, 'all'). Within a pool,
on-screen frames (tagged single/mixed/multi) get the localization scores and
off-screen frames (tagged offscreen) the negative scores; a frame carrying
both kinds of tag counts in both.

`results['per_category']` breaks the pointing game down by the category of
the sounding source (records' `category`: on-screen frames whose sounding
instances share one known category), so a category the model never learned
shows up in every report.

`sounding_over_silent` (per pool) asks whether the map prefers the source to
the visible silent instances; on Multi-entity those are identical twins, so it
measures whether the model uses timing (chance 50%), which the pointing game
mixes with finding the category at all.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging

from tavlo_datasets.schema import SCENARIOS
from tavlo_jax.data import pipeline
from tavlo_jax.evaluation import aggregates, metrics, records as records_lib

POOL_FRAMES = ('single', 'mixed', 'multi', 'offscreen', 'cross_event', 'all')
PROTOCOLS = ('avatar', 'classic')
SIGN_MARGIN_PCT = 10.0


def _key(t: float) -> str:
  return f'{t:g}'


class Evaluator:
  """Per-frame records from eval batches; pooled scores at the end.

  `mesh` (Auto axis types, as tavlo_jax.sharding.make_mesh builds) is used
  only on several processes to assemble host-local numpy rows into global
  arrays; batches that are already global jax.Arrays are used as they are,
  and host-local arrays without a mesh are scored per process and gathered.
  `category_names` (index = category) only labels `results['per_category']`.
  `eval_names`: the `config.evals` entries to pool (None = all of them);
  `interpolation` overrides config.eval.interpolation (runner.eval_groups).
  """

  def __init__(self, config, *, protocol: str = 'avatar', mesh=None,
               batch_axes=('data', 'fsdp'), with_oracle: bool = True,
               category_names=None, eval_names=None, interpolation: str | None = None):
    if protocol not in PROTOCOLS:
      raise ValueError(f'protocol {protocol!r}: expected one of {PROTOCOLS}')
    ec = config.eval
    self.protocol = protocol
    self.thresholds = tuple(float(t) for t in ec.heatmap_thresholds)
    self.headline_threshold = float(ec.heatmap_threshold)
    if self.headline_threshold not in self.thresholds:
      raise ValueError(f'config.eval.heatmap_threshold={self.headline_threshold} '
                       f'must be one of heatmap_thresholds={self.thresholds}')
    interpolation = interpolation or ec.interpolation
    if interpolation not in metrics.INTERPOLATIONS:
      raise ValueError(f'interpolation={interpolation!r} (config.eval or config.evals): '
                       f'expected one of {metrics.INTERPOLATIONS}')
    if ec.offscreen_rule not in aggregates.OFFSCREEN_RULES:
      raise ValueError(f'config.eval.offscreen_rule={ec.offscreen_rule!r}: '
                       f'expected one of {aggregates.OFFSCREEN_RULES}')
    self.interpolation = interpolation
    self.annotation_size = tuple(int(v) for v in ec.annotation_size)
    self.offscreen_rule = ec.offscreen_rule
    self.target_tpr = float(ec.offscreen_target_tpr)
    self.window = (int(ec.offscreen_window), float(ec.offscreen_window_quantile))
    if self.window[0] < 0 or not 0.0 <= self.window[1] <= 1.0:
      raise ValueError(f'config.eval.offscreen_window={ec.offscreen_window} must be >= 0 '
                       '(frames on each side) and config.eval.offscreen_window_quantile='
                       f'{ec.offscreen_window_quantile} in [0, 1]')
    self.pools = {}
    for name, entry in config.evals.items():
      if eval_names is not None and name not in eval_names:
        continue   # an entry scored on another dataset (runner.eval_groups)
      if entry.frames not in POOL_FRAMES:
        raise ValueError(f'config.evals.{name}.frames={entry.frames!r}: '
                         f'expected one of {POOL_FRAMES}')
      self.pools[name] = {'frames': entry.frames, 'prefix': entry.prefix}
    # Table order: the scenarios as AVATAR lists them, then cross-event, then all.
    self.pools = dict(sorted(self.pools.items(),
                             key=lambda kv: (POOL_FRAMES.index(kv[1]['frames']), kv[0])))
    self.mesh = mesh
    self.batch_axes = batch_axes
    self.with_oracle = with_oracle
    self.category_names = None if category_names is None else [str(n) for n in category_names]
    self._chunks: list[dict] = []
    self._grid = None

  # ---- accumulation ----------------------------------------------------------

  def add(self, batch: dict, heatmap) -> None:
    """Scores one eval batch (collective: call on every process, same count)."""
    missing = [k for k in records_lib.BATCH_KEYS if k not in batch]
    if missing:
      raise KeyError(f'eval batch lacks {missing}; has {sorted(batch)}')
    fields = {k: batch[k] for k in records_lib.BATCH_KEYS + records_lib.OPTIONAL_BATCH_KEYS
              if k in batch}
    b, t = np.shape(fields['ann_valid'])
    if np.ndim(heatmap) != 4 or tuple(np.shape(heatmap)[:2]) != (b, t):
      raise ValueError(f'heatmap must be [B, T, h, w] = [{b}, {t}, h, w] like the '
                       f'batch, got shape {np.shape(heatmap)}')
    if self.mesh is not None and jax.process_count() > 1:
      # Host-local rows -> one global batch (no-op for arrays already global).
      fields, heatmap = pipeline.make_global_batch((fields, heatmap), self.mesh,
                                                   self.batch_axes)
    mask_size = tuple(np.shape(fields['gt_mask'])[-2:])
    size = self.annotation_size if all(self.annotation_size) else mask_size
    self._grid = tuple(np.shape(heatmap)[-2:])
    out = records_lib.batch_records(
        heatmap, fields, thresholds=self.thresholds, interpolation=self.interpolation,
        size=size, with_oracle=self.with_oracle)
    chunk = records_lib.gather(out)
    bad = ~chunk['finite']
    if bad.any():
      where = [(int(c), int(f)) for c, f in zip(chunk['clip_index'][bad][:5],
                                                chunk['frame_index'][bad][:5])]
      raise ValueError(f'heat map has NaN/Inf at (clip_index, frame_index) {where}'
                       f'{" ..." if bad.sum() > 5 else ""}')
    self._chunks.append(chunk)

  def records(self) -> dict[str, np.ndarray]:
    """All per-frame records so far, ordered by (clip_index, frame_index)."""
    table = records_lib.concat_sorted(self._chunks, len(self.thresholds))
    ids = np.stack([table['clip_index'], table['frame_index']], 1)
    if len(ids) and (np.diff(ids, axis=0) == 0).all(axis=1).any():
      logging.warning('some (clip_index, frame_index) were scored more than once')
    return table

  def calibrate(self) -> dict:
    """Off-screen thresholds from the records so far (use on VALIDATION)."""
    return calibrate(self.records(), self.target_tpr, self.window, self.offscreen_rule)

  def settings(self, calibration: dict | None) -> dict:
    return settings(self, calibration)

  def finalize(self, calibration: dict | None = None) -> dict:
    return score(self.records(), self, calibration)


# ---- scoring -------------------------------------------------------------------

def onscreen_mask(table) -> np.ndarray:
  return table['tags'][:, :3].any(axis=1)


def offscreen_mask(table) -> np.ndarray:
  return table['tags'][:, 3]


def pool_mask(table, frames: str) -> np.ndarray:
  if frames == 'all':
    return np.ones(len(table['clip_index']), bool)
  if frames == 'cross_event':
    return table['cross_event'].astype(bool)
  return table['tags'][:, SCENARIOS.index(frames)]


def peak_window(table, window: tuple[int, float]) -> np.ndarray:
  """The 'peak_window' off-screen score of every frame.

  The map's peak, raw max - raw mean: the statistic the loss pools
  (config.loss positives/negatives 'peak'), which leaves the map's level
  free, so the raw max alone carries a level the training never set. Pooled
  by window = (half_width, quantile) over the clip's scored frames.
  """
  peak = np.asarray(table['raw_max'], np.float64) - table['raw_mean']
  return aggregates.window_quantile(table['clip_index'], table['frame_index'],
                                    peak, *window)


def calibrate(table, target_tpr: float, window: tuple[int, float] = (0, 1.0),
              rule: str = 'raw_max') -> dict:
  """Thresholds keeping target_tpr of on-screen frames: 'raw_threshold' on the
  frame's raw max ('raw_max' rule) and 'window_threshold' on its pooled peak
  ('peak_window' rule); `rule` (the one the run reports) is recorded."""
  on = onscreen_mask(table)
  raw_max = table['raw_max'][on]
  windowed = peak_window(table, window)[on]
  thr = aggregates.calibrate_raw_threshold(raw_max, target_tpr)
  window_thr = aggregates.calibrate_raw_threshold(windowed, target_tpr)
  return {'rule': rule, 'raw_threshold': thr, 'target_tpr': target_tpr,
          'achieved_tpr': float((raw_max >= thr).mean()),
          'window_threshold': window_thr,
          'window': {'half_width_frames': int(window[0]), 'quantile': float(window[1])},
          'window_achieved_tpr': float((windowed >= window_thr).mean()),
          'num_onscreen_frames': int(raw_max.size)}


def map_sign_report(table, margin_pct: float = SIGN_MARGIN_PCT) -> dict:
  """Does the map point at the source with its MAXIMUM or its MINIMUM?

  Max-MIL training does not fix the sign of the map (losses.py); a
  map whose argmin hits the source more often than its argmax (by more than
  margin_pct points) is flagged inverted.
  """
  on = onscreen_mask(table)
  max_pct = 100 * aggregates.mean(table['hit'][on])
  min_pct = 100 * aggregates.mean(table['min_hit'][on])
  inverted = bool(on.any() and min_pct - max_pct > margin_pct)
  return {'num_frames': int(on.sum()), 'max_pointing': max_pct,
          'min_pointing': min_pct, 'margin': margin_pct, 'inverted': inverted}


def settings(ev: Evaluator, calibration: dict | None) -> dict:
  return {
      'protocol': ev.protocol,
      'units': 'percent (thresholds and raw scores excepted)',
      'heatmap_thresholds': list(ev.thresholds),
      'heatmap_threshold': ev.headline_threshold,
      'headline': ('mean cIoU, cIoU>=0.5 rate and AUC of p > heatmap_threshold'
                   if ev.protocol == 'avatar' else
                   'cIoU>=0.5 rate, mean cIoU and AUC of the top-50% rule (>=)'),
      'normalisation': 'per-frame min-max; a flat map is left unchanged',
      'interpolation': ev.interpolation,
      'resize': ("torch's bicubic (a=-0.75), align_corners=True" if ev.interpolation ==
                 'bicubic_torch' else 'jax.image.resize, half-pixel centres, no antialias'),
      'annotation_size': list(ev.annotation_size) if all(ev.annotation_size) else 'mask size',
      'model_grid': list(ev._grid) if ev._grid else None,
      'top50': {'ge': 'p >= sorted(p)[N//2]', 'gt': 'p > sorted(p)[N//2]'},
      'adaptive': 'exactly k = #GT pixels top pixels, ties by lower index',
      'absolute_map': '(cos + 1) / 2', 'abs_threshold': records_lib.ABS_THRESHOLD,
      'confidence': 'mean of the top N//4 pixels of |(cos + 1) / 2|',
      'pointing_game': 'first argmax of the upsampled map on a GT pixel',
      'sounding_over_silent': ('frames with a visible silent instance whose upsampled map '
                               'has a higher mean on the sounding pixels than on the '
                               'silent ones'),
      'auc_thresholds': list(aggregates.AUC_THRESHOLDS),
      'success_at': 0.5,
      'oracle': ('GT area-averaged to the model grid, upsampled with the same '
                 'interpolation, normalised; best cIoU over thresholds '
                 f'{list(metrics.ORACLE_THRESHOLDS)} (and adaptive top-k)'),
      'onscreen_frames': 'tagged single, mixed or multi',
      'offscreen_frames': 'tagged offscreen',
      'offscreen_rule': ev.offscreen_rule,
      'offscreen_target_tpr': ev.target_tpr,
      'offscreen_window': ("peak_window: the q-quantile of the map's peak (raw max "
                           "- raw mean) over the clip's scored frames within "
                           '+-half_width frames'),
      'offscreen_window_half_width': ev.window[0],
      'offscreen_window_quantile': ev.window[1],
      'calibration': calibration,
      'slavc': ('AP/max-F1 over on-screen (positive) and off-screen (negative) '
                'frames of the pool; TP needs the headline cIoU >= 0.5'),
      'negative_aware_f': 'harmonic mean of mean cIoU_abs and 100 - mean pIA_abs',
  }


def _binarised_scores(cious) -> dict:
  return {'mean': 100 * aggregates.mean(cious),
          'success': 100 * aggregates.success_rate(cious),
          'auc': 100 * aggregates.auc(cious)}


def pool_scores(table, select, ev: Evaluator, calibration: dict | None,
                windowed: np.ndarray) -> dict:
  """Scores of one pool of frames (a boolean mask over the table).

  windowed: `peak_window(table, ev.window)` (computed once per table; the
  pool's frames are windowed with ALL the clip's scored frames, not the pool's).
  """
  on, off = select & onscreen_mask(table), select & offscreen_mask(table)
  out: dict[str, Any] = {'num_onscreen': int(on.sum()), 'num_offscreen': int(off.sum())}
  head_k = ev.thresholds.index(ev.headline_threshold)
  if ev.protocol == 'avatar':
    head_ciou = table['ciou'][:, head_k]
  else:
    head_ciou = table['ciou_top50_ge']
  head = _binarised_scores(head_ciou[on])
  out.update(ciou=head['mean'], success=head['success'], auc=head['auc'],
             pointing_game=100 * aggregates.mean(table['hit'][on]),
             # The argmax within one model cell of the source: a miss counted
             # here is a peak NEXT to the right object, not on a wrong one.
             pointing_1cell=100 * aggregates.mean(table['hit_1cell'][on]),
             min_pointing=100 * aggregates.mean(table['min_hit'][on]))
  # Sounding over silent: frames with a visible silent instance where the map
  # is higher on the source (on Multi-entity only timing can do it; chance 50%).
  margin = table['silent_margin'][on]
  margin = margin[np.isfinite(margin)]
  out['num_silent_frames'] = int(margin.size)
  out['sounding_over_silent'] = 100 * aggregates.mean(margin > 0)
  for k, t in enumerate(ev.thresholds):
    for name, v in _binarised_scores(table['ciou'][on, k]).items():
      out[f'fixed@{_key(t)}/{name}'] = v
  for variant in ('top50_ge', 'top50_gt', 'adaptive', 'abs'):
    for name, v in _binarised_scores(table[f'ciou_{variant}'][on]).items():
      out[f'{variant}/{name}'] = v
  out['oracle/best'] = 100 * aggregates.mean(table['oracle_best'][on])
  out['oracle/adaptive'] = 100 * aggregates.mean(table['oracle_adaptive'][on])

  # Negatives.
  for k, t in enumerate(ev.thresholds):
    neg = aggregates.offscreen_negative('no_pixel_above', pia_at_threshold=table['pia'][off, k])
    out[f'tn_no_pixel_above@{_key(t)}'] = 100 * aggregates.true_negative_rate(neg)
    out[f'pia@{_key(t)}'] = 100 * aggregates.mean(table['pia'][off, k])
    out[f'pia_aoc@{_key(t)}'] = 100 * aggregates.pia_aoc(table['pia'][off, k])
  out['pia_abs'] = 100 * aggregates.mean(table['pia_abs'][off])
  out['pia_abs_aoc'] = 100 * aggregates.pia_aoc(table['pia_abs'][off])
  raw_thr = calibration['raw_threshold'] if calibration else None
  out['tn_raw_max'] = (100 * aggregates.true_negative_rate(aggregates.offscreen_negative(
      'raw_max', raw_max=table['raw_max'][off], raw_threshold=raw_thr))
                       if raw_thr is not None else math.nan)
  window_thr = calibration.get('window_threshold') if calibration else None
  out['tn_peak_window'] = (100 * aggregates.true_negative_rate(aggregates.offscreen_negative(
      'peak_window', raw_max=windowed[off], raw_threshold=window_thr))
                              if window_thr is not None else math.nan)
  half_width, q = ev.window
  if ev.offscreen_rule == 'no_pixel_above':
    out['tn'] = out[f'tn_no_pixel_above@{_key(ev.headline_threshold)}']
    out['tn_rule'] = f'no_pixel_above@{_key(ev.headline_threshold)}'
  elif ev.offscreen_rule == 'raw_max':
    out['tn'] = out['tn_raw_max']
    out['tn_rule'] = (f'raw_max<{raw_thr:.6g}' if raw_thr is not None else
                      'raw_max (not calibrated)')
  else:
    out['tn'] = out['tn_peak_window']
    out['tn_rule'] = (f'q{q:g} of peak over +-{half_width} frames<{window_thr:.6g}'
                      if window_thr is not None else 'peak_window (not calibrated)')

  # SLAVC AP / max-F1 over the pool's positives and negatives.
  both = on | off
  if on.any():
    args = (on[both], head_ciou[both], table['confidence'][both])
    out['ap'] = 100 * aggregates.slavc_ap(*args)
    out['max_f1'] = 100 * aggregates.slavc_max_f1(*args)
  else:
    out['ap'] = out['max_f1'] = math.nan
  out['negative_aware_f'] = aggregates.negative_aware_f(out['abs/mean'], out['pia_abs'])
  return out


def category_scores(table, names=None) -> dict[int, dict]:
  """{category: pointing game} over the on-screen frames of each category >= 0.

  'pointing_game' pools all its on-screen frames, 'single' / 'multi' those
  tagged so (NaN when there are none); percent, like every score, except
  'offset_dy' / 'offset_dx': the mean argmax-minus-source offset in cells.
  """
  on = onscreen_mask(table)
  out = {}
  for c in np.unique(table['category'][on & (table['category'] >= 0)]):
    mine = on & (table['category'] == c)
    entry = {'num_frames': int(mine.sum()),
             'pointing_game': 100 * aggregates.mean(table['hit'][mine]),
             'pointing_1cell': 100 * aggregates.mean(table['hit_1cell'][mine])}
    # Mean argmax offset from the source's centroid, in model cells: a
    # category whose peak sits at a fixed side of its object shows here.
    for axis in ('dy', 'dx'):
      v = table[f'point_{axis}'][mine]
      entry[f'offset_{axis}'] = aggregates.mean(v[np.isfinite(v)])
    for frames in ('single', 'multi'):
      entry[frames] = 100 * aggregates.mean(table['hit'][mine & pool_mask(table, frames)])
    if names is not None and c < len(names):
      entry['name'] = names[c]
    out[int(c)] = entry
  return out


def score(table, ev: Evaluator, calibration: dict | None = None) -> dict:
  """Pooled results per `config.evals` entry and per sounding category, plus
  settings and the sign check."""
  scenarios = {}
  windowed = peak_window(table, ev.window)
  for name, pool in ev.pools.items():
    scores = pool_scores(table, pool_mask(table, pool['frames']), ev, calibration, windowed)
    scenarios[name] = {'frames': pool['frames'], 'prefix': pool['prefix'], **scores}
  return {'settings': settings(ev, calibration), 'scenarios': scenarios,
          'per_category': category_scores(table, ev.category_names),
          'map_sign': map_sign_report(table), 'num_frames': int(len(table['clip_index']))}


def scalar_metrics(results: dict) -> dict[str, float]:
  """{prefix + name: value} of every finite number, for TensorBoard; plus
  eval/per_category/<category>/pointing_game."""
  out = {}
  for entry in results['scenarios'].values():
    for k, v in entry.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        out[entry['prefix'] + k] = float(v)
  for c, entry in results.get('per_category', {}).items():   # each has frames: finite
    out[f'eval/per_category/{c}/pointing_game'] = float(entry['pointing_game'])
  return out
