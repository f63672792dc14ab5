"""launch/compare_synth.py --notrain on hand-made finished runs: the table's
mean +- std, and the hard Off-screen TN row from regenerated scenes."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tavlo_datasets.avatar_synth import avatar_synth_dataset_builder as lib
from tavlo_datasets.avatar_synth import generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variants(split='test'):
  cfg = lib.synth_config('tiny')
  return {i: generator.make_scene(cfg, split, i).variant for i in range(cfg.num_test)}


def _write_run(run_dir, pointing, threshold, rows, settings=None, hits=None):
  """rows: (clip, tags, raw_max) with frame_index = row number, or
  (clip, tags, raw_max, frame_index); raw_mean is raw_max - 0.1 (peak 0.1)
  unless a fifth entry gives it. hits: optional (hit, hit_1cell) per row."""
  out = os.path.join(run_dir, 'eval', 'step_3')
  os.makedirs(out)
  results = {'settings': {'calibration': {'raw_threshold': threshold}, **(settings or {})},
             'scenarios': {'single': {'pointing_game': pointing},
                           'offscreen': {'tn': 50.0}},
             'dataset': 'avatar_synth/tiny', 'split': 'test'}
  with open(os.path.join(out, 'eval.json'), 'w') as f:
    json.dump(results, f)
  with open(os.path.join(out, 'eval_frames.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['frame_id', 'clip_index', 'frame_index', 'tags', 'raw_max', 'raw_mean']
               + (['hit', 'hit_1cell'] if hits else []))
    for k, (clip, tags, raw, *rest) in enumerate(rows):
      frame = rest[0] if rest else k
      mean = rest[1] if len(rest) > 1 else raw - 0.1
      w.writerow([f'clip{clip}/frame{frame}', clip, frame, tags, raw, mean]
                 + (list(hits[k]) if hits else []))


def _compare(out_dir, seeds):
  r = subprocess.run([sys.executable, 'launch/compare_synth.py', f'--out={out_dir}',
                      f'--seeds={seeds}', '--models=tavlo', '--notrain'],
                     capture_output=True, text=True, cwd=ROOT, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return r, json.loads((out_dir / 'comparison.json').read_text())['tavlo']


def test_table_and_hard_offscreen_tn(tmp_path):
  variants = _variants()
  hard = [i for i, v in variants.items() if v == 'same_category']
  easy = [i for i, v in variants.items() if v in ('offscreen', 'walk_in')]
  onscreen = [i for i, v in variants.items() if v in ('single', 'mixed')]
  assert hard and easy and onscreen, variants
  # Seed 0: of 4 hard frames, 3 below the threshold 0.4 (TN 75%); the easy
  # Off-screen frame and the on-screen frame must not count.
  rows0 = [(hard[0], 'offscreen', 0.1), (hard[0], 'offscreen', 0.39),
           (hard[-1], 'offscreen', 0.2), (hard[-1], 'offscreen', 0.9),
           (easy[0], 'offscreen', 0.95), (onscreen[0], 'single', 0.05)]
  # Seed 1, threshold 0.5: 1 of 2 (50%); a frame tagged offscreen+single counts.
  rows1 = [(hard[0], 'single+offscreen', 0.45), (hard[0], 'offscreen', 0.6)]
  _write_run(tmp_path / 'tavlo_seed0', 80.0, 0.4, rows0)
  _write_run(tmp_path / 'tavlo_seed1', 70.0, 0.5, rows1)
  r, summary = _compare(tmp_path, '0,1')
  assert summary['single']['pointing_game'] == {'mean': 75.0, 'std': 5.0, 'n': 2}
  hard_tn = summary['offscreen_hard']['tn']
  np.testing.assert_allclose([hard_tn['mean'], hard_tn['std']], [62.5, 12.5])
  assert '| tavlo | offscreen_hard |' in r.stdout and '62.5 +- 12.5' in r.stdout
  assert (tmp_path / 'comparison.png').stat().st_size > 0


def test_hard_offscreen_tn_under_the_window_rule(tmp_path):
  variants = _variants()
  hard = [i for i, v in variants.items() if v == 'same_category'][0]
  # One hard clip, frames 0, 1, 2 Off-screen and frame 5 on-screen (a
  # walk-in's later frame, say), peaks (raw max - raw mean) 0.1, 0.2, 0.3,
  # 0.8. Window +-3, quantile 1 (the max): frames 0 and 1 see {0, 1, 2} ->
  # 0.3 < 0.5 (TN); frame 2 also sees frame 5 -> 0.8 (FP): TN 2/3. Per frame
  # (raw max 0.9, 0.9, 0.9 against 0.95) all three are TN.
  rows = [(hard, 'offscreen', 0.9, 0, 0.8), (hard, 'offscreen', 0.9, 1, 0.7),
          (hard, 'offscreen', 0.9, 2, 0.6), (hard, 'single', 0.9, 5, 0.1)]
  settings = {'offscreen_rule': 'peak_window', 'offscreen_window_half_width': 3,
              'offscreen_window_quantile': 1.0}
  _write_run(tmp_path / 'tavlo_seed0', 80.0, 0.95, rows, settings)
  path = tmp_path / 'tavlo_seed0' / 'eval' / 'step_3' / 'eval.json'
  results = json.loads(path.read_text())
  results['settings']['calibration']['window_threshold'] = 0.5
  path.write_text(json.dumps(results))
  _, summary = _compare(tmp_path, '0')
  assert summary['offscreen_hard']['tn']['mean'] == pytest.approx(200 / 3)
  assert summary['offscreen_hard']['tn_raw_max']['mean'] == pytest.approx(100.0)


def test_single_sound_frames_of_mixed_sound_clips(tmp_path):
  """Only frames tagged single whose clip is a Mixed-sound clip count."""
  variants = _variants()
  mixed = [i for i, v in variants.items() if v == 'mixed']
  single = [i for i, v in variants.items() if v == 'single']
  assert mixed and single, variants
  # Seed 0: 1 of the 2 counted frames hit, both within one cell -> 50 / 100;
  # a Mixed-sound frame and a Single-sound clip's frame are left out.
  rows0 = [(mixed[0], 'single', 0.5), (mixed[0], 'single', 0.5),
           (mixed[0], 'mixed', 0.5), (single[0], 'single', 0.5)]
  _write_run(tmp_path / 'tavlo_seed0', 80.0, 0.4, rows0,
             hits=[(1, 1), (0, 1), (0, 0), (0, 0)])
  _write_run(tmp_path / 'tavlo_seed1', 80.0, 0.4, [(mixed[-1], 'single', 0.5)],
             hits=[(1, 1)])
  r, summary = _compare(tmp_path, '0,1')
  got = summary['single_in_mixed']
  assert got['pointing_game'] == {'mean': 75.0, 'std': 25.0, 'n': 2}
  assert got['pointing_1cell'] == {'mean': 100.0, 'std': 0.0, 'n': 2}
  assert '| tavlo | single_in_mixed | 75.0 +- 25.0 | 100.0 +- 0.0 |' in r.stdout
