"""Every config field is validated before any data or compile work.

Table-driven: each field of every config and variant gets a wrong value of
each kind its rule rejects (wrong type, out of range, unknown choice), and
the error must be one line naming that field. Plus: every field has a rule,
every rule has a field, and the failures users met read as one line.
"""
import copy
import pathlib
import subprocess
import sys

import pytest

from tavlo_jax import config_lib
from tavlo_jax import config_validation as cv

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'configs').glob('*.py'))


def _variants(config_file: str) -> list[str]:
  """The variants a config file knows, read from its own parse_variants call."""
  known = []
  real = config_lib.parse_variants

  def spy(arg, known_names):
    known.extend(known_names)
    return real(arg, known_names)
  config_lib.parse_variants = lambda arg, known: spy(arg, known)
  try:
    config_lib.load_config_file(str(ROOT / config_file))
  finally:
    config_lib.parse_variants = real
  return ['seed=3' if v == 'seed' else v for v in known]


SPECS = [f'{f}' for f in CONFIG_FILES] + [
    f'{f}:{v}' for f in CONFIG_FILES for v in _variants(f)]


def _load(spec):
  path, _, arg = spec.partition(':')
  return config_lib.load_config_file(f'{ROOT / path}:{arg}' if arg else str(ROOT / path))


def _set(config, field, value):
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


def test_specs_cover_every_variant():
  assert 'configs/avatar_synth.py:runlocal' in SPECS and 'configs/paper.py:real' in SPECS


@pytest.mark.parametrize('spec', SPECS)
def test_every_shipped_config_is_valid(spec):
  cv.validate(_load(spec))


@pytest.mark.parametrize('spec', SPECS)
def test_every_field_rejects_each_kind_of_wrong_value(spec):
  pristine = _load(spec)
  checked = 0
  for field, _ in cv.leaf_fields(pristine):
    rule = cv.rule_for(field)
    for bad in rule.wrong_values():
      config = copy.deepcopy(pristine)   # a set value can change a field's type
      config.unlock()
      _set(config, field, bad)
      with pytest.raises(cv.ConfigError) as e:
        cv.validate(config)
      line = str(e.value)
      assert line.startswith(f'config.{field}='), (field, bad, line)
      assert '\n' not in line
      if isinstance(rule, cv.Choice) and isinstance(bad, str) and bad != 'no-such-choice':
        assert 'did you mean' in line, line   # a typo gets the closest option
      checked += 1
  assert checked > 200


def test_every_base_config_field_has_a_rule():
  missing = [f for f, _ in cv.leaf_fields(config_lib.base_config()) if cv.rule_for(f) is None]
  assert not missing, f'add rules to config_validation.RULES for {missing}'


def test_every_rule_names_a_field():
  # The base config, and the shipped configs for fields only some entries
  # carry (an eval entry scored on a dataset of its own).
  fields = {f for spec in SPECS for f, _ in cv.leaf_fields(_load(spec))}
  fields |= {f for f, _ in cv.leaf_fields(config_lib.base_config())}
  import fnmatch  # pylint: disable=g-import-not-at-top
  stale = [p for p in cv.RULES if not any(fnmatch.fnmatchcase(f, p) for f in fields)]
  assert not stale, f'rules for fields that no longer exist: {stale}'


@pytest.mark.parametrize('field, value, expected', [
    ('input.batch_size', -4, 'config.input.batch_size=-4: expected an int >= 1'),
    ('input.batch_size', 0, 'config.input.batch_size=0: expected an int >= 1'),
    ('train.on_nonfinite', 'sotp', "did you mean 'stop'?"),
    ('train.checkpoint_every_steps', 0, 'config.train.checkpoint_every_steps=0: expected an int >= 1'),
    ('optimizer.name', 'adamm', "config.optimizer.name='adamm': expected one of adamw|sgd; did you mean 'adamw'?"),
    ('model.visual.stage_sizes', 'abc', "config.model.visual.stage_sizes='abc': expected a tuple of ints"),
    ('model.name', 'tavol', "config.model.name='tavol': expected one of tavlo|ezvsl; did you mean 'tavlo'?"),
    ('train.total_steps', -5, 'config.train.total_steps=-5: expected an int >= 1'),
    ('optimizer.learning_rate', float('inf'), 'config.optimizer.learning_rate=inf: expected a finite number'),
    ('mesh.data', 0, 'config.mesh.data=0: expected an int >= 1 or -1'),
])
def test_values_that_fit_the_type_but_not_the_meaning(field, value, expected):
  config = _load('configs/avatar_synth.py:runlocal')
  config.unlock()
  _set(config, field, value)
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config)
  assert expected in str(e.value)


@pytest.mark.parametrize('field, value, expected', [
    ('model.visual.stage_strides', (1, 2, 2), 'config.model.visual.stage_strides: has 3 entries'),
    ('input.audio.fmax', 9000.0, 'config.input.audio.fmax: is above the Nyquist'),
    ('input.augment.crop_scale', (0.9, 0.5), 'config.input.augment.crop_scale: expected (min, max)'),
    ('eval.heatmap_threshold', 0.3, 'config.eval.heatmap_threshold: must be one of'),
    ('loss.shifted_audio_negatives', 1, 'shifted_audio_negatives needs per-frame audio'),
    ('input.unscaled_window', (256, 343),
     'config.input.unscaled_window: expected (height, width), both even'),
    ('input.image_size', 223, "config.input.frame_format: 'yuv420_unscaled' needs an even image_size"),
])
def test_fields_that_do_not_fit_together(field, value, expected):
  config = _load({
      'loss.shifted_audio_negatives': 'configs/avatar_synth.py:runlocal+ezvsl',
      'input.unscaled_window': 'configs/paper.py:real+runlocal',    # unscaled 4:2:0 frames
      'input.image_size': 'configs/paper.py:real+runlocal',
  }.get(field, 'configs/avatar_synth.py:runlocal'))
  config.unlock()
  _set(config, field, value)
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(config)
  assert expected in str(e.value)


def _main(tmp_path, *overrides):
  return subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.main', '--config=configs/avatar_synth.py:runlocal',
       f'--workdir={tmp_path / "run"}', *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('override, expected', [
    ('--config.input.batch_size=-4', 'error: config.input.batch_size=-4: expected an int >= 1'),
    ('--config.model.visual.stage_sizes=abc', 'config.model.visual.stage_sizes'),
    ('--config.model.name=tavol', "did you mean 'tavlo'?"),
])
@pytest.mark.slow   # a subprocess: python and jax start-up
def test_cli_rejects_a_bad_value_in_one_line_before_any_work(tmp_path, override, expected):
  r = _main(tmp_path, override)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith('error: ')
  assert expected in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / 'run').exists()   # nothing written, no data touched
