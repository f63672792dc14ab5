"""Writes an evaluation to a directory: JSON, a Markdown table, a per-frame CSV.

    write(out_dir, results, table, frame_name=None, name='eval')
      -> {out_dir}/{name}.json   every number plus every threshold choice
         {out_dir}/{name}.md     the per-scenario and per-category tables (format_table)
         {out_dir}/{name}_frames.csv   one row per scored frame

Only process 0 should call `write` (results are identical on every process).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Callable

import numpy as np

from tavlo_datasets.schema import SCENARIOS
from tavlo_jax.evaluation import published, records as records_lib


def _clean(x):
  """JSON-safe: NaN -> None, numpy -> python."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _fmt(v, digits: int = 2) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return '-'
  return f'{v:.{digits}f}'


def format_table(results: dict) -> str:
  """Markdown: one row per scenario, the headline numbers, choices underneath."""
  s = results['settings']
  t = f"{s['heatmap_threshold']:g}"
  head = (f'mean cIoU@{t}', f'AUC@{t}', f'cIoU@{t}>=0.5') if s['protocol'] == 'avatar' else (
      'mean cIoU top50', 'AUC top50', 'cIoU top50>=0.5')
  cols = ['scenario', 'on/off frames', 'pointing', 'pointing ±1 cell', 'sounding>silent', *head,
          'adaptive mean',
          'adaptive >=0.5', 'oracle', 'TN%', 'AP', 'max-F1']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for name, r in results['scenarios'].items():
    row = [name, f"{r['num_onscreen']}/{r['num_offscreen']}", _fmt(r['pointing_game']),
           _fmt(r.get('pointing_1cell')), _fmt(r.get('sounding_over_silent')),
           _fmt(r['ciou']), _fmt(r['auc']), _fmt(r['success']),
           _fmt(r['adaptive/mean']), _fmt(r['adaptive/success']), _fmt(r['oracle/best']),
           _fmt(r['tn']), _fmt(r['ap']), _fmt(r['max_f1'])]
    lines.append('| ' + ' | '.join(row) + ' |')
  rule = next(iter(results['scenarios'].values()), {}).get('tn_rule', s['offscreen_rule'])
  if s['offscreen_rule'] == 'peak_window':
    # The per-frame raw-max rule beside it, so the two stay comparable.
    per_frame = [f"{name} {_fmt(r.get('tn_raw_max'))}" for name, r in results['scenarios'].items()
                 if r.get('num_offscreen')]
    recall = 100 * s['offscreen_target_tpr']
    rule += (f" (per-frame raw max at {recall:g}% on-screen recall: "
             f"{', '.join(per_frame)})")
  sign = results.get('map_sign', {})
  binarisation = (f"normalised map > {t} (thresholds {s['heatmap_thresholds']} in the JSON)"
                  if s['protocol'] == 'avatar' else
                  f"top 50%, ties kept: {s['top50']['ge']} (the '>' rule is top50_gt in "
                  "the JSON); GT weights kept (Flickr consensus 0.5 / 1)")
  lines += [
      '',
      f"protocol={s['protocol']}; binarisation: {binarisation}; "
      f"interpolation={s['interpolation']}; "
      f"model grid={s['model_grid']}; annotation size={s['annotation_size']}.",
      f'TN% rule: {rule}. Oracle: best cIoU of the GT average-pooled to the model grid. '
      'AP/max-F1: SLAVC definitions over on-screen (positive) and off-screen frames. '
      'sounding>silent: frames with a visible silent instance where the map is higher on '
      'the source than on the silent ones (Multi-entity: identical twins, chance 50%, only '
      'timing helps). pointing ±1 cell: the argmax within one model cell of a source '
      'pixel. All numbers in percent.',
  ]
  if sign:
    lines.append(f"Map sign: argmax on source {_fmt(sign['max_pointing'])}%, argmin on source "
                 f"{_fmt(sign['min_pointing'])}%" + (' -- INVERTED MAP?' if sign['inverted'] else ''))
  if s['protocol'] == 'classic' and results.get('dataset'):
    for r in results['scenarios'].values():
      lines += published.comparison_lines(results['dataset'], results.get('split', ''), r)
  lines += format_category_table(results.get('per_category', {}))
  return '\n'.join(lines) + '\n'


def format_category_table(per_category: dict) -> list[str]:
  """Lines of the per-category pointing table and its worst row (none if empty)."""
  if not per_category:
    return []
  rows = sorted(per_category.items(), key=lambda kv: int(kv[0]))
  label = lambda c, r: f"{r['name']} ({c})" if 'name' in r else str(c)
  lines = ['', 'Pointing game per sounding category (on-screen frames with one sounding '
           'category; offset: mean argmax minus source centroid, in model cells)', '',
           '| category | frames | all | single | multi | ±1 cell | offset (dy, dx) |',
           '|---|---|---|---|---|---|---|']
  for c, r in rows:
    offset = (f"{_fmt(r.get('offset_dy'), 2)}, {_fmt(r.get('offset_dx'), 2)}"
              if 'offset_dy' in r else '-')
    lines.append(f"| {label(c, r)} | {r['num_frames']} | {_fmt(r['pointing_game'])} | "
                 f"{_fmt(r['single'])} | {_fmt(r['multi'])} | "
                 f"{_fmt(r.get('pointing_1cell'))} | {offset} |")
  c, r = min(rows, key=lambda kv: kv[1]['pointing_game'])
  lines += ['', f"Worst category: {label(c, r)}, pointing {_fmt(r['pointing_game'])}% "
            f"over {r['num_frames']} frames."]
  return lines


def default_frame_name(clip_index: int, frame_index: int) -> str:
  return f'clip{clip_index}/frame{frame_index}'


def write_frames_csv(path: str, table: dict, frame_name: Callable | None = None,
                     thresholds=()) -> None:
  frame_name = frame_name or default_frame_name
  k_names = [f'ciou@{t:g}' for t in thresholds] or [
      f'ciou@{i}' for i in range(table['ciou'].shape[1])]
  scalar = [k for k, (_, kind) in records_lib.FIELDS.items()
            if kind == '' and k not in ('clip_index', 'frame_index', 'finite')]
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['frame_id', 'clip_index', 'frame_index', 'tags', *k_names,
                *[n.replace('ciou', 'pia') for n in k_names], *scalar])
    for i in range(len(table['clip_index'])):
      c, fr = int(table['clip_index'][i]), int(table['frame_index'][i])
      tags = '+'.join(t for t, on in zip(SCENARIOS, table['tags'][i]) if on)
      w.writerow([frame_name(c, fr), c, fr, tags,
                  *[f'{v:.6g}' for v in table['ciou'][i]],
                  *[f'{v:.6g}' for v in table['pia'][i]],
                  *[f'{float(table[k][i]):.6g}' if table[k].dtype.kind == 'f'
                    else int(table[k][i]) for k in scalar]])


def write(out_dir: str, results: dict, table: dict, frame_name: Callable | None = None,
          name: str = 'eval') -> dict[str, str]:
  """Writes JSON, Markdown and CSV; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'json': os.path.join(out_dir, f'{name}.json'),
           'markdown': os.path.join(out_dir, f'{name}.md'),
           'csv': os.path.join(out_dir, f'{name}_frames.csv')}
  with open(paths['json'], 'w') as f:
    json.dump(_clean(results), f, indent=1, sort_keys=False)
  with open(paths['markdown'], 'w') as f:
    f.write(format_table(results))
  write_frames_csv(paths['csv'], table, frame_name, results['settings']['heatmap_thresholds'])
  return paths
