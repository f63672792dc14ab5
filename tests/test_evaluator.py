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
from tavlo_jax.evaluation import evaluator as evaluator_lib, reference
from tavlo_jax.evaluation import report, visualize

NUM_CLIPS, T, MASK, GRID = 13, 4, (16, 24), (4, 6)
GLOBAL_BATCH = 8           # 13 clips -> 2 batches, the second padded with 3 rows
NUM_PROCESSES = 2


def make_config(rule='raw_max'):
  c = config_lib.base_config()
  c.eval.offscreen_rule = rule
  c.evals.total = {'split': 'test', 'frames': 'all', 'prefix': 'eval/total/'}
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
    if scenario != 3:
      for t in range(T):
        y, x = rng.integers(0, MASK[0] - 6), rng.integers(0, MASK[1] - 8)
        gt[t, y:y + rng.integers(3, 7), x:x + rng.integers(3, 9)] = 1
    # A noisy version of the GT pooled to the grid, in cosine range.
    pooled = gt.reshape(T, GRID[0], MASK[0] // GRID[0], GRID[1], MASK[1] // GRID[1]).mean((2, 4))
    heat = np.tanh(2 * pooled - 0.5 + 0.4 * rng.normal(size=(T,) + GRID)).astype(np.float32)
    clips.append({
        'gt_mask': gt, 'any_mask': gt, 'tags': tags,
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
                                   'frame_index')}
    batch['valid'] = np.array([r is not None for r in rows])
    batch['clip_index'] = np.array([r['clip_index'] if r is not None else -1 for r in rows],
                                   np.int32)
    yield batch, stack('heat')


def _mesh():
  # Auto axes, like tavlo_jax.sharding.make_mesh (the trainer's mesh).
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def run_evaluator(clips, global_batch, **kw):
  ev = evaluator_lib.Evaluator(make_config(), **kw)
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
      want = reference.frame_scores(clip['heat'][t], clip['gt_mask'][t].astype(float), MASK,
                                    (0.1, 0.15, 0.2))
      for k, v in want.items():
        np.testing.assert_allclose(np.asarray(table[k][i], float), v, atol=1e-5, err_msg=k)


def test_pooled_scores_match_reference_aggregates(evaluated):
  ev, table, cal, results = evaluated
  on, off = evaluator_lib.onscreen_mask(table), evaluator_lib.offscreen_mask(table)
  single = table['tags'][:, 0]
  r = results['scenarios']['single']
  assert r['num_onscreen'] == single.sum() and r['num_offscreen'] == 0
  assert r['ciou'] == pytest.approx(100 * table['ciou'][single, 0].mean())
  assert r['auc'] == pytest.approx(100 * reference.auc(table['ciou'][single, 0]))
  assert r['pointing_game'] == pytest.approx(100 * table['hit'][single].mean())
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
