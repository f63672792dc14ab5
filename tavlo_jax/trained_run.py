"""A trained run, loaded for inference: its config, its weights, its rules.

  run = trained_run.load_run('/path/to/workdir')     # or .../checkpoints/<step>
  run.config, run.variables, run.step, run.in_view

A run is what `tavlo_jax.main` leaves in its workdir: `config.json`,
`checkpoints/<step>/` (saved by `checkpointing.Checkpointer`) and, once
evaluated, `eval/step_<step>/eval.json`. The model is built from the stored
config, never from a config file on disk, so a checkpoint trained with any
config just works. Used by `localize`, `category_probe` and `aot_compile`;
`main --mode=eval` restores the whole TrainState through the same
`Checkpointer`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from tavlo_jax import checkpointing, config_lib, models
from tavlo_jax.evaluation import evaluator

# Config fields of experiments that were removed, with the value that meant
# "off". A stored run that has one at that value loads as if it were absent;
# one that switched it on was a different model, which this code cannot build.
RETIRED_FIELDS = {
    'model.aligned_maps': False,
    'model.spatial_attention': True,
    'model.pos_encoding': 'learned',
    'loss.sounding_frames_db': 0.0,
}


class RunError(ValueError):
  """Bad input (checkpoint, config, video, flag), with what was expected."""


@dataclasses.dataclass(frozen=True)
class InView:
  """The run's Off-screen rule ("is the sound's source in view?") with the
  threshold calibrated on validation for exactly these weights."""
  rule: str                  # 'raw_max' | 'peak_window' (config.eval.offscreen_rule)
  threshold: float
  half_width: int = 0        # peak_window: model frames on each side
  quantile: float = 1.0      # peak_window: pooled by this quantile

  def scores(self, raw_max: np.ndarray, raw_mean: np.ndarray) -> np.ndarray:
    """Per model frame of one video, the score compared with `threshold`."""
    if self.rule == 'raw_max':
      return np.asarray(raw_max, np.float64)
    n = len(raw_max)       # one clip: the video's model frames, in order
    return evaluator.peak_window(
        {'clip_index': np.zeros(n, int), 'frame_index': np.arange(n),
         'raw_max': raw_max, 'raw_mean': raw_mean}, (self.half_width, self.quantile))


@dataclasses.dataclass(frozen=True)
class Run:
  config: ml_collections.ConfigDict
  variables: dict                  # {'params': ..., 'batch_stats'?: ...}
  step: int
  workdir: str
  in_view: InView | None           # calibrated Off-screen rule, if any


def load_run(checkpoint: str) -> Run:
  workdir, step_dir, step = find_checkpoint(checkpoint)
  config = load_config(workdir)
  variables, stored_step = restore_variables(step_dir)
  check_matches(config, variables, workdir)
  step = stored_step if stored_step >= 0 else step
  return Run(config, variables, step, workdir, in_view_rule(workdir, step))


# ---------------------------------------------------------------------------
# Checkpoint discovery
# ---------------------------------------------------------------------------

def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, 'state'))


def find_checkpoint(checkpoint: str) -> tuple[str, str, int]:
  """A workdir or one checkpoints/<step> -> (workdir with config.json, step dir, step)."""
  if not os.path.isdir(checkpoint):
    raise RunError(f'--checkpoint={checkpoint!r} is not a directory '
                   '(expected a training workdir or checkpoints/<step>)')
  checkpoint = os.path.abspath(checkpoint)
  if _is_step_dir(checkpoint):
    step_dir = checkpoint
  else:
    root = checkpoint
    if os.path.isdir(os.path.join(root, 'checkpoints')):
      root = os.path.join(root, 'checkpoints')
    # Only steps Orbax committed (the rule training uses): a folder named by
    # a number is not enough, it may be emptied or half-written.
    steps = [n for n in checkpointing.complete_steps(root)
             if _is_step_dir(os.path.join(root, str(n)))]
    if not steps:
      raise RunError(f'--checkpoint={checkpoint!r}: no finished checkpoint '
                     f'step (a <step>/state folder) in {root}')
    step_dir = os.path.join(root, str(steps[-1]))
  # config.json sits in the workdir, two levels above <step>/ (main writes it).
  workdir = step_dir
  for _ in range(3):
    workdir = os.path.dirname(workdir)
    if os.path.exists(os.path.join(workdir, 'config.json')):
      return workdir, step_dir, int(os.path.basename(step_dir))
  raise RunError(
      f'--checkpoint={checkpoint!r}: no config.json in the run folders above '
      f'{step_dir} (tavlo_jax.main writes <workdir>/config.json; the model is '
      'built from it)')


# ---------------------------------------------------------------------------
# The stored config
# ---------------------------------------------------------------------------

def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's stored config; fields added to the code since it was written
  take their defaults (a new switch defaults to the old behaviour), fields
  of retired experiments are dropped (RETIRED_FIELDS)."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise RunError(f'{path}: cannot read the run config ({e})') from None
  for key in ('input', 'model', 'dataset'):
    if key not in config:
      raise RunError(f'{path}: missing config section {key!r}')
  _drop_retired(config, path)
  filled = _fill_defaults(config, config_lib.base_config())
  if filled:
    logging.warning('%s predates config fields %s; using their defaults.', path, filled)
  # Sequence-parallel attention needs the training mesh; the plain kernel has
  # the same parameters and gives the same maps on one device.
  if config.model.attention_impl in ('ring', 'all_to_all'):
    config.model.attention_impl = 'xla'
  return config


def _drop_retired(config, path: str) -> None:
  dropped = []
  for name, off in RETIRED_FIELDS.items():
    section, field = name.split('.')
    if section in config and field in config[section]:
      if config[section][field] != off:
        raise RunError(
            f'{path}: {name}={config[section][field]!r} was an experiment this '
            f'version no longer has (only {off!r} is supported); load the run '
            'with the version of tavlo_jax that trained it')
      del config[section][field]
      dropped.append(name)
  for name, entry in config.get('evals', {}).items():
    # Once on every entry and never read; an entry scored on a dataset of
    # its own (`dataset`) still names its split.
    if 'split' in entry and 'dataset' not in entry:
      del entry['split']
      dropped.append(f'evals.{name}.split')
  if dropped:
    logging.info('%s: ignoring fields this version no longer has: %s', path, dropped)


def _fill_defaults(config, defaults, prefix: str = '') -> list[str]:
  filled = []
  for key, value in defaults.items():
    if key not in config:
      config[key] = copy.deepcopy(value)
      filled.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      filled += _fill_defaults(config[key], value, f'{prefix}{key}.')
  return filled


def model_fps(config, fps_flag: float | None = None) -> float:
  """Frames per second the model sees: the flag, or the run's training rate.

  The config has no frame-rate field, so the rate comes from the run's
  dataset builder config (every builder decodes at a fixed `fps`), divided by
  `input.frame_stride` (a clip frame spans that many stored frames).
  """
  if fps_flag:
    if fps_flag <= 0:
      raise RunError(f'--fps must be positive, got {fps_flag}')
    return float(fps_flag)
  stride = int(config.input.frame_stride)
  if config.input.fps:            # a config that records its rate
    return float(config.input.fps) / stride
  d = config.dataset
  fps = None
  try:
    import importlib  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    importlib.import_module(f'tavlo_datasets.{d.name}')
    builder_config = tfds.builder_cls(d.name).builder_configs[d.builder_config]
    fps = getattr(builder_config, 'fps', None) or getattr(
        getattr(builder_config, 'synth', None), 'fps', None)
  except Exception:  # pylint: disable=broad-except  # unknown dataset: ask for --fps
    pass
  if not fps:
    raise RunError(
        f'cannot tell the frame rate the run trained at (dataset '
        f'{d.name}/{d.builder_config} is not a known builder config); '
        'pass --fps')
  return float(fps) / stride


# ---------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------

def restore_variables(step_dir: str) -> tuple[dict, int]:
  """params/batch_stats of a TrainState checkpoint onto the default device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    restored = checkpointing.restore_weights(step_dir, device)
  except KeyError as e:
    raise RunError(f'{step_dir}/state: {e.args[0]}') from None
  except checkpointing.CheckpointError as e:
    raise RunError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore errors
    raise RunError(f'{step_dir}/state: cannot restore the checkpoint '
                   f'({type(e).__name__}: {str(e).splitlines()[0][:300]})') from None
  variables = {'params': restored['params']}
  if restored.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
  step = int(restored['step']) if 'step' in restored else -1
  return variables, step


def check_matches(config, variables, workdir: str) -> None:
  """The weights must fit the stored config; say where they do not."""
  want = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(
              models.abstract_variables(config)['params'])}
  have = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(variables['params'])}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise RunError(
        f'the checkpoint does not fit {workdir}/config.json (first '
        f'differences, path and shape: {diff}); was config.json overwritten '
        'by another run?')


# ---------------------------------------------------------------------------
# The Off-screen rule its evaluation calibrated
# ---------------------------------------------------------------------------

def in_view_rule(workdir: str, step: int) -> InView | None:
  """The Off-screen rule the run's evaluation calibrated for these weights."""
  path = os.path.join(workdir, 'eval', f'step_{step}', 'eval.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    settings = json.load(f).get('settings', {})
  calibration = settings.get('calibration') or {}
  if (settings.get('offscreen_rule') == 'peak_window'
      and calibration.get('window_threshold') is not None):
    return InView('peak_window', float(calibration['window_threshold']),
                  int(settings['offscreen_window_half_width']),
                  float(settings['offscreen_window_quantile']))
  thr = calibration.get('raw_threshold')
  return None if thr is None else InView('raw_max', float(thr))
