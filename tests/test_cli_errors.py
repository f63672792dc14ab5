"""Every command-line tool answers a user's mistake with one `error:` line
that names the file or flag and what was expected, exit code 2, and no
traceback. (evaluate_maps' heat-map cases: test_evaluate_maps.py.)"""

import os
import subprocess
import sys

import pytest

from test_main_job import ROOT

pytestmark = pytest.mark.slow   # one subprocess per case


def _cases(tmp):
  """name -> (argv after `python -m`, text the error line contains)."""
  empty = tmp / 'empty_release'
  empty.mkdir()
  (empty / 'notes.txt').write_text('not a release\n')
  return {
      'main_missing_config_file': (
          ['tavlo_jax.main', '--config=configs/avatar.py', f'--workdir={tmp}/w'],
          "--config=configs/avatar.py: cannot load the config: config file "
          "'configs/avatar.py' does not exist"),
      'main_unknown_variant': (
          ['tavlo_jax.main', '--config=configs/paper.py:rael', f'--workdir={tmp}/w'],
          "unknown config variant 'rael'"),
      'main_missing_weights': (
          ['tavlo_jax.main', '--config=configs/paper.py:real', f'--workdir={tmp}/w',
           f'--config.model.visual.init_from={tmp}/resnet18.safetensors'],
          f"config.model.visual.init_from='{tmp}/resnet18.safetensors': no such file"),
      'param_count_without_config': (
          ['tavlo_jax.param_count'], '--config is required'),
      'aot_compile_missing_config_file': (
          ['tavlo_jax.aot_compile', '--config=configs/nope.py', '--topology=cpu:2'],
          "config file 'configs/nope.py' does not exist"),
      'category_probe_without_checkpoint': (
          ['tavlo_jax.category_probe'], '--checkpoint is required'),
      'category_probe_missing_checkpoint': (
          ['tavlo_jax.category_probe', f'--checkpoint={tmp}/none'],
          f"--checkpoint='{tmp}/none' is not a directory"),
      'localize_without_video': (
          ['tavlo_jax.localize', f'--checkpoint={tmp}/none'],
          '--checkpoint and --video are required'),
      'build_missing_manual_dir': (
          ['tavlo_datasets.build', 'avatar', f'--manual_dir={tmp}/nope',
           f'--data_dir={tmp}/tfds'],
          f'Manual directory {tmp}/nope does not exist'),
      'build_missing_id_list': (
          ['tavlo_datasets.build', 'vggsound/10k', f'--manual_dir={empty}',
           f'--data_dir={tmp}/tfds'],
          f"{empty}/vggsound_10k.txt: the id list of config '10k' is missing"),
  }


CASES = sorted([
    'main_missing_config_file', 'main_unknown_variant', 'main_missing_weights',
    'param_count_without_config', 'aot_compile_missing_config_file',
    'category_probe_without_checkpoint', 'category_probe_missing_checkpoint',
    'localize_without_video', 'build_missing_manual_dir', 'build_missing_id_list'])


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path):
  argv, says = _cases(tmp_path)[case]
  r = subprocess.run([sys.executable, '-m', *argv], cwd=ROOT, capture_output=True,
                     text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
  assert r.returncode == 2, r.stderr[-3000:]
  assert len(errors) == 1 and says in errors[0], r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
