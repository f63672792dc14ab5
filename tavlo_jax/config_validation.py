"""Every config field checked before any data or compile work.

`validate(config)` raises `ConfigError` whose text is one line naming the
field, its value and what was expected; `main` prints it and exits 2.

The table below has one line per field: adding a field to
`config_lib.base_config` means adding its rule here (a test fails until
then), and deleting a field means deleting its line (a test fails on rules
that match no field). `evals.*.x` matches every named eval entry. Checks that
relate several fields (the model/loss combinations included) come after the
table and run only once every field alone is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
  """A config field whose value the run cannot use; str() is the one line."""


# ---------------------------------------------------------------------------
# Rule kinds. Each knows how to check a value and gives wrong values of every
# kind it rejects (the tests walk them for every field of every config).
# ---------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range_text(lo, hi, lo_open=False) -> str:
  parts = []
  if lo is not None:
    parts.append(f'{">" if lo_open else ">="} {lo}')
  if hi is not None:
    parts.append(f'<= {hi}')
  return ' and '.join(parts)


@dataclasses.dataclass(frozen=True)
class Int:
  lo: int | None = None
  hi: int | None = None
  also: tuple[int, ...] = ()     # accepted outside the range (e.g. -1 = "all")

  def problem(self, v) -> str | None:
    if not _is_int(v):
      return f'expected an int, got {type(v).__name__}'
    if v in self.also:
      return None
    if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
      also = ''.join(f' or {a}' for a in self.also)
      return f'expected an int {_range_text(self.lo, self.hi)}{also}'
    return None

  def wrong_values(self) -> list:
    out = ['abc', 1.5]
    if self.lo is not None:
      out.append(min(self.lo - 1, *(a - 1 for a in self.also)) if self.also else self.lo - 1)
    if self.hi is not None:
      out.append(self.hi + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Float:
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False          # lo itself is excluded (e.g. a rate > 0)

  def problem(self, v) -> str | None:
    if not _is_number(v):
      return f'expected a number, got {type(v).__name__}'
    if not math.isfinite(v):
      return f'expected a finite number {_range_text(self.lo, self.hi, self.lo_open)}'.rstrip()
    below = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
    if below or (self.hi is not None and v > self.hi):
      return f'expected a number {_range_text(self.lo, self.hi, self.lo_open)}'
    return None

  def wrong_values(self) -> list:
    out = ['abc', float('nan'), float('inf')]
    if self.lo is not None:
      out.append(self.lo if self.lo_open else self.lo - 1)
    if self.hi is not None:
      out.append(self.hi + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Bool:

  def problem(self, v) -> str | None:
    return None if isinstance(v, bool) else f'expected true or false, got {type(v).__name__}'

  def wrong_values(self) -> list:
    return ['yes', 2]


@dataclasses.dataclass(frozen=True)
class Text:
  nonempty: bool = False

  def problem(self, v) -> str | None:
    if not isinstance(v, str):
      return f'expected a string, got {type(v).__name__}'
    if self.nonempty and not v.strip():
      return 'expected a non-empty string'
    return None

  def wrong_values(self) -> list:
    return [3] + ([''] if self.nonempty else [])


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `options`; a callable gives them at validation time (e.g. the
  dataset packages present). Typos get the closest option suggested."""
  options: Sequence[str] | Callable[[], Sequence[str]]
  allow_empty: bool = False

  def choices(self) -> list[str]:
    opts = self.options() if callable(self.options) else self.options
    return list(opts)

  def problem(self, v) -> str | None:
    if not isinstance(v, str):
      return f'expected a string, got {type(v).__name__}'
    if (self.allow_empty and v == '') or v in self.choices():
      return None
    close = difflib.get_close_matches(v, self.choices(), n=1, cutoff=0.6)
    hint = f'; did you mean {close[0]!r}?' if close else ''
    empty = " (or '')" if self.allow_empty else ''
    return f'expected one of {"|".join(self.choices())}{empty}{hint}'

  def wrong_values(self) -> list:
    first = self.choices()[0]
    return [7, first[:-1] + first[-1] * 2, 'no-such-choice']


