r"""Entry point: train and/or evaluate TAVLO.

  python -m tavlo_jax.main --config=configs/avatar_synth.py --workdir=workdirs/tavlo
  python -m tavlo_jax.main --config=configs/avatar_synth.py:runlocal --workdir=workdirs/smoke \
      --config.train.total_steps=10 --mode=train_and_eval
  python -m tavlo_jax.main --config=configs/avatar_synth.py --workdir=workdirs/tuned \
      --init_from=workdirs/tavlo --config.optimizer.learning_rate=1e-4   # branch a run

Exit codes: 0 done (or stopped by SIGTERM after saving); 2 a config field, an
override or the workdir is wrong (one line, before any data or compile work);
1 the run cannot go on: a step went non-finite with on_nonfinite=stop, no
checkpoint restores, or the disk is full (one line, checkpoints left intact).
"""

from __future__ import annotations

import difflib
import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from tavlo_jax import logs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally `:variant`.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs, reports.')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval'],
                          'eval: evaluate the latest checkpoint in --workdir.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 for multi-process runs. Unset: taken from the '
    'environment (Slurm, TPU pods, JAX_COORDINATOR_ADDRESS) or single process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: total.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this one.')
_INIT_FROM = flags.DEFINE_string(
    'init_from', None,
    'Workdir of another run: start this (new) run from its newest checkpoint\'s '
    'parameters, with a fresh optimiser at step 0 (fine-tuning or branching). '
    'Ignored once --workdir holds checkpoints of its own.')


def _is_multi_process_env() -> bool:
  """True when a launcher tells us we are one of several processes."""
  if _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  # TPU pod slices: several workers listed by the TPU runtime.
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if not _is_multi_process_env():
    logging.info('Single process: jax.distributed not initialised.')
    return
  kwargs = {}
  if _COORDINATOR.value:
    kwargs = dict(coordinator_address=_COORDINATOR.value,
                  num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  jax.distributed.initialize(**kwargs)  # the rest comes from the environment


def main(argv):
  logging.get_absl_handler().addFilter(logs.QuietLibraries('warning'))
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required')
  from tavlo_jax import config_validation, workdir  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  # Everything the user can get wrong is checked before any data or compile
  # work: one line each, exit 2.
  try:
    config_validation.validate(config)
    workdir.check_usable(_WORKDIR.value)
    if _INIT_FROM.value and not workdir.has_checkpoints(_INIT_FROM.value):
      raise workdir.WorkdirError(f'--init_from={_INIT_FROM.value}: no checkpoint there')
  except (config_validation.ConfigError, workdir.WorkdirError) as e:
    _fail(e, 2)
  _init_distributed()

  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax import checkpointing, train  # pylint: disable=g-import-not-at-top

  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    workdir.claim(_WORKDIR.value, config, write=jax.process_index() == 0)
    train.run(config, _WORKDIR.value, mode=_MODE.value, init_from=_INIT_FROM.value)
  except workdir.WorkdirError as e:
    _fail(e, e.exit_code)
  except (train.NonFiniteError, checkpointing.CheckpointError) as e:
    _fail(e, 1)
  except Exception as e:  # pylint: disable=broad-except
    disk = workdir.disk_error(e)
    if disk is None:
      raise   # a bug: keep the traceback
    _fail(f'--workdir={_WORKDIR.value}: {workdir.describe_disk_error(disk)}', 1)


def _fail(error, code: int):
  """One line on stderr and exit `code`: the user's error, not a traceback."""
  logging.flush()
  print(f'error: {error}', file=sys.stderr, flush=True)
  # os._exit: an exception unwinding through Orbax's and grain's threads
  # would otherwise print their shutdown noise after the line.
  os._exit(code)  # pylint: disable=protected-access


def _explain_config_override_error(argv) -> str | None:
  """Turns config_flags' raw errors on `--config.x=y` into one clear line."""
  from tavlo_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg is None:
    return None
  try:
    config = config_lib.load_config_file(config_arg)
  except Exception as e:  # pylint: disable=broad-except
    return f'--config={config_arg}: cannot load the config: {e}'
  known = config_lib.flatten_keys(config)
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key, _, value = a[len('--config.'):].partition('=')
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
      hint = f'; did you mean {", ".join(close)}?' if close else ''
      return f'--config.{key}: no such config field in {config_arg}{hint}'
    try:
      config_lib.check_override_type(config, key, value)
    except (TypeError, ValueError) as e:
      return f'--config.{key}={value}: {e}'
  return None


def _parse_flags(argv):
  """absl's parser, but a bad `--config...` gives one clear line, no traceback."""
  try:
    rest = flags.FLAGS(argv)
    # config_flags stands a placeholder for a config file it could not load
    # (raising on first use, deep in the job): make that a parse error here.
    config = flags.FLAGS['config'].value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      raise ValueError('the config file could not be loaded')
    return rest
  except (KeyError, AttributeError, TypeError, ValueError, OSError,
          flags.Error) as e:
    _fail(_explain_config_override_error(argv) or f'{type(e).__name__}: {e}', 2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
