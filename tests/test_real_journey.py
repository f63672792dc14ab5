"""The real-data path as a user drives it, on fixture files the test writes.

An AVATAR-layout release and a VGGSound folder (real h264/aac mp4s), built
with `python -m tavlo_datasets.build`, then `python -m tavlo_jax.main
--config=configs/paper.py:real+runlocal` trains a few steps on VGGSound and
prints the per-scenario report of the AVATAR test set it scored.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from fixtures import avatar_release as fixture
from test_main_job import ROOT, _env   # one CPU device, as the main job's test

pytestmark = pytest.mark.slow

def _run(*args, timeout=900):
  r = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, (f'{args[0]} failed ({r.returncode}):\n'
                             f'{r.stdout[-3000:]}\n{r.stderr[-6000:]}')
  return r


def write_vggsound_copy(root: pathlib.Path) -> pathlib.Path:
  clips = [fixture.FixtureVideo(f'vgg_{i}', fps=10.0, num_frames=20,
                                tone_hz=300.0 + 100 * i) for i in range(4)]
  for clip in clips:
    fixture.write_video(root / 'clips' / f'{clip.video_id}.mp4', clip)
  (root / 'vggsound_10k.txt').write_text(
      '\n'.join(c.video_id for c in clips) + '\n')
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  avatar = fixture.write_release(tmp_path_factory.mktemp('avatar_release'))
  vggsound = write_vggsound_copy(tmp_path_factory.mktemp('vggsound'))
  data_dir = tmp_path_factory.mktemp('tfds')
  for name, manual in (('vggsound/10k', vggsound), ('avatar/default', avatar)):
    _run('tavlo_datasets.build', name, f'--manual_dir={manual}',
         f'--data_dir={data_dir}', '--file_format=array_record')
  return data_dir


def test_real_runlocal_trains_on_vggsound_and_reports_avatar(built, tmp_path):
  workdir = tmp_path / 'run'
  r = _run('tavlo_jax.main', '--config=configs/paper.py:real+runlocal',
           f'--workdir={workdir}', f'--config.dataset.data_dir={built}')
  out = r.stdout
  # The report names the set it scored, not the training set.
  assert 'avatar/default test, tavlo, step 4' in out, out
  assert 'vggsound' not in out.split('avatar/default test')[1]
  for scenario in ('Single', 'Mixed', 'Multi', 'Off-screen', 'Total'):
    assert scenario.lower() in out.lower(), out
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert max(steps) == 4
  # A quiet console: no TensorBoard renaming line per metric, no message
  # repeated (absl's prefix of time and place stripped), the start stated.
  assert 'is illegal' not in r.stderr
  assert 'trained from scratch' in r.stderr
  messages = [line.split('] ', 1)[-1] for line in r.stderr.splitlines()]
  repeated = {m for m in messages if messages.count(m) > 1 and m.strip()}
  assert not repeated, r.stderr
  assert len(messages) < 40, r.stderr
  print(out)
