"""The main job's code path end to end, as a user drives it (subprocesses).

build (tiny) -> train -> checkpoint -> resume -> evaluate -> report; a SIGKILL
at a random step resumes bit-exactly with the same data order; SIGTERM saves
and exits cleanly.
"""
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _cmd(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'tavlo_jax.main',
          '--config=configs/avatar_synth.py:runlocal', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', *overrides]


def _run(workdir, data_dir, *overrides, timeout=600):
  r = subprocess.run(_cmd(workdir, data_dir, *overrides), cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, f'main failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}'
  return r


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'train/loss' in rec:
        out[rec['step']] = rec['train/loss']
  return out


def _final_params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  restored = ocp.StandardCheckpointer().restore(path)
  return restored['params']


def test_main_job_builds_trains_resumes_and_reports(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  r = _run(workdir, data_dir)
  # The per-scenario table is printed for the user.
  for name in ('single', 'mixed', 'multi', 'offscreen', 'cross_event', 'total'):
    assert f'| {name} |' in r.stdout, r.stdout
  results = json.loads((workdir / 'eval' / 'step_4' / 'eval.json').read_text())
  assert set(results['scenarios']) >= {'single', 'mixed', 'multi', 'offscreen'}
  # The synthetic default's Off-screen rule, calibrated on validation.
  assert results['settings']['offscreen_rule'] == 'peak_window'
  cal = results['settings']['calibration']
  assert cal['window_threshold'] is not None and cal['window_achieved_tpr'] >= 0.9
  assert (workdir / 'eval' / 'step_4' / 'eval_frames.csv').exists()
  assert list((workdir / 'eval' / 'step_4' / 'overlays').glob('*.png'))
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'config.json').read_text())['train']['total_steps'] == 4
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  # Each logged interval says how long the loop waited for host batches.
  with open(workdir / 'metrics.jsonl') as f:
    waits = [json.loads(line)['train/input_wait'] for line in f
             if 'train/loss' in line]
  assert len(waits) == 4 and all(0.0 <= w <= 1.0 for w in waits), waits
  assert re.search(r'clips/s, input wait \d+%\)', r.stderr), r.stderr[-2000:]
  assert (workdir / 'checkpoints' / '4').is_dir()

  # Same command with more steps: resumes at 4, not from scratch.
  r = _run(workdir, data_dir, '--config.train.total_steps=6', '--mode=train')
  assert 'Resumed from step 4' in r.stderr
  assert (workdir / 'checkpoints' / '6').is_dir()

  # --mode=eval on the finished run evaluates the latest checkpoint.
  r = _run(workdir, data_dir, '--config.train.total_steps=6', '--mode=eval')
  assert (workdir / 'eval' / 'step_6' / 'eval.md').exists()


def test_sigkill_at_a_random_step_resumes_bit_exactly(data_dir, tmp_path):
  steps = ['--config.train.total_steps=8', '--config.train.checkpoint_every_steps=1',
           '--mode=train']
  straight = tmp_path / 'straight'
  _run(straight, data_dir, *steps)

  killed = tmp_path / 'killed'
  kill_after = random.Random().randint(2, 6)
  proc = subprocess.Popen(_cmd(killed, data_dir, *steps), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  ckpt_dir = killed / 'checkpoints'
  while time.time() < deadline and proc.poll() is None:
    done = [int(p.name) for p in ckpt_dir.glob('[0-9]*') if p.name.isdigit()] if ckpt_dir.exists() else []
    if done and max(done) >= kill_after:
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _run(killed, data_dir, *steps)

  a, b = _final_params(straight, 8), _final_params(killed, 8)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Same data order: every logged step has the same loss in both runs.
  la, lb = _losses(straight), _losses(killed)
  for step in range(1, 9):
    assert la[step] == lb[step], (step, la[step], lb[step])
  # Steps replayed after the kill replace the killed launch's lines.
  with open(killed / 'metrics.jsonl') as f:
    logged = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert logged == list(range(1, 9))


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  workdir = tmp_path / 'term'
  proc = subprocess.Popen(
      _cmd(workdir, data_dir, '--config.train.total_steps=100000',
           '--config.train.checkpoint_every_steps=100000', '--mode=train'),
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (workdir / 'metrics.jsonl').exists() and _losses(workdir):
      break
    time.sleep(0.1)
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-4000:]
  assert 'checkpoint saved' in err, err[-4000:]
  saved = [int(p.name) for p in (workdir / 'checkpoints').glob('[0-9]*') if p.name.isdigit()]
  assert saved and max(saved) >= 1
  del out
