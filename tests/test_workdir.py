"""A workdir belongs to one run; its problems read as one line.

Fast, in-process: ownership of a workdir by its first config, usable-workdir
checks, disk errors found through wrapping, how a damaged step is set aside
(and why a kill during that is safe), metrics deduplication on resume. The
CLI runs that exercise the same paths end to end are in test_run_integrity.py.
"""
import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tavlo_jax import checkpointing, config_lib, run_io, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**overrides):
  c = config_lib.load_config_file(f'{ROOT}/configs/avatar_synth.py:runlocal')
  c.update_from_flattened_dict(overrides)
  return c


def _with_checkpoint(path):
  (path / 'checkpoints' / '4').mkdir(parents=True)


def test_first_start_stores_the_config_and_a_relaunch_keeps_it(tmp_path):
  workdir.claim(str(tmp_path), _config())
  first = (tmp_path / 'config.json').read_text()
  _with_checkpoint(tmp_path)
  # Fields that may change on resume: accepted, the stored config untouched.
  workdir.claim(str(tmp_path), _config(**{'train.total_steps': 9, 'input.num_workers': 2,
                                          'mesh.data': 1, 'eval.heatmap_threshold': 0.15}))
  assert (tmp_path / 'config.json').read_text() == first


def test_relaunch_with_another_model_optimizer_or_data_is_refused(tmp_path):
  workdir.claim(str(tmp_path), _config())
  _with_checkpoint(tmp_path)
  with pytest.raises(workdir.WorkdirError) as e:
    workdir.claim(str(tmp_path), _config(**{'model.embed_dim': 32, 'optimizer.learning_rate': 0.01,
                                            'dataset.builder_config': 'small'}))
  line = str(e.value)
  assert e.value.exit_code == 2 and '\n' not in line
  for part in ('model.embed_dim (16 -> 32)', 'optimizer.learning_rate (0.001 -> 0.01)',
               'dataset.builder_config ("tiny" -> "small")', f'--init_from={tmp_path}'):
    assert part in line, line


def test_without_checkpoints_a_relaunch_may_change_anything(tmp_path):
  workdir.claim(str(tmp_path), _config())   # e.g. the first launch failed on its data
  workdir.claim(str(tmp_path), _config(**{'model.embed_dim': 32}))
  assert json.loads((tmp_path / 'config.json').read_text())['model']['embed_dim'] == 32


def test_a_field_the_stored_run_predates_counts_as_its_default(tmp_path):
  workdir.claim(str(tmp_path), _config())
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['model']['center_audio']          # written before the field existed
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  _with_checkpoint(tmp_path)
  workdir.claim(str(tmp_path), _config())      # default value: the same run
  with pytest.raises(workdir.WorkdirError, match='model.center_audio'):
    workdir.claim(str(tmp_path), _config(**{'model.center_audio': False}))


def test_every_may_change_pattern_names_a_field():
  import fnmatch  # pylint: disable=g-import-not-at-top
  fields = config_lib.flatten_keys(config_lib.base_config())
  stale = [p for p in workdir.MAY_CHANGE_ON_RESUME
           if not any(fnmatch.fnmatchcase(f, p) for f in fields)]
  assert not stale


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(workdir.WorkdirError, match='is a file; expected a directory'):
    workdir.check_usable(str(f))
  with pytest.raises(workdir.WorkdirError, match='cannot create it'):
    workdir.check_usable(str(f / 'sub'))


def test_disk_errors_are_found_through_wrapping():
  full = OSError(errno.ENOSPC, 'No space left on device', '/w/checkpoints/3/state/x')
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError('async save failed') from e
  except RuntimeError as wrapped:
    found = workdir.disk_error(wrapped)
  assert found is full
  assert workdir.describe_disk_error(found) == (
      'no space left on the device writing /w/checkpoints/3/state/x (No space left on device)')
  assert workdir.disk_error(ValueError('a bug')) is None


def _fake_step(ckpt, step, complete=True):
  d = ckpt / str(step)
  (d / 'state').mkdir(parents=True)
  (d / 'state' / 'data').write_bytes(b'x' * 10)
  if complete:
    (d / checkpointing.COMMIT_MARKER).write_text('ok')


def test_only_steps_with_the_commit_marker_are_trusted(tmp_path):
  _fake_step(tmp_path, 3)
  _fake_step(tmp_path, 6, complete=False)
  (tmp_path / '9').mkdir()                      # an emptied step folder
  assert checkpointing.incomplete_steps(str(tmp_path)) == [6, 9]


