"""2 processes x 4 fake devices (launch script, jax.distributed on 127.0.0.1)
train exactly like 1 process x 8 devices."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ARGS = ['--config=configs/avatar_synth.py:runlocal', '--mode=train',
        '--config.train.total_steps=3', '--config.input.batch_size=8',
        '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=0.1',
        # Pinned: with the synthetic default's +-1 frame window these 3 steps
        # at lr 0.1 meet a near-tie in a map's max that the all-reduce order
        # flips, and the params part by ~1e-5 (seen on one CPU model in
        # session 9); with +-2 they agree to 1e-6 on both CPUs seen so far.
        '--config.model.temporal_window=2']


def _params(workdir):
  """Restores onto this process's first device, whatever topology saved it."""
  path = os.path.join(workdir, 'checkpoints', '3', 'state')
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(getattr(meta, 'item_metadata', meta), 'tree', meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return ckptr.restore(path, target)['params']


def test_two_processes_match_one_process(tmp_path):
  data_dir = tmp_path / 'tfds'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  one = tmp_path / 'one'
  r = subprocess.run([sys.executable, '-m', 'tavlo_jax.main', *ARGS, f'--workdir={one}',
                      f'--config.dataset.data_dir={data_dir}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-5000:]

  two = tmp_path / 'two'
  r = subprocess.run(['bash', 'launch/local_multiprocess.sh', '2', '4', *ARGS,
                      f'--workdir={two}', f'--config.dataset.data_dir={data_dir}'],
                     cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                     timeout=600)
  logs = '\n'.join((two / f'process_{i}.log').read_text()[-3000:] for i in range(2)
                   if (two / f'process_{i}.log').exists())
  assert r.returncode == 0, r.stderr + logs
  assert 'process 1 of 2' in (two / 'process_1.log').read_text()

  for a, b in zip(jax.tree.leaves(_params(one)), jax.tree.leaves(_params(two))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
