"""Evaluator: batches -> per-frame records -> pooled scores, on 1 or N processes.

Also runnable as the worker of the multi-process test:
  python tests/test_evaluator.py worker PROCESS_ID PORT OUT_DIR
"""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tavlo_jax import config_lib
from tavlo_jax.data import sampling
from tavlo_jax.evaluation import evaluator as evaluator_lib, reference
from tavlo_jax.evaluation import report, visualize

NUM_CLIPS, T, MASK, GRID = 13, 4, (16, 24), (4, 6)
GLOBAL_BATCH = 8           # 13 clips -> 2 batches, the second padded with 3 rows
NUM_PROCESSES = 2


def make_config(rule='raw_max'):
  c = config_lib.base_config()
  c.eval.offscreen_rule = rule
  c.evals.total = {'frames': 'all', 'prefix': 'eval/total/'}
  return c


def make_clips(seed=0, invert=False):
  """NUM_CLIPS clips with per-frame tags, GT rectangles and heat maps near the GT."""
  rng = np.random.default_rng(seed)
  clips = []
  for c in range(NUM_CLIPS):
    scenario = c % 4                                   # single, mixed, multi, offscreen
    gt = np.zeros((T,) + MASK, np.uint8)
    tags = np.zeros((T, 4), bool)
    tags[:, scenario] = True
    # Sounding category: 3 categories over the on-screen clips, none off screen,
    # and one frame of each mixed clip with two different ones (-1).
    category = np.full(T, c % 3 if scenario != 3 else -1, np.int32)
    if scenario == 1:
      category[0] = -1
    silent = np.zeros_like(gt)
    if scenario != 3:
      for t in range(T):
        y, x = rng.integers(0, MASK[0] - 6), rng.integers(0, MASK[1] - 8)
        gt[t, y:y + rng.integers(3, 7), x:x + rng.integers(3, 9)] = 1
    if scenario in (0, 2):   # a silent instance beside the source on most frames
      for t in range(T - 1):
        y, x = rng.integers(0, MASK[0] - 4), rng.integers(0, MASK[1] - 4)
        silent[t, y:y + 4, x:x + 4] = 1
    # A noisy version of the GT pooled to the grid, in cosine range.
    pooled = gt.reshape(T, GRID[0], MASK[0] // GRID[0], GRID[1], MASK[1] // GRID[1]).mean((2, 4))
    heat = np.tanh(2 * pooled - 0.5 + 0.4 * rng.normal(size=(T,) + GRID)).astype(np.float32)
    clips.append({
        'gt_mask': gt, 'any_mask': gt | silent, 'tags': tags, 'category': category,
        'ann_valid': rng.uniform(size=T) < 0.8,
        'cross_event': np.full(T, c % 3 == 0),
        'clip_index': np.int32(c), 'frame_index': np.arange(T, dtype=np.int32) * 2,
        'heat': -heat if invert else heat,
    })
  return clips


def batches(clips, global_batch, process_index=0, process_count=1):
  """Host-local eval batches: this process's contiguous rows; padding at the end."""
  per_host = global_batch // process_count
  for start in range(0, len(clips), global_batch):
    rows = []
    for i in range(per_host):
      g = start + process_index * per_host + i
      rows.append(clips[g] if g < len(clips) else None)
    template = clips[0]
    def stack(key, rows=rows):
      return np.stack([r[key] if r is not None else np.zeros_like(template[key]) for r in rows])
    batch = {k: stack(k) for k in ('gt_mask', 'any_mask', 'tags', 'ann_valid', 'cross_event',
                                   'frame_index', 'category')}
    batch['valid'] = np.array([r is not None for r in rows])
    batch['clip_index'] = np.array([r['clip_index'] if r is not None else -1 for r in rows],
                                   np.int32)
    yield batch, stack('heat')


def _mesh():
  # Auto axes, like tavlo_jax.sharding.make_mesh (the trainer's mesh).
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def run_evaluator(clips, global_batch, config=None, **kw):
  ev = evaluator_lib.Evaluator(config or make_config(), **kw)
  for batch, heat in batches(clips, global_batch):
    ev.add(batch, heat)
  return ev


def assert_results_equal(a, b):
  """Exact equality of nested results (NaN == NaN)."""
  assert json.dumps(report._clean(a), sort_keys=True) == json.dumps(report._clean(b),
                                                                    sort_keys=True)


def assert_tables_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def clips():
  return make_clips()


@pytest.fixture(scope='module')
def evaluated(clips):
  ev = run_evaluator(clips, GLOBAL_BATCH)
  cal = ev.calibrate()
  return ev, ev.records(), cal, ev.finalize(cal)


def test_records_are_the_valid_annotated_frames_in_order(clips, evaluated):
  _, table, _, _ = evaluated
  want = [(c['clip_index'], f) for c in clips for f, ok in zip(c['frame_index'], c['ann_valid'])
          if ok]
  assert list(zip(table['clip_index'], table['frame_index'])) == want


def test_records_match_float64_reference(clips, evaluated):
  _, table, _, _ = evaluated
  by_id = {(int(c), int(f)): i for i, (c, f) in enumerate(zip(table['clip_index'],
                                                             table['frame_index']))}
  for clip in clips:
    for t in np.flatnonzero(clip['ann_valid']):
      i = by_id[(int(clip['clip_index']), int(clip['frame_index'][t]))]
      gt = clip['gt_mask'][t].astype(float)
      want = reference.frame_scores(clip['heat'][t], gt, MASK, (0.1, 0.15, 0.2),
                                    silent=(clip['any_mask'][t] > 0) & (gt == 0))
      for k, v in want.items():
        np.testing.assert_allclose(np.asarray(table[k][i], float), v, atol=1e-5, err_msg=k)
  assert np.isfinite(table['silent_margin']).sum() > 10    # the fixture exercises it


def test_pooled_scores_match_reference_aggregates(evaluated):
  ev, table, cal, results = evaluated
  on, off = evaluator_lib.onscreen_mask(table), evaluator_lib.offscreen_mask(table)
  single = table['tags'][:, 0]
  r = results['scenarios']['single']
  assert r['num_onscreen'] == single.sum() and r['num_offscreen'] == 0
  assert r['ciou'] == pytest.approx(100 * table['ciou'][single, 0].mean())
  assert r['auc'] == pytest.approx(100 * reference.auc(table['ciou'][single, 0]))
  assert r['pointing_game'] == pytest.approx(100 * table['hit'][single].mean())
  margin = table['silent_margin'][single]
  assert r['num_silent_frames'] == np.isfinite(margin).sum() > 0
  assert r['sounding_over_silent'] == pytest.approx(
      100 * (margin[np.isfinite(margin)] > 0).mean())
  assert math.isnan(results['scenarios']['mixed']['sounding_over_silent'])   # none silent
  assert math.isnan(r['tn'])                                  # no off-screen frame in it
  total = results['scenarios']['total']
  both = on | off
  assert total['ap'] == pytest.approx(100 * reference.slavc_ap(
      on[both], table['ciou'][both, 0], table['confidence'][both]))
  assert total['max_f1'] == pytest.approx(100 * reference.slavc_max_f1(
      on[both], table['ciou'][both, 0], table['confidence'][both]))
  # raw_max rule with the calibration: TN = off-screen frames whose max is below it.
  assert cal['achieved_tpr'] >= 0.9
  want_tn = 100 * (table['raw_max'][off] < cal['raw_threshold']).mean()
  assert results['scenarios']['offscreen']['tn'] == pytest.approx(want_tn)
  assert results['scenarios']['offscreen']['tn_rule'].startswith('raw_max<')
  assert results['settings']['calibration'] == cal
  assert results['scenarios']['cross_event']['num_onscreen'] == (
      table['cross_event'] & on).sum()
  assert set(evaluator_lib.scalar_metrics(results)) >= {'eval/total/ciou', 'eval/single/auc'}


def test_window_rule_pools_the_clips_neighbouring_frames(clips):
  config = make_config('peak_window')
  config.eval.offscreen_window, config.eval.offscreen_window_quantile = 1, 0.5
  ev = run_evaluator(clips, GLOBAL_BATCH, config)
  table, cal = ev.records(), ev.calibrate()
  results = ev.finalize(cal)
  on, off = evaluator_lib.onscreen_mask(table), evaluator_lib.offscreen_mask(table)
  # The peak (max - mean of the raw map), window-pooled frame by frame in
  # float64 (reference) over ALL the clip's scored frames; thresholds keep
  # >= 90% of on-screen frames.
  peak = table['raw_max'].astype(float) - table['raw_mean']
  windowed = np.asarray(reference.window_quantile(
      table['clip_index'], table['frame_index'], peak, 1, 0.5))
  assert cal['window_threshold'] == reference.calibrate_raw_threshold(windowed[on], 0.9)
  assert cal['raw_threshold'] == reference.calibrate_raw_threshold(table['raw_max'][on], 0.9)
  assert cal['window'] == {'half_width_frames': 1, 'quantile': 0.5}
  assert cal['rule'] == 'peak_window'
  r = results['scenarios']['offscreen']
  assert r['tn'] == pytest.approx(100 * (windowed[off] < cal['window_threshold']).mean())
  assert r['tn_raw_max'] == pytest.approx(
      100 * (table['raw_max'][off] < cal['raw_threshold']).mean())
  assert r['tn_rule'].startswith('q0.5 of peak over +-1 frames<')
  assert results['settings']['offscreen_window_half_width'] == 1
  # A window of 0 frames scores each frame's own peak.
  config.eval.offscreen_window = 0
  ev0 = run_evaluator(clips, GLOBAL_BATCH, config)
  cal0 = ev0.calibrate()
  r0 = ev0.finalize(cal0)['scenarios']['offscreen']
  assert r0['tn'] == pytest.approx(100 * (peak[off] < cal0['window_threshold']).mean())


@pytest.mark.slow
def test_batch_size_and_sharding_do_not_change_anything(clips, evaluated):
  _, table, cal, results = evaluated
  ev = run_evaluator(clips, 5)                                # other padding
  assert_tables_equal(ev.records(), table)
  assert_results_equal(ev.finalize(cal), results)
  # Global arrays split over the 8 fake devices, as the trainer passes them.
  mesh = _mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  ev = evaluator_lib.Evaluator(make_config())
  for batch, heat in batches(clips, GLOBAL_BATCH):
    ev.add(jax.device_put(batch, sharding), jax.device_put(heat, sharding))
  assert_tables_equal(ev.records(), table)


# ---- per-category pointing game ------------------------------------------------

def test_window_annotations_category_is_the_shared_sounding_category():
  """Frame f of this record: 0 one sounding (cat 2) + a silent cat 1 -> 2;
  1 sounding cats 0 and 3 -> -1; 2 two sounding cat 1 -> 1; 3 only a silent
  instance -> -1; 4 one sounding of unknown category -> -1; 5 not annotated."""
  rows = [(0, 2, True), (0, 1, False), (1, 0, True), (1, 3, True),
          (2, 1, True), (2, 1, True), (3, 0, False), (4, -1, True)]
  record = {
      'frames_annotated': {'frame_index': [0, 1, 2, 3, 4], 'tags': [[1, 0, 0, 0]] * 5,
                           'cross_event': [False] * 5},
      'instances': {
          'annotation_index': np.array([r[0] for r in rows], np.int32),
          'category': np.array([r[1] for r in rows], np.int32),
          'category_name': [f'cat{r[1]}' for r in rows],
          'sounding': np.array([r[2] for r in rows]),
          'mask': np.ones((len(rows), 2, 3), np.uint8),
          'box': np.zeros((len(rows), 4), np.float32)},
  }
  frame_index = np.array([0, 1, 2, 3, 4, 5, -1], np.int32)
  out = sampling.window_annotations(record, frame_index, range(6), (2, 3), 4)
  assert out['category'].dtype == np.int32
  np.testing.assert_array_equal(out['category'], [2, -1, 1, -1, -1, -1, -1])
  # The window sees the frames in another order: the categories follow them.
  out = sampling.window_annotations(record, frame_index[::-1].copy(), range(6), (2, 3), 4)
  np.testing.assert_array_equal(out['category'], [-1, -1, -1, -1, 1, -1, 2])


def test_category_scores_match_a_hand_count():
  # tags (single, mixed, multi, offscreen), category, hit.
  frames = [('single', 0, 1), ('single', 0, 0), ('multi', 0, 1), ('mixed', 0, 1),
            ('single', 1, 0), ('mixed', 1, 1),
            ('offscreen', 2, 1), ('offscreen', 0, 0),   # off screen: not counted
            ('single', -1, 1), ('multi', -1, 0),   # unknown / several: left out
            ('single', 4, 1)]
  table = {'tags': np.array([[t == s for s in evaluator_lib.SCENARIOS]
                             for t, _, _ in frames]),
           'category': np.array([c for _, c, _ in frames], np.int32),
           'hit': np.array([h for _, _, h in frames], bool)}
  # One-cell hits: every hit, plus the second frame (a near miss).
  table['hit_1cell'] = table['hit'].copy()
  table['hit_1cell'][1] = True
  nan = math.nan
  table['point_dy'] = np.array([0.0, 1.0, nan, 0.5, 2.0, 0.0, 0, 0, 0, 0, 0], np.float32)
  table['point_dx'] = np.array([0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0, 0, 0, 0, 0], np.float32)
  got = evaluator_lib.category_scores(table, names=['red circle', 'yellow square'])
  assert list(got) == [0, 1, 4]
  assert got[0] == {'num_frames': 4, 'pointing_game': 75.0, 'single': 50.0,
                    'multi': 100.0, 'name': 'red circle', 'pointing_1cell': 100.0,
                    'offset_dy': 0.5, 'offset_dx': -0.25}
  assert got[1]['pointing_1cell'] == 50.0 and got[1]['offset_dy'] == 1.0
  assert got[1]['num_frames'] == 2 and got[1]['pointing_game'] == 50.0
  assert got[1]['single'] == 0.0 and math.isnan(got[1]['multi'])
  assert got[1]['name'] == 'yellow square'
  assert got[4]['pointing_game'] == 100.0 and 'name' not in got[4]   # no name for 4
  assert evaluator_lib.category_scores({k: v[6:10] for k, v in table.items()}) == {}


def test_per_category_pointing_in_results_and_reports(clips, evaluated, tmp_path):
  _, table, _, results = evaluated
  # Plain numpy over the clips themselves (not the records' category column).
  key = lambda i: (int(table['clip_index'][i]), int(table['frame_index'][i]))
  row = {key(i): i for i in range(len(table['clip_index']))}
  hit = {k: bool(table['hit'][i]) for k, i in row.items()}
  want = {}
  for clip in clips:
    for t in np.flatnonzero(clip['ann_valid']):
      cat = int(clip['category'][t])
      if cat >= 0 and clip['tags'][t, :3].any():
        want.setdefault(cat, []).append(
            (hit[(int(clip['clip_index']), int(clip['frame_index'][t]))], clip['tags'][t]))
  per_category = results['per_category']
  assert sorted(per_category) == sorted(want) == [0, 1, 2]
  for cat, frames in want.items():
    h = np.array([x for x, _ in frames], float)
    tags = np.array([x for _, x in frames])
    got = per_category[cat]
    assert got['num_frames'] == len(frames)
    assert got['pointing_game'] == pytest.approx(100 * h.mean())
    for col, name in ((0, 'single'), (2, 'multi')):
      assert got[name] == pytest.approx(100 * h[tags[:, col]].mean())
  # The one-cell pointing rate and the mean offset come from the records' own
  # fields (checked against the float64 reference in the test above).
  for cat in want:
    rows = [i for i in row.values() if table['category'][i] == cat
            and evaluator_lib.onscreen_mask(table)[i]]
    assert per_category[cat]['pointing_1cell'] == pytest.approx(
        100 * table['hit_1cell'][rows].mean())
    assert per_category[cat]['offset_dy'] == pytest.approx(np.nanmean(table['point_dy'][rows]))
    assert per_category[cat]['offset_dx'] == pytest.approx(np.nanmean(table['point_dx'][rows]))
  assert (per_category[0]['pointing_1cell'] >= per_category[0]['pointing_game'])
  scalars = evaluator_lib.scalar_metrics(results)
  assert scalars['eval/per_category/2/pointing_game'] == per_category[2]['pointing_game']
  text = report.format_table(results)
  assert 'Pointing game per sounding category' in text
  worst = min(per_category, key=lambda c: per_category[c]['pointing_game'])
  assert f'Worst category: {worst}, pointing' in text
  assert f"| 1 | {per_category[1]['num_frames']} |" in text
  # Names label the rows; the CSV carries the per-frame category.
  named = run_evaluator(clips, GLOBAL_BATCH, category_names=['red circle', 'yellow square',
                                                             'blue diamond']).finalize()
  assert named['per_category'][0]['name'] == 'red circle'
  assert '| red circle (0) |' in report.format_table(named)
  paths = report.write(str(tmp_path), results, table)
  with open(paths['csv']) as f:
    header, *lines = [line.split(',') for line in f.read().splitlines()]
  col = header.index('category')
  assert [int(x[col]) for x in lines] == table['category'].tolist()
  assert sorted(set(table['category'].tolist())) == [-1, 0, 1, 2]


@pytest.mark.slow
def test_batch_without_category_still_evaluates(clips, evaluated):
  _, table, cal, results = evaluated
  ev = evaluator_lib.Evaluator(make_config())
  for batch, heat in batches(clips, GLOBAL_BATCH):
    del batch['category']
    ev.add(batch, heat)
  got_table = ev.records()
  assert (got_table['category'] == -1).all() and got_table['category'].dtype == np.int32
  assert_tables_equal({k: v for k, v in got_table.items() if k != 'category'},
                      {k: v for k, v in table.items() if k != 'category'})
  got = ev.finalize(cal)
  assert got['per_category'] == {}
  assert_results_equal(got['scenarios'], results['scenarios'])
  assert 'per sounding category' not in report.format_table(got)
  assert not any('per_category' in k for k in evaluator_lib.scalar_metrics(got))


def test_uncalibrated_raw_max_reports_no_tn(evaluated):
  ev, _, _, _ = evaluated
  r = ev.finalize()['scenarios']['offscreen']
  assert math.isnan(r['tn']) and r['tn_rule'] == 'raw_max (not calibrated)'
  assert r['tn_no_pixel_above@0.1'] == 0.0                   # non-flat maps always have a 1


def test_map_sign_flags_inverted_maps(evaluated):
  _, table, _, results = evaluated
  assert not results['map_sign']['inverted']
  assert results['map_sign']['max_pointing'] > results['map_sign']['min_pointing']
  inverted = run_evaluator(make_clips(invert=True), GLOBAL_BATCH).records()
  sign = evaluator_lib.map_sign_report(inverted)
  assert sign['inverted'] and sign['min_pointing'] == results['map_sign']['max_pointing']


def test_bad_inputs_are_named(clips):
  ev = evaluator_lib.Evaluator(make_config())
  batch, heat = next(batches(clips, GLOBAL_BATCH))
  with pytest.raises(ValueError, match=r'\[8, 4, h, w\]'):
    ev.add(batch, heat[:, :2])
  with pytest.raises(KeyError, match='gt_mask'):
    ev.add({k: v for k, v in batch.items() if k != 'gt_mask'}, heat)
  bad = heat.copy()
  bad[1, 2] = np.nan
  batch['ann_valid'][1, 2] = True
  with pytest.raises(ValueError, match=r'NaN/Inf at \(clip_index, frame_index\) \[\(1, 4\)\]'):
    ev.add(batch, bad)
  config = make_config()
  config.eval.heatmap_threshold = 0.3
  with pytest.raises(ValueError, match='heatmap_threshold=0.3'):
    evaluator_lib.Evaluator(config)
  config = make_config(rule='max')
  with pytest.raises(ValueError, match='offscreen_rule'):
    evaluator_lib.Evaluator(config)
  config = make_config(rule='peak_window')
  config.eval.offscreen_window = -1
  with pytest.raises(ValueError, match=r'config\.eval\.offscreen_window=-1'):
    evaluator_lib.Evaluator(config)
  config.eval.offscreen_window, config.eval.offscreen_window_quantile = 8, 1.5
  with pytest.raises(ValueError, match='offscreen_window_quantile=1.5'):
    evaluator_lib.Evaluator(config)


def test_report_and_visuals(clips, evaluated, tmp_path):
  _, table, _, results = evaluated
  paths = report.write(str(tmp_path), results, table)
  with open(paths['json']) as f:
    saved = json.load(f)
  assert saved['settings']['interpolation'] == 'bilinear'
  assert saved['scenarios']['single']['tn'] is None           # NaN -> null
  with open(paths['csv']) as f:
    assert len(f.read().splitlines()) == 1 + len(table['clip_index'])
  table_md = report.format_table(results)
  assert '| total |' in table_md and 'raw_max<' in table_md
  assert '| pointing | pointing ±1 cell | sounding>silent |' in table_md
  assert results['scenarios']['total']['pointing_1cell'] == pytest.approx(
      100 * table['hit_1cell'][evaluator_lib.onscreen_mask(table)].mean())
  chosen = visualize.select_clips(table, 'mixed', 2)
  assert chosen == [1, 5]
  frames = np.random.default_rng(0).integers(0, 255, (T,) + MASK + (3,), dtype=np.uint8)
  clip = clips[chosen[0]]
  out = visualize.write_clip(str(tmp_path), 'mixed_clip1', frames, clip['heat'],
                             clip['gt_mask'], clip['ann_valid'])
  assert os.path.getsize(out['png']) > 0 and os.path.getsize(out['gif']) > 0
  batch, heat = next(batches(clips, GLOBAL_BATCH))
  batch['frames'] = np.broadcast_to(frames, (GLOBAL_BATCH,) + frames.shape)
  images = visualize.tensorboard_images(batch, heat, rows=[0, 1])
  assert list(images) == ['eval/overlay/clip0', 'eval/overlay/clip1']
  img = images['eval/overlay/clip0']
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


# ---- 2 processes x 4 fake devices --------------------------------------------

def _worker(process_id: int, port: int, out_dir: str):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=NUM_PROCESSES, process_id=process_id,
                             initialization_timeout=120)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = _mesh()
  clips = make_clips()
  sharded = evaluator_lib.Evaluator(make_config(), mesh=mesh)   # global arrays
  local = evaluator_lib.Evaluator(make_config())                # host-local arrays
  for batch, heat in batches(clips, GLOBAL_BATCH, process_id, NUM_PROCESSES):
    sharded.add(batch, heat)
    local.add(batch, heat)
  cal = sharded.calibrate()
  out = {'sharded': sharded.finalize(cal), 'local': local.finalize(cal)}
  with open(os.path.join(out_dir, f'results_{process_id}.json'), 'w') as f:
    json.dump(report._clean(out), f, sort_keys=True)
  np.savez(os.path.join(out_dir, f'records_{process_id}.npz'), **sharded.records())
  np.savez(os.path.join(out_dir, f'records_local_{process_id}.npz'), **local.records())
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_single_process_numbers(evaluated, tmp_path):
  _, table, cal, results = evaluated
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, 'worker', str(i), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    logs = [p.communicate()[0] for p in procs]
    pytest.fail('multi-process evaluation timed out after 300 s:\n' + '\n----\n'.join(logs))
  for i, p in enumerate(procs):
    assert p.returncode == 0, f'process {i} failed (rc={p.returncode}):\n{logs[i][-5000:]}'
  want = report._clean({'sharded': results, 'local': results})
  for i in range(NUM_PROCESSES):
    with open(tmp_path / f'results_{i}.json') as f:
      got = json.load(f)
    assert got['sharded']['settings']['calibration'] == cal
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True), f'process {i}'
    for name in (f'records_{i}.npz', f'records_local_{i}.npz'):
      with np.load(tmp_path / name) as saved:
        assert_tables_equal(dict(saved), table)


if __name__ == '__main__' and len(sys.argv) == 5 and sys.argv[1] == 'worker':
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def test_colorize_keeps_an_ulp_wobbling_map_dark_and_spreads_a_real_one():
  wobble = np.full((4, 4), 0.3, np.float32)
  wobble[2, 1] = np.nextafter(np.float32(0.3), np.float32(1))
  dark = visualize.colorize(np.zeros((4, 4), np.float32), (8, 8))
  np.testing.assert_array_equal(visualize.colorize(wobble, (8, 8)), dark)
  real = np.full((4, 4), 0.3, np.float32)
  real[2, 1] = 0.31
  assert len(np.unique(visualize.colorize(real, (8, 8)).reshape(-1, 3), axis=0)) > 1