def test_a_damaged_step_is_renamed_never_deleted_and_a_kill_during_it_is_safe(tmp_path):
  _fake_step(tmp_path, 6, complete=False)
  # A kill before the rename: the step is still there and is set aside on the
  # next start. After it: the renamed folder is complete and never a step.
  moved = checkpointing.set_aside(str(tmp_path), 6, 'test')
  assert pathlib.Path(moved).name == '6.damaged-1'
  assert (tmp_path / '6.damaged-1' / 'state' / 'data').read_bytes() == b'x' * 10
  assert not (tmp_path / '6').exists()
  assert checkpointing.incomplete_steps(str(tmp_path)) == []
  # Damaged again later: a second copy, the first kept.
  _fake_step(tmp_path, 6, complete=False)
  assert pathlib.Path(checkpointing.set_aside(str(tmp_path), 6, 'test')).name == '6.damaged-2'
  assert (tmp_path / '6.damaged-1').is_dir()


def test_a_steps_file_list_finds_missing_and_cut_files(tmp_path):
  _fake_step(tmp_path, 3)
  step = tmp_path / '3'
  assert checkpointing.file_list_mismatch(str(step)) is None        # no list: Orbax decides
  checkpointing.write_file_list(str(step))
  listed = json.loads((step / checkpointing.FILE_LIST).read_text())
  assert listed['state/data'] == 10 and checkpointing.FILE_LIST not in listed
  assert checkpointing.file_list_mismatch(str(step)) is None
  (step / 'state' / 'data').write_bytes(b'x' * 4)
  assert checkpointing.file_list_mismatch(str(step)) == (
      'has state/data at 4 bytes, 10 when it was saved')
  (step / 'state' / 'data').unlink()
  assert checkpointing.file_list_mismatch(str(step)) == 'is missing its file state/data'
  (step / checkpointing.FILE_LIST).write_text('{"state/da')          # cut short
  assert 'unreadable' in checkpointing.file_list_mismatch(str(step))
  # Written once: a later call does not bless a damaged step.
  checkpointing.write_file_list(str(step))
  assert 'unreadable' in checkpointing.file_list_mismatch(str(step))


def test_every_reader_of_a_step_checks_its_file_list_first(tmp_path):
  """Loading weights (localize, evaluate) and --init_from refuse a step whose
  files differ from its list, with the reason, before Orbax reads anything
  (these fake steps hold no Orbax data at all)."""
  _fake_step(tmp_path, 3)
  checkpointing.write_file_list(str(tmp_path / '3'))
  (tmp_path / '3' / 'state' / 'data').unlink()
  with pytest.raises(checkpointing.CheckpointError, match='is missing its file state/data'):
    checkpointing.restore_weights(str(tmp_path / '3'), None)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'--init_from: checkpoint step 3 .* is missing its file state/data'):
    checkpointing.init_params_from(str(tmp_path), None, None)


def test_orbax_does_not_take_a_set_aside_folder_for_a_step(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _fake_step(tmp_path, 3)
  _fake_step(tmp_path, 6)
  os.rename(tmp_path / '6', tmp_path / '6.damaged-1')
  manager = ocp.CheckpointManager(
      str(tmp_path), options=ocp.CheckpointManagerOptions(cleanup_tmp_directories=True))
  assert list(manager.all_steps()) == [3]
  manager.close()
  assert (tmp_path / '6.damaged-1').is_dir()    # not cleaned up as a tmp folder


def test_metrics_are_deduplicated_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'train/loss': float(s)}) for s in range(1, 8)]
  path.write_text('\n'.join(lines) + '\n{"step": 8, "tra')   # cut short by a kill
  writer = run_io.MetricWriter(str(tmp_path), total_steps=10, resumed_step=5)
  writer.scalars(6, {'train/loss': 60.0})
  writer.close()
  records = [json.loads(l) for l in path.read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]['train/loss'] == 60.0


@pytest.mark.slow   # a subprocess: python and jax start-up
def test_cli_workdir_that_is_a_file_is_one_line(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  r = subprocess.run([sys.executable, '-m', 'tavlo_jax.main',
                      '--config=configs/avatar_synth.py:runlocal', f'--workdir={f}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == f'error: --workdir={f}: is a file; expected a directory'
  assert 'Traceback' not in r.stderr


def _mount_tmpfs(path, options):
  path.mkdir()
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                     capture_output=True, text=True, check=False)
  if r.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({r.stderr.strip()})')


@pytest.mark.slow   # a subprocess: python and jax start-up
def test_cli_read_only_workdir_is_one_line(tmp_path):
  ro = tmp_path / 'ro'
  _mount_tmpfs(ro, 'ro,size=1m')   # chmod does not stop root; a read-only mount does
  try:
    r = subprocess.run([sys.executable, '-m', 'tavlo_jax.main',
                        '--config=configs/avatar_synth.py:runlocal', f'--workdir={ro}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  finally:
    subprocess.run(['umount', str(ro)], check=False)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      f'error: --workdir={ro}: not writable (Read-only file system)')
  assert 'Traceback' not in r.stderr