@dataclasses.dataclass(frozen=True)
class Numbers:
  """A tuple/list of ints (or floats), each within [lo, hi]."""
  lo: float | None = None
  hi: float | None = None
  length: int | None = None      # exact length; None: at least one element
  floats: bool = False

  def problem(self, v) -> str | None:
    kind = 'numbers' if self.floats else 'ints'
    size = f'{self.length} ' if self.length else ''
    want = f'expected a tuple of {size}{kind}'
    ok_elem = _is_number if self.floats else _is_int
    if not isinstance(v, (tuple, list)) or not all(ok_elem(x) for x in v):
      return f'{want}, e.g. {self.example()}'
    if (self.length and len(v) != self.length) or not v:
      return f'{want}, got {len(v)}'
    if any((self.lo is not None and x < self.lo) or (self.hi is not None and x > self.hi)
           or not math.isfinite(x) for x in v):
      return f'{want}, each {_range_text(self.lo, self.hi)}'
    return None

  def example(self) -> str:
    x = self.lo if self.lo is not None else 1
    return str((x,) * (self.length or 2)).replace(' ', '')

  def wrong_values(self) -> list:
    n = self.length or 2
    out = ['abc', (), ('a',) * n]
    if self.lo is not None:
      out.append((self.lo - 1,) * n)
    if self.hi is not None:
      out.append((self.hi + 1,) * n)
    if self.length:
      out.append((self.lo if self.lo is not None else 0,) * (self.length + 1))
    return out


# ---------------------------------------------------------------------------
# Where enum options come from: the modules that use them, so the two never
# drift apart. Imported lazily: only jax-free constants are read.
# ---------------------------------------------------------------------------

def _dataset_names() -> list[str]:
  import tavlo_datasets  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(tavlo_datasets.__file__)
  return sorted(n for n in os.listdir(root)
                if os.path.isfile(os.path.join(root, n, '__init__.py')))


def _lazy(module: str, name: str):
  def options():
    import importlib  # pylint: disable=g-import-not-at-top
    return list(getattr(importlib.import_module(module), name))
  return options


MODEL_NAMES = ('tavlo', 'ezvsl')
LOSS_NAMES = ('temporal_mil', 'ezvsl')
OPTIMIZERS = ('adamw', 'sgd')
SCHEDULES = ('cosine', 'constant')
NORMS = ('batch', 'group')
STEMS = ('imagenet', 'small')
AUDIO_ARCHS = ('tokens', 'resnet18')
FEATURES_ON = ('device', 'host')
ON_NONFINITE = ('stop', 'skip')

_POS = Int(lo=1)
_NONNEG = Int(lo=0)
_FRACTION = Float(lo=0.0, hi=1.0)
_MESH_AXIS = Int(lo=1, also=(-1,))   # -1: the devices left over

