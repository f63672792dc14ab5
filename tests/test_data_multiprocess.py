"""2 JAX processes x 4 fake CPU devices: shards, global batches, eval counts.

The test starts this file twice as a script (`--child`), each a JAX process
of a local `jax.distributed` cluster; each child writes what it saw to JSON
and the test checks the union. Child output is printed on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
NUM_PROCESSES = 2
TIMEOUT_S = 300


def small_config():
  # Same as test_data.small_config; duplicated so the child imports no tests.
  from tavlo_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.input.num_frames = 4
  c.input.image_size = 16
  c.input.batch_size = 8                    # global: 4 per process
  c.input.eval_batch_size = 4               # global: 2 per process
  a = c.input.audio
  a.sample_rate, a.columns_per_frame, a.n_fft = 8000, 4, 512
  a.n_mels, a.fmax = 16, 4000.0
  return c


def child(args) -> None:
  """One JAX process: reads its shard for an epoch, builds global batches."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()              # grain reads absl flags
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{args.port}',
      num_processes=NUM_PROCESSES, process_id=args.process_id,
      initialization_timeout=120)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == NUM_PROCESSES
  assert jax.local_device_count() == 4 and jax.device_count() == 8
  builder = tfds.builder_from_directory(args.dataset_dir)
  config = small_config()
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
  out = {'local': [], 'global': [], 'global_shape': [],
         'frames_slice_matches': []}
  it = pipeline.make_train_iterator(config, builder.as_data_source('train'))
  p = jax.process_index()
  for _ in range(2):                        # 8 records per shard: one epoch
    host = next(it)
    glob = pipeline.make_global_batch(host, mesh)
    gathered = {k: np.asarray(multihost_utils.process_allgather(v,
                                                                tiled=True))
                for k, v in glob.items()}
    out['local'].append(host['clip_index'].tolist())
    out['global'].append(gathered['clip_index'].tolist())
    out['global_shape'].append(list(glob['frames'].shape))
    out['frames_slice_matches'].append(bool(np.array_equal(
        gathered['frames'][4 * p:4 * p + 4], host['frames'])))
  ev = pipeline.make_eval_batches(config, builder.as_data_source('test'))
  scored = []
  batches = list(ev)
  for b in batches:
    for i, t in zip(*np.nonzero(b['ann_valid'])):
      scored.append([int(b['clip_index'][i]), int(b['frame_index'][i, t])])
  out.update(eval_batches=len(batches), eval_num_batches=ev.num_batches,
             eval_scored=scored, train_records=len(builder.as_data_source(
                 'train')))
  pathlib.Path(args.out).write_text(json.dumps(out))
  # Leave together: no process may exit while the other is in a collective.
  multihost_utils.sync_global_devices('done')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_disjoint_shards_and_build_global_batches(
    tmp_path):
  from fixtures import fixture_builder as fb  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import sampling  # pylint: disable=g-import-not-at-top
  builder = fb.build(tmp_path / 'tfds')
  port = free_port()
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(
                 [str(HERE), os.environ.get('PYTHONPATH', '')]))
  procs, outs = [], []
  for i in range(NUM_PROCESSES):
    outs.append(tmp_path / f'out{i}.json')
    procs.append(subprocess.Popen(
        [sys.executable, __file__, '--child', f'--process_id={i}',
         f'--port={port}', f'--dataset_dir={builder.data_dir}',
         f'--out={outs[-1]}'],
        env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = [proc.communicate()[0] for proc in procs]
    pytest.fail('children timed out:\n' + '\n'.join(
        f'--- child {i} ---\n{log[-4000:]}' for i, log in enumerate(logs)))
  codes = [proc.returncode for proc in procs]
  assert codes == [0] * NUM_PROCESSES, '\n'.join(
      f'--- child {i} (rc {c}) ---\n{log[-4000:]}'
      for i, (c, log) in enumerate(zip(codes, logs)))

  res = [json.loads(o.read_text()) for o in outs]
  n = res[0]['train_records']
  shards = [set(sum(r['local'], [])) for r in res]
  for r, shard in zip(res, shards):
    assert len(shard) == n // NUM_PROCESSES          # no repeats in an epoch
    assert r['global_shape'] == [[8, 4, 16, 16, 3]] * 2
    assert all(r['frames_slice_matches'])
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(n))
  # The global batch is process 0's rows then process 1's, on both.
  for step in range(2):
    expected = res[0]['local'][step] + res[1]['local'][step]
    assert res[0]['global'][step] == expected == res[1]['global'][step]
  # Eval: the same number of batches everywhere; every annotated frame once.
  assert res[0]['eval_batches'] == res[1]['eval_batches'] == (
      res[0]['eval_num_batches'])
  source = builder.as_data_source('test')
  expected = sorted([r, int(f)] for r in range(len(source))
                    for f in sampling.annotated_frames(source[r]))
  assert sorted(res[0]['eval_scored'] + res[1]['eval_scored']) == expected


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--child', action='store_true')
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--port', type=int)
  parser.add_argument('--dataset_dir')
  parser.add_argument('--out')
  child(parser.parse_args())
