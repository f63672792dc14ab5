"""A run is never lost or poisoned: the CLI driven as a user would.

Damaged newest checkpoints are set aside and the run finishes; a step that
would make the state non-finite is never applied or saved; a workdir refuses
another run's config; a full disk is one line. Runs `tavlo_jax.main` as a
subprocess on the tiny AVATAR-Synth build, made once for the module.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SIX_STEPS = ('--config.train.total_steps=6', '--config.train.checkpoint_every_steps=3',
             '--mode=train')


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _main(workdir, data_dir, *overrides, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.main', '--config=configs/avatar_synth.py:runlocal',
       f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *overrides],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(r):
  assert r.returncode == 0, f'main failed ({r.returncode}):\n{r.stderr[-6000:]}'
  return r


def _one_error_line(r, code):
  assert r.returncode == code, r.stderr[-6000:]
  assert 'Traceback' not in r.stderr and 'Event loop is closed' not in r.stderr, r.stderr[-6000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), r.stderr[-3000:]
  return last


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _params(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'state')['params']


def _logged_steps(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(l)['step'] for l in f if 'train/loss' in l]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, data_dir):
  """6 steps with checkpoints 3 and 6 (built once; tests copy it)."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  _ok(_main(workdir, data_dir, *SIX_STEPS))
  assert _steps(workdir) == [3, 6]
  return workdir


def _copy(run, tmp_path):
  dst = tmp_path / 'run'
  shutil.copytree(run, dst)
  return dst


def _truncate_a_data_file(step_dir):
  f = max((step_dir / 'state').rglob('d/*'), key=lambda p: p.stat().st_size)
  with open(f, 'r+b') as fh:
    fh.truncate(10)


def _delete_a_data_file(step_dir):
  next((step_dir / 'state').rglob('d/*')).unlink()


def _empty_the_folder(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _delete_the_iterator_state(step_dir):
  (step_dir / 'data' / 'process_0-of-1.json').unlink()


@pytest.mark.parametrize('damage', [_truncate_a_data_file, _delete_a_data_file,
                                    _empty_the_folder, _delete_the_iterator_state])
def test_a_damaged_newest_step_is_set_aside_and_the_run_finishes(finished_run, data_dir,
                                                                 tmp_path, damage):
  run = _copy(finished_run, tmp_path)
  damage(run / 'checkpoints' / '6')
  r = _ok(_main(run, data_dir, *SIX_STEPS))
  assert re.search(r'Checkpoint step 6 in \S+ .*moved it aside to 6\.damaged-1', r.stderr)
  assert 'Resumed from step 3' in r.stderr
  # The step's file list finds a missing or cut file before Orbax reads
  # anything: no restore fails half-way, so no read in flight prints a
  # traceback of its own.
  assert 'Traceback' not in r.stderr and 'Event loop is closed' not in r.stderr, r.stderr[-6000:]
  assert _steps(run) == [3, 6] and (run / 'checkpoints' / '6.damaged-1').is_dir()
  # Resuming from step 3 replays steps 4-6 exactly, and logs each step once.
  for a, b in zip(jax.tree.leaves(_params(finished_run, 6)), jax.tree.leaves(_params(run, 6))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _logged_steps(run) == [1, 2, 3, 4, 5, 6]
  if damage is _truncate_a_data_file:   # and the next launch is an ordinary one
    r = _ok(_main(run, data_dir, *SIX_STEPS))
    assert 'Already trained 6/6' in r.stderr and 'moved it aside' not in r.stderr


def test_an_update_that_poisons_the_state_is_never_applied_or_saved(data_dir, tmp_path):
  # Step 1 runs at learning rate 0 (warm-up); step 2's weight decay of 1e38
  # times lr 10 overflows every parameter from a finite loss and gradient.
  poison = ('--config.optimizer.learning_rate=10', '--config.optimizer.weight_decay=1e38',
            '--config.train.total_steps=4', '--config.train.checkpoint_every_steps=1',
            '--mode=train')
  run = tmp_path / 'run'
  for _ in range(2):   # a relaunch resumes the good step and stops the same way
    line = _one_error_line(_main(run, data_dir, *poison), 1)
    assert line.startswith('error: training stopped at step 2: the updated parameters went '
                           'non-finite (loss='), line
    assert line.endswith('the newest checkpoint is step 1 (config.train.on_nonfinite=stop)'), line
    assert _steps(run) == [1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(run, 1)))


def test_skip_mode_drops_the_update_and_goes_on(data_dir, tmp_path):
  run = tmp_path / 'run'
  r = _ok(_main(run, data_dir, '--config.optimizer.learning_rate=10',
                '--config.optimizer.weight_decay=1e38', '--config.train.on_nonfinite=skip',
                '--config.train.total_steps=3', '--mode=train'))
  assert 'step 2: the updated parameters went non-finite' in r.stderr
  assert _steps(run)[-1] == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(run, 3)))


def test_another_config_is_refused_and_branching_is_explicit(finished_run, data_dir, tmp_path):
  run = _copy(finished_run, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in (run / 'checkpoints').rglob('*')}
  line = _one_error_line(_main(run, data_dir, *SIX_STEPS, '--config.model.embed_dim=32'), 2)
  assert 'model.embed_dim (16 -> 32)' in line and f'--init_from={run}' in line, line
  assert {p: p.stat().st_mtime_ns for p in (run / 'checkpoints').rglob('*')} == before

  # Fine-tuning: a new workdir starts from the run's parameters at step 0.
  branch = tmp_path / 'branch'
  r = _ok(_main(branch, data_dir, f'--init_from={run}', '--config.optimizer.learning_rate=1e-4',
                '--config.train.total_steps=2', '--mode=train'))
  assert 'Initialised the parameters from step 6' in r.stderr
  assert _steps(branch) == [2] and _logged_steps(branch) == [1, 2]
  assert {p: p.stat().st_mtime_ns for p in (run / 'checkpoints').rglob('*')} == before

  # Without its stored config, another model's checkpoint is still refused,
  # from the metadata alone: nothing set aside, no flood of asyncio errors.
  (run / 'config.json').unlink()
  line = _one_error_line(_main(run, data_dir, *SIX_STEPS, '--config.model.embed_dim=32'), 1)
  assert 'checkpoint step 6' in line and 'holds a different model' in line, line
  assert _steps(run) == [3, 6] and not list((run / 'checkpoints').glob('*.damaged-*'))


def test_a_full_disk_is_one_line(data_dir, tmp_path):
  full = tmp_path / 'full'
  full.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=400k', 'tmpfs', str(full)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a small tmpfs here ({mounted.stderr.strip()})')
  try:
    r = _main(full / 'run', data_dir, '--config.train.total_steps=2', '--mode=train')
    line = _one_error_line(r, 1)
    assert line.startswith(f'error: --workdir={full / "run"}: no space left on the device'), line
    assert _steps(full / 'run') == []   # nothing half-written that a later run trusts
  finally:
    subprocess.run(['umount', str(full)], check=False)