# One line per field. Keep the order of config_lib.base_config.
RULES: dict[str, Any] = {
    'seed': _NONNEG,
    'dataset.name': Choice(_dataset_names),
    'dataset.builder_config': Text(),
    'dataset.data_dir': Text(nonempty=True),
    'dataset.manual_dir': Text(),
    'dataset.build_if_missing': Bool(),
    'dataset.build_workers': _POS,
    'dataset.eval_name': Choice(_dataset_names, allow_empty=True),
    'dataset.eval_builder_config': Text(),
    'dataset.train_split': Text(nonempty=True),
    'dataset.val_split': Text(),
    'dataset.eval_split': Text(nonempty=True),
    'input.num_frames': _POS,
    'input.frame_stride': _POS,
    'input.image_size': _POS,
    'input.fps': Float(lo=0.0),
    'input.batch_size': _POS,
    'input.eval_batch_size': _POS,
    'input.num_workers': _NONNEG,
    'input.prefetch': _POS,
    'input.shuffle_buffer_seed': _NONNEG,
    'input.max_instances': _POS,
    'input.clip_starts': Choice(_lazy('tavlo_jax.data.pipeline', 'CLIP_STARTS')),
    'input.frame_format': Choice(_lazy('tavlo_datasets.clip_storage', 'FRAME_FORMATS')),
    'input.unscaled_window': Numbers(lo=2, length=2),
    'input.audio.sample_rate': _POS,
    'input.audio.columns_per_frame': _POS,
    'input.audio.block': Choice(_lazy('tavlo_jax.data.sampling', 'AUDIO_BLOCKS')),
    'input.audio.n_fft': Int(lo=2),
    'input.audio.n_mels': _POS,
    'input.audio.fmin': Float(lo=0.0),
    'input.audio.fmax': Float(lo=0.0, lo_open=True),
    'input.audio.log_offset': Float(lo=0.0, lo_open=True),
    'input.audio.features_on': Choice(FEATURES_ON),
    'input.audio.features': Choice(_lazy('tavlo_jax.data.audio', 'FEATURE_KINDS')),
    'input.augment.enabled': Bool(),
    'input.augment.random_resized_crop': Bool(),
    'input.augment.crop_scale': Numbers(lo=0.01, hi=1.0, length=2, floats=True),
    'input.augment.flip': Bool(),
    'input.augment.color_jitter': _FRACTION,
    'input.augment.color_jitter_on': Choice(_lazy('tavlo_jax.data.augment', 'JITTER_PLACES')),
    'input.augment.spec_time_masks': _NONNEG,
    'input.augment.spec_time_mask_width': _NONNEG,
    'input.augment.spec_freq_masks': _NONNEG,
    'input.augment.spec_freq_mask_width': _NONNEG,
    'model.name': Choice(MODEL_NAMES),
    'model.dtype': Choice(_lazy('tavlo_jax.models', 'DTYPES')),
    'model.embed_dim': _POS,
    'model.temporal_pos_dim': _NONNEG,
    'model.num_layers': _POS,
    'model.num_heads': _POS,
    'model.mlp_ratio': _POS,
    'model.temporal_attention': Bool(),
    'model.temporal_window': Int(lo=0, also=(-1,)),   # -1: the whole clip
    'model.per_frame_audio': Bool(),
    'model.cross_modal_attention': Bool(),
    'model.attention_impl': Choice(_lazy('tavlo_jax.models.attention', 'IMPLEMENTATIONS')),
    'model.attention_block': _POS,
    'model.temperature': Float(lo=0.0, lo_open=True),
    'model.center_audio': Bool(),
    'model.motion_features': Bool(),
    'model.fine_stride': _NONNEG,
    'model.fine_motion': Bool(),
    'model.visual.stage_sizes': Numbers(lo=1),
    'model.visual.width': _POS,
    'model.visual.stem': Choice(STEMS),
    'model.visual.stage_strides': Numbers(lo=1),
    'model.visual.norm': Choice(NORMS),
    'model.visual.output_stride': _POS,
    'model.visual.init_from': Text(),             # '': from scratch
    'model.audio.channels': Numbers(lo=1),
    'model.audio.norm': Choice(NORMS),
    'model.audio.arch': Choice(AUDIO_ARCHS),
    'loss.name': Choice(LOSS_NAMES),
    'loss.positives': Choice(_lazy('tavlo_jax.losses', 'POOLINGS')),
    'loss.negatives': Choice(_lazy('tavlo_jax.losses', 'POOLINGS')),
    'loss.symmetric': Bool(),
    'loss.shifted_audio_negatives': _NONNEG,
    'optimizer.name': Choice(OPTIMIZERS),
    'optimizer.learning_rate': Float(lo=0.0, lo_open=True),
    'optimizer.warmup_steps': _NONNEG,
    'optimizer.schedule': Choice(SCHEDULES),
    'optimizer.end_learning_rate_factor': _FRACTION,
    'optimizer.weight_decay': Float(lo=0.0),
    'optimizer.grad_clip_norm': Float(lo=0.0),    # 0: no clipping
    'optimizer.accumulate_steps': _POS,
    'train.total_steps': _POS,
    'train.log_every_steps': _POS,
    'train.checkpoint_every_steps': _POS,
    'train.max_to_keep': _POS,
    'train.eval_every_steps': _NONNEG,            # 0: only at the end
    'train.on_nonfinite': Choice(ON_NONFINITE),
    'mesh.data': _MESH_AXIS,
    'mesh.fsdp': _MESH_AXIS,
    'mesh.seq': _MESH_AXIS,
    'eval.heatmap_thresholds': Numbers(lo=0.0, hi=1.0, floats=True),
    'eval.heatmap_threshold': _FRACTION,
    'eval.interpolation': Choice(_lazy('tavlo_jax.evaluation.metrics', 'INTERPOLATIONS')),
    'eval.annotation_size': Numbers(lo=0, length=2),
    'eval.offscreen_rule': Choice(_lazy('tavlo_jax.evaluation.aggregates', 'OFFSCREEN_RULES')),
    'eval.offscreen_target_tpr': _FRACTION,
    'eval.offscreen_window': _NONNEG,
    'eval.offscreen_window_quantile': _FRACTION,
    'eval.num_visualized_clips': _NONNEG,
    'eval.protocol': Choice(_lazy('tavlo_jax.evaluation.evaluator', 'PROTOCOLS')),
    'evals.*.split': Text(nonempty=True),
    'evals.*.frames': Choice(_lazy('tavlo_jax.evaluation.evaluator', 'POOL_FRAMES')),
    'evals.*.prefix': Text(),
    # Entries scored on a dataset of their own (configs/paper.py's classic sets).
    'evals.*.dataset': Text(nonempty=True),
    'evals.*.protocol': Choice(_lazy('tavlo_jax.evaluation.evaluator', 'PROTOCOLS')),
    'evals.*.interpolation': Choice(_lazy('tavlo_jax.evaluation.metrics', 'INTERPOLATIONS')),
}


