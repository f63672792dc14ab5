r"""TAVLO vs the image-level baseline on AVATAR-Synth, several seeds, one table.

  python launch/compare_synth.py --out=workdirs/compare            # 3 seeds x 2 models
  python launch/compare_synth.py --out=workdirs/compare --seeds=0 --models=tavlo,ezvsl

Each (model, seed) is one run of the main job (`configs/avatar_synth.py:<variant>`),
in `<out>/<model>_seed<k>/`; finished runs are reused, so the script can be
stopped and restarted. Writes `<out>/comparison.md` (mean +- std over seeds per
scenario and metric), `<out>/comparison.json` and `<out>/comparison.png` (bars
per scenario, and the same Multi-entity clip's heat maps for each model).

The `offscreen_hard` row is the hard Off-screen test: TN% over the
Off-screen frames of clips where a silent instance of the sound's own category
is in view (the generator's `same_category` variant; the records do not name
an unseen source's category, so the scene is regenerated from its index), under
the run's own off-screen rule and validation-calibrated threshold (`TN%`), and
under the per-frame raw-max rule (`TN% per frame`).

The `single_in_mixed` row is pointing over the Single-sound frames that come
from Mixed-sound clips (one of the clip's sources sounds at that frame): a
third of the Single-sound frames, and where Single-sound pointing is lost
(docs/research_log.md, "Temporal attention over +-1 frame").
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import subprocess
import sys

from absl import app, flags
import numpy as np

_OUT = flags.DEFINE_string('out', 'workdirs/compare', 'Output directory.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_MODELS = flags.DEFINE_list('models', ['tavlo', 'ezvsl'],
                            'Config variants (tavlo = the default).')
_EXTRA = flags.DEFINE_multi_string('override', [], 'Extra --config.x=y for every run.')
_TRAIN = flags.DEFINE_bool('train', True, 'Train the runs that are missing; with '
                           '--notrain the table uses the finished runs only.')

# (key in eval.json's per-scenario entry, column title)
METRICS = (('pointing_game', 'pointing'), ('pointing_1cell', 'pointing ±1 cell'),
           ('sounding_over_silent', 'sounding>silent'),
           ('ciou', 'mean cIoU@0.1'),
           ('adaptive/mean', 'adaptive mean cIoU'), ('adaptive/success', 'adaptive cIoU>=0.5'),
           ('tn', 'TN%'), ('tn_raw_max', 'TN% per frame'))
SUMMARY_ROWS = ('single', 'mixed', 'multi', 'cross_event', 'offscreen', 'offscreen_hard',
             'single_in_mixed')


def _run_dir(model: str, seed: str) -> str:
  return os.path.join(_OUT.value, f'{model}_seed{seed}')


def _final_eval(run_dir: str) -> dict | None:
  paths = sorted(glob.glob(os.path.join(run_dir, 'eval', 'step_*', 'eval.json')),
                 key=lambda p: int(p.split('step_')[-1].split(os.sep)[0]))
  if not paths:
    return None
  with open(paths[-1]) as f:
    results = json.load(f)
  found = _synth_frames(os.path.dirname(paths[-1]), results)
  if found is None:
    return results
  for scenario, fn in (('offscreen_hard', _hard_offscreen_tn),
                       ('single_in_mixed', _single_in_mixed_clips)):
    extra = fn(*found, results)
    if extra is not None:
      results['scenarios'][scenario] = extra
  return results


@functools.cache
def _scene_variant(builder_config: str, split: str, index: int) -> str:
  from tavlo_datasets.avatar_synth import avatar_synth_dataset_builder as lib  # pylint: disable=g-import-not-at-top
  from tavlo_datasets.avatar_synth import generator  # pylint: disable=g-import-not-at-top
  return generator.make_scene(lib.synth_config(builder_config), split, index).variant


def _synth_frames(eval_dir: str, results: dict):
  """(rows of eval_frames.csv, fn(row, tag, variant) -> bool), or None when
  the run is not on AVATAR-Synth or kept no per-frame table."""
  name, _, builder_config = results.get('dataset', '').partition('/')
  frames = os.path.join(eval_dir, 'eval_frames.csv')
  if name != 'avatar_synth' or not os.path.exists(frames):
    return None
  with open(frames) as f:
    rows = list(csv.DictReader(f))
  is_ = lambda r, tag, variant: tag in r['tags'].split('+') and _scene_variant(
      builder_config, results['split'], int(r['clip_index'])) == variant
  return rows, is_


def _single_in_mixed_clips(rows, is_, results: dict) -> dict | None:
  """{'pointing_game', 'pointing_1cell'} (%) over Single-sound frames of
  Mixed-sound clips (module docstring), or None. rows, is_: _synth_frames."""
  del results  # the same signature as _hard_offscreen_tn
  if not rows or 'hit' not in rows[0]:
    return None
  picked = [r for r in rows if is_(r, 'single', 'mixed')]
  if not picked:
    return None
  mean = lambda key: 100 * float(np.mean([float(r[key]) for r in picked]))
  return {'pointing_game': mean('hit'), 'pointing_1cell': mean('hit_1cell')}


def _hard_offscreen_tn(rows, is_, results: dict) -> dict | None:
  """{'tn', 'tn_raw_max'} on `same_category` Off-screen frames (module
  docstring), or None: 'tn' under the run's rule, 'tn_raw_max' per frame.
  rows, is_: _synth_frames."""
  settings = results['settings']
  calib = settings.get('calibration') or {}
  if 'raw_threshold' not in calib:
    return None
  from tavlo_jax.evaluation import aggregates, evaluator  # pylint: disable=g-import-not-at-top
  col = lambda key, kind: np.array([kind(r[key]) for r in rows])
  raw = col('raw_max', float)
  hard = np.array([is_(r, 'offscreen', 'same_category') for r in rows], bool)
  if not hard.any():
    return None
  tn = lambda rule, score, thr: 100 * aggregates.true_negative_rate(
      aggregates.offscreen_negative(rule, raw_max=score[hard], raw_threshold=thr))
  out = {'tn_raw_max': tn('raw_max', raw, calib['raw_threshold'])}
  out['tn'] = out['tn_raw_max']
  if settings.get('offscreen_rule') == 'peak_window' and 'window_threshold' in calib:
    # The window pools each frame with ALL its clip's scored frames (as the
    # evaluator does), so it is computed over every row before selecting.
    table = {'clip_index': col('clip_index', int), 'frame_index': col('frame_index', int),
             'raw_max': raw, 'raw_mean': col('raw_mean', float)}
    windowed = evaluator.peak_window(table, (settings['offscreen_window_half_width'],
                                             settings['offscreen_window_quantile']))
    out['tn'] = tn('peak_window', windowed, calib['window_threshold'])
  return out


def _train(model: str, seed: str) -> None:
  variant = f'seed={seed}' if model == 'tavlo' else f'{model}+seed={seed}'
  cmd = [sys.executable, '-m', 'tavlo_jax.main',
         f'--config=configs/avatar_synth.py:{variant}',
         f'--workdir={_run_dir(model, seed)}', *[f'--config.{o}' for o in _EXTRA.value]]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def _value(results: dict, scenario: str, metric: str):
  v = results['scenarios'].get(scenario, {}).get(metric)
  if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
    return float(v)
  return None


def _table(all_results: dict) -> tuple[str, dict]:
  summary = {}
  lines = ['| model | scenario | ' + ' | '.join(n for _, n in METRICS) + ' |',
           '|---|---|' + '---|' * len(METRICS)]
  for model, runs in all_results.items():
    for scenario in SUMMARY_ROWS:
      cells = []
      for key, _ in METRICS:
        vals = [v for v in (_value(r, scenario, key) for r in runs) if v is not None]
        if vals:
          mean, std = float(np.mean(vals)), float(np.std(vals))
          summary.setdefault(model, {}).setdefault(scenario, {})[key] = {
              'mean': mean, 'std': std, 'n': len(vals)}
          cells.append(f'{mean:.1f} +- {std:.1f}')
        else:
          cells.append('-')
      lines.append(f'| {model} | {scenario} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n', summary


def _figure(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  models = list(summary)
  overlays = []
  for model in models:
    pngs = sorted(glob.glob(os.path.join(_run_dir(model, _SEEDS.value[0]), 'eval',
                                         'step_*', 'overlays', 'multi_*.png')))
    overlays.append(pngs[0] if pngs else None)
  fig = plt.figure(figsize=(12, 3.2 + 1.6 * len(models)))
  ax = fig.add_axes([0.07, 0.55, 0.9, 0.38])
  width = 0.8 / max(len(models), 1)
  scen = [s for s in SUMMARY_ROWS if not s.startswith('offscreen')]   # TN: no pointing
  for i, model in enumerate(models):
    means = [summary[model].get(s, {}).get('pointing_game', {}).get('mean', 0) for s in scen]
    stds = [summary[model].get(s, {}).get('pointing_game', {}).get('std', 0) for s in scen]
    ax.bar(np.arange(len(scen)) + i * width, means, width, yerr=stds, label=model)
  ax.set_xticks(np.arange(len(scen)) + width * (len(models) - 1) / 2, scen)
  ax.set_ylabel('pointing game (%)')
  ax.set_ylim(0, 100)
  ax.legend()
  for i, (model, png) in enumerate(zip(models, overlays)):
    if png is None:
      continue
    sub = fig.add_axes([0.02, 0.5 - (i + 1) * 0.5 / len(models), 0.96, 0.45 / len(models)])
    sub.imshow(np.asarray(Image.open(png)))
    sub.set_title(f'{model}: {os.path.basename(png)} (top: frames, bottom: heat map; '
                  'cyan = sounding object)', fontsize=8)
    sub.axis('off')
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  all_results, seeds = {}, {}
  for model in _MODELS.value:
    for seed in _SEEDS.value:
      results = _final_eval(_run_dir(model, seed))
      if results is None:
        if not _TRAIN.value:
          print(f'{model} seed {seed}: no finished run in {_run_dir(model, seed)}; left out')
          continue
        _train(model, seed)
        results = _final_eval(_run_dir(model, seed))
      all_results.setdefault(model, []).append(results)
      seeds.setdefault(model, []).append(seed)
  if not all_results:
    raise app.UsageError(f'no finished run under {_OUT.value} and --notrain')
  text, summary = _table(all_results)
  used = '; '.join(f'{m} {",".join(s)}' for m, s in seeds.items())
  header = (f'AVATAR-Synth test split, seeds {used} '
            f'(mean +- std over seeds), all numbers in percent\n\n')
  with open(os.path.join(_OUT.value, 'comparison.md'), 'w') as f:
    f.write(header + text)
  with open(os.path.join(_OUT.value, 'comparison.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  _figure(summary, os.path.join(_OUT.value, 'comparison.png'))
  print(header + text)


if __name__ == '__main__':
  app.run(main)
