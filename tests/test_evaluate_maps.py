"""evaluate_maps round trips on a tiny AVATAR-layout fixture (json + npz)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tavlo_jax import cli, evaluate_maps
from tavlo_jax.evaluation import evaluator as evaluator_lib

SIZE = (72, 128)           # annotation size used by the tests (AVATAR: 360x640)
ORIG = (1280, 720)         # original (W, H) of most fixture videos


def _rect(x0, y0, x1, y1):
  return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _inst(task, rect, category, **extra):
  x0, y0, x1, y1 = rect
  return {'segmentation': _rect(*rect), 'bbox': [x0, y0, x1 - x0, y1 - y0],
          'audio_visual_category': category, 'task': task, **extra}


# video -> {frame: (original (W, H), [instances])}
FIXTURE = {
    'vidA': {0: (ORIG, [_inst('single', (200, 100, 600, 500), 'dog')]),
             8: (ORIG, [_inst('single', (300, 150, 700, 550), 'dog')])},
    'vidB': {0: (ORIG, [_inst('mixed', (100, 100, 400, 400), 'drum'),
                        _inst('Mixed-Sound', (700, 200, 1100, 600), 'guitar')]),
             8: (ORIG, [_inst('mixed', (120, 100, 420, 400), 'drum')])},   # source change
    'vidC': {0: (ORIG, [_inst('Off-Screen', (500, 200, 900, 600), 'dog')]),
             16: (ORIG, [_inst('off-screen', (520, 220, 900, 600), 'dog')])},
    'vidD': {0: ((640, 360), [_inst('multi', (50, 50, 200, 200), 'drum'),
                              _inst('multi', (300, 50, 450, 200), 'drum', sounding=False)])},
}


def write_fixture(root):
  """AVATAR release layout: root/metadata/<video>/<frame>.json."""
  for vid, frames in FIXTURE.items():
    os.makedirs(os.path.join(root, 'metadata', vid), exist_ok=True)
    for frame, ((w, h), instances) in frames.items():
      with open(os.path.join(root, 'metadata', vid, f'{frame}.json'), 'w') as f:
        json.dump({'original_width': w, 'original_height': h, 'annotations': instances}, f)
  return root


@pytest.fixture(scope='module')
def annotations(tmp_path_factory):
  root = write_fixture(str(tmp_path_factory.mktemp('avatar')))
  return root, evaluate_maps.load_annotations(root)


def _config(**kw):
  return evaluate_maps.make_config((0.1, 0.15, 0.2), 0.1, 'bilinear',
                                   kw.get('rule', 'no_pixel_above'), SIZE)


def _evaluate(frames, maps, **kw):
  return evaluate_maps.evaluate(frames, maps, _config(**kw), batch_frames=4,
                                calibration=kw.get('calibration'))


def test_load_annotations_tags_sounding_and_cross_event(annotations):
  _, frames = annotations
  by_id = {fa.frame_id: fa for fa in frames}
  assert list(by_id) == ['vidA/0', 'vidA/8', 'vidB/0', 'vidB/8', 'vidC/0', 'vidC/16', 'vidD/0']
  assert by_id['vidB/0'].tags.tolist() == [False, True, False, False]
  assert by_id['vidC/0'].tags.tolist() == [False, False, False, True]
  assert by_id['vidC/0'].polygons == []                 # off-screen instance is silent
  assert len(by_id['vidD/0'].polygons) == 1             # sounding=False honoured
  assert by_id['vidB/8'].cross_event and not by_id['vidA/0'].cross_event


def test_rasterize_scales_polygons(annotations):
  _, frames = annotations
  fa = next(f for f in frames if f.frame_id == 'vidD/0')   # 640x360 original
  g = evaluate_maps.rasterize(fa, (360, 640))
  assert g.sum() == 151 * 151 and g[50:201, 50:201].all()  # PIL fills the outline too
  assert evaluate_maps.rasterize(fa, SIZE).sum() == pytest.approx(151 * 151 / 25, rel=0.2)


def _gt_maps(frames):
  return {fa.frame_id: evaluate_maps.rasterize(fa, SIZE).astype(np.float32) for fa in frames}


def test_maps_equal_to_gt_score_perfectly(annotations):
  _, frames = annotations
  results, table, name = _evaluate(frames, _gt_maps(frames))
  on = evaluator_lib.onscreen_mask(table)
  assert on.sum() == 5 and (~on).sum() == 2
  np.testing.assert_array_equal(table['ciou'][on], 1.0)
  np.testing.assert_array_equal(table['hit'][on], True)
  total = results['scenarios']['total']
  assert total['ciou'] == 100.0 and total['auc'] == 100.0 and total['pointing_game'] == 100.0
  assert results['scenarios']['offscreen']['tn'] == 100.0
  assert results['scenarios']['mixed']['num_onscreen'] == 2
  assert results['scenarios']['cross_event']['num_onscreen'] == 2
  assert name(int(table['clip_index'][0]), int(table['frame_index'][0])) == 'vidA/0'


def test_all_zero_maps_are_negatives_everywhere(annotations):
  _, frames = annotations
  maps = {fa.frame_id: np.zeros((9, 16), np.float32) for fa in frames}
  results, table, _ = _evaluate(frames, maps)
  np.testing.assert_array_equal(table['ciou'], 0.0)
  assert results['scenarios']['offscreen']['tn'] == 100.0
  assert results['scenarios']['total']['ciou'] == 0.0


def test_uniform_random_maps_score_what_the_definition_predicts(annotations):
  _, frames = annotations
  rng = np.random.default_rng(0)
  maps = {fa.frame_id: rng.uniform(size=SIZE).astype(np.float32) for fa in frames}
  results, table, _ = _evaluate(frames, maps)
  n = SIZE[0] * SIZE[1]
  on = evaluator_lib.onscreen_mask(table)
  g = table['gt_pixels'][on].astype(np.float64)
  # Normalised U(0,1) pixels: a fraction (1 - t) is above t, inside and outside
  # the GT alike, so cIoU = (1-t) G / (G + (1-t) (N - G)); top-50%: t = 1/2.
  for k, t in enumerate((0.1, 0.15, 0.2)):
    want = (1 - t) * g / (g + (1 - t) * (n - g))
    np.testing.assert_allclose(table['ciou'][on, k], want, atol=0.03)
  half = 0.5 * g / (g + 0.5 * (n - g))
  np.testing.assert_allclose(table['ciou_top50_ge'][on], half, atol=0.03)
  np.testing.assert_allclose(table['pia'][~on, 0], 0.9, atol=0.02)
  # A non-flat normalised map always has a pixel at 1: never a TN by that rule.
  assert results['scenarios']['offscreen']['tn'] == 0.0
  # With a calibrated raw threshold above every max, all off-screen frames are TN.
  results, _, _ = _evaluate(frames, maps, rule='raw_max',
                            calibration={'rule': 'raw_max', 'raw_threshold': 2.0})
  assert results['scenarios']['offscreen']['tn'] == 100.0
  assert results['scenarios']['offscreen']['tn_rule'] == 'raw_max<2'


def test_bad_heatmaps_are_named(annotations, caplog):
  _, frames = annotations
  maps = _gt_maps(frames)
  short = {k: v for k, v in maps.items() if k != 'vidC/16'}
  with pytest.raises(cli.InputError, match=r"key 'vidC/16': missing"):
    evaluate_maps.check_heatmaps(frames, short)
  with pytest.raises(cli.InputError, match=r"key 'vidA/8': contains NaN"):
    evaluate_maps.check_heatmaps(frames, {**maps, 'vidA/8': np.full((4, 4), np.nan)})
  with pytest.raises(cli.InputError, match=r"key 'vidB/0': shape \(2, 4, 4\)"):
    evaluate_maps.check_heatmaps(frames, {**maps, 'vidB/0': np.zeros((2, 4, 4))})
  # One line per bad key, each naming the file and the key.
  with pytest.raises(cli.InputError) as bad:
    evaluate_maps.check_heatmaps(
        frames, {**short, 'vidA/8': np.full((4, 4), np.inf), 'vidB/0': np.zeros(3)},
        source='--heatmaps: m.npz')
  assert bad.value.lines == [
      "--heatmaps: m.npz: key 'vidC/16': missing (expected a 2-D map for every "
      'annotated frame; 7 frames are annotated)',
      "--heatmaps: m.npz: key 'vidA/8': contains NaN/Inf (16 of 16 values), "
      'expected finite scores',
      "--heatmaps: m.npz: key 'vidB/0': shape (3,), expected a 2-D map"]
  with caplog.at_level(logging.WARNING):
    evaluate_maps.check_heatmaps(frames, {**maps, 'vidZ/3': np.zeros((4, 4))})
  assert 'vidZ/3' in caplog.text


@pytest.mark.slow
def test_cli_writes_reports(annotations, tmp_path):
  root, frames = annotations
  rng = np.random.default_rng(1)
  # Any resolution, even different ones per video.
  maps = {fa.frame_id: rng.normal(size=(7, 12) if fa.video_id == 'vidA' else (9, 16))
          for fa in frames}
  path = str(tmp_path / 'maps.npz')
  np.savez(path, **maps)
  out = str(tmp_path / 'out')
  # As a user runs it: a separate program with its flags.
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.evaluate_maps', f'--heatmaps={path}',
       f'--annotations={root}', f'--out={out}', '--protocol=classic', '--batch_frames=4',
       f'--annotation_size={SIZE[0]},{SIZE[1]}'],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  assert r.returncode == 0, r.stderr[-4000:]
  printed = r.stdout
  assert '| total |' in printed and 'mean cIoU top50' in printed
  with open(os.path.join(out, 'eval.json')) as f:
    results = json.load(f)
  assert results['settings']['protocol'] == 'classic'
  assert results['settings']['annotation_size'] == list(SIZE)
  assert set(results['scenarios']) >= {'single', 'mixed', 'multi', 'offscreen', 'total'}
  with open(os.path.join(out, 'eval_frames.csv')) as f:
    rows = f.read().splitlines()
  assert len(rows) == 1 + 7 and rows[1].startswith('vidA/0,')
  assert os.path.exists(os.path.join(out, 'eval.md'))


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.evaluate_maps', *args],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))


def _bad_inputs(root, frames, tmp_path):
  """name -> (--heatmaps file, --annotations dir, what the one line says)."""
  maps = _gt_maps(frames)
  cases = {}

  def npz(name, content):
    path = tmp_path / f'{name}.npz'
    np.savez(path, **content)
    return path

  cases['missing_key'] = (npz('short', {k: v for k, v in maps.items() if k != 'vidC/16'}),
                          root, "key 'vidC/16': missing")
  cases['nan_map'] = (npz('nan', {**maps, 'vidA/8': np.full((4, 4), np.nan)}), root,
                      "key 'vidA/8': contains NaN/Inf (16 of 16 values)")
  cases['wrong_shape'] = (npz('shape', {**maps, 'vidB/0': np.zeros((2, 4, 4))}), root,
                          "key 'vidB/0': shape (2, 4, 4), expected a 2-D map")
  text = tmp_path / 'maps_text.npz'
  text.write_text('vidA/0 0.1 0.2\n')
  cases['text_file'] = (text, root, 'not readable as .npz')
  npy = tmp_path / 'maps_array.npz'
  with open(npy, 'wb') as f:
    np.save(f, np.zeros((7, 4, 4)))
  cases['npy_named_npz'] = (npy, root, 'holds one 3-D array of shape (7, 4, 4) (a .npy file)')
  cases['no_file'] = (tmp_path / 'absent.npz', root, 'no such file')
  bad_json = tmp_path / 'bad_release'
  write_fixture(str(bad_json))
  (bad_json / 'metadata' / 'vidA' / '8.json').write_text('{"original_width": 1280,')
  cases['bad_json'] = (npz('good', maps), bad_json, '8.json: not valid JSON')
  return cases


CASES = ('missing_key', 'nan_map', 'wrong_shape', 'text_file', 'npy_named_npz',
         'no_file', 'bad_json')


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES)
def test_cli_bad_input_is_one_line_and_exit_2(annotations, tmp_path, case):
  root, frames = annotations
  heatmaps, ann, says = _bad_inputs(root, frames, tmp_path)[case]
  r = _cli(f'--heatmaps={heatmaps}', f'--annotations={ann}')
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and says in lines[0], r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  assert case == 'bad_json' or str(heatmaps) in lines[0]