def rule_for(field: str):
  """The rule whose name or `*` pattern matches `field`, or None."""
  if field in RULES:
    return RULES[field]
  for pattern, rule in RULES.items():
    if '*' in pattern and fnmatch.fnmatchcase(field, pattern):
      return rule
  return None


# ---------------------------------------------------------------------------
# Checks across fields: (config) -> (field, problem) or None. Each runs only
# after every field alone passed its rule.
# ---------------------------------------------------------------------------

def _stage_lists_match(c):
  v = c.model.visual
  if len(v.stage_strides) != len(v.stage_sizes):
    return ('model.visual.stage_strides',
            f'has {len(v.stage_strides)} entries but stage_sizes has '
            f'{len(v.stage_sizes)}; give one stride per stage')
  return None


def _mel_band(c):
  a = c.input.audio
  if a.fmax > a.sample_rate / 2:
    return ('input.audio.fmax', f'is above the Nyquist frequency '
            f'{a.sample_rate / 2:g} of sample_rate={a.sample_rate}')
  if a.fmin >= a.fmax:
    return ('input.audio.fmin', f'must be below fmax={a.fmax:g}')
  return None


def _crop_scale_ordered(c):
  lo, hi = c.input.augment.crop_scale
  if lo > hi:
    return ('input.augment.crop_scale', f'expected (min, max) with min <= max, got ({lo}, {hi})')
  return None


def _yuv420_frames_usable(c):
  i = c.input
  if i.frame_format == 'rgb':
    return None
  name = repr(i.frame_format)
  if i.image_size % 2:
    return ('input.frame_format', f'{name} needs an even image_size (one '
            f'chroma sample per 2x2 pixels), got {i.image_size}')
  a = i.augment
  if a.enabled and a.color_jitter > 0 and a.color_jitter_on != 'device':
    return ('input.frame_format', f'{name} frames are colour-jittered in the '
            "step: set input.augment.color_jitter_on='device' (or 'rgb' frames)")
  window = tuple(i.unscaled_window)
  if i.frame_format == 'yuv420_unscaled' and any(int(v) % 2 for v in window):
    return ('input.unscaled_window', f'expected (height, width), both even '
            f'(whole chroma samples), got {window}')
  return None


def _headline_threshold_listed(c):
  if c.eval.heatmap_threshold not in tuple(c.eval.heatmap_thresholds):
    return ('eval.heatmap_threshold',
            f'must be one of eval.heatmap_thresholds={tuple(c.eval.heatmap_thresholds)}')
  return None


def _one_filled_mesh_axis(c):
  if [c.mesh.data, c.mesh.fsdp, c.mesh.seq].count(-1) > 1:
    return ('mesh', 'at most one of data, fsdp, seq may be -1 (the devices left over)')
  return None


def _model_builds(c):
  """The model's and loss's own combination checks (they allocate nothing)."""
  from tavlo_jax import losses, models  # pylint: disable=g-import-not-at-top
  try:
    models.build_model(c)
    losses.make_loss(c)
  except ValueError as e:
    return (None, str(e))
  return None


COMBINATIONS = (_stage_lists_match, _mel_band, _crop_scale_ordered,
                _yuv420_frames_usable, _headline_threshold_listed, _one_filled_mesh_axis, _model_builds)


# ---------------------------------------------------------------------------

def leaf_fields(config) -> list[tuple[str, Any]]:
  """[(dotted name, value)] of every field."""
  from tavlo_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.flatten_items(config)


def _show(v) -> str:
  return repr(tuple(v)) if isinstance(v, list) else repr(v)


def validate(config) -> None:
  """Raises ConfigError (one line) for the first field the run cannot use."""
  for field, value in leaf_fields(config):
    rule = rule_for(field)
    if rule is None:   # tests/test_config_validation.py fails until it has one
      continue
    problem = rule.problem(value)
    if problem:
      raise ConfigError(f'config.{field}={_show(value)}: {problem}')
  for check in COMBINATIONS:
    found = check(config)
    if found:
      field, problem = found
      raise ConfigError(f'config.{field}: {problem}' if field else problem)
