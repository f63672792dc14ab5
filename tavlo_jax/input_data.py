"""From `config.dataset` to grain iterators: find (or build) the records.

The trainer and evaluator only see `Data`; which dataset sits behind it
(avatar_synth, avatar, vggsound) is a config value.
"""

from __future__ import annotations

import functools
import importlib
import os
import time

import jax
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tavlo_jax.data import pipeline


def get_builder(config, *, for_eval: bool = False) -> tfds.core.DatasetBuilder:
  """Imports `tavlo_datasets.<name>` (registers it) and returns its builder.

  `for_eval`: the evaluation dataset (`dataset.eval_name`, e.g. AVATAR while
  training on VGGSound); the training one when `eval_name` is empty.
  """
  d = config.dataset
  name, builder_config = d.name, d.builder_config
  if for_eval and d.eval_name:
    name, builder_config = d.eval_name, d.eval_builder_config
  try:
    importlib.import_module(f'tavlo_datasets.{name}')
  except ModuleNotFoundError as e:
    raise ValueError(f'config.dataset: no builder package datasets/{name}/ '
                     f'for dataset {name!r} ({e})') from None
  full = f'{name}/{builder_config}' if builder_config else name
  return tfds.builder(full, data_dir=os.path.abspath(d.data_dir))


def build_command(config, builder) -> str:
  d = config.dataset
  name = builder.name
  cfg = builder.builder_config.name if builder.builder_config else ''
  manual = f' --manual_dir={d.manual_dir or "<raw files>"}' if name != 'avatar_synth' else ''
  return (f'python -m tavlo_datasets.build {name}' + (f' --config={cfg}' if cfg else '')
          + f' --data_dir={d.data_dir} --file_format=array_record{manual}')


def older_versions(builder) -> list[str]:
  """Versions of this dataset/config in its data_dir other than the code's."""
  config_dir = epath.Path(builder.data_dir).parent
  if not config_dir.is_dir():
    return []
  return sorted(d.name for d in config_dir.iterdir()
                if d.name != str(builder.version)
                and (d / 'dataset_info.json').exists())


def ensure_built(config, builder) -> None:
  """Builds synthetic data if absent (process 0; the others wait).

  A dataset built only by another version of its builder is refused (its
  records may have another layout): one line that says to rebuild.
  """
  if builder.is_prepared():
    return
  d = config.dataset
  older = older_versions(builder)
  if older and builder.name != 'avatar_synth':
    raise SystemExit(
        f'{builder.info.full_name}: {d.data_dir} holds only version(s) '
        f'{", ".join(older)} of {builder.name}/{builder.builder_config.name}, '
        f'which this code does not read (it reads {builder.version}: '
        f'{builder.RELEASE_NOTES.get(str(builder.version), "")}). Rebuild it: '
        f'{build_command(config, builder)}')
  if not (d.build_if_missing and builder.name == 'avatar_synth'):
    raise SystemExit(
        f'{builder.info.full_name} is not built in {d.data_dir}. Build it with:\n'
        f'  {build_command(config, builder)}')
  if jax.process_index() == 0:
    logging.info('Building %s into %s with %d clip-generating processes (once; '
                 'later runs reuse it) ...', builder.info.full_name, d.data_dir,
                 d.build_workers)
    t0 = time.perf_counter()
    # Workers generate clips while this process encodes and writes them; the
    # records do not depend on the number of workers (test_avatar_synth.py).
    builder = tfds.builder(f'{builder.name}/{builder.builder_config.name}',
                           data_dir=builder.data_dir_root,
                           num_workers=max(1, int(d.build_workers)))
    builder.download_and_prepare(file_format='array_record')
    logging.info('Built %s in %.0f s.', builder.info.full_name, time.perf_counter() - t0)
  multihost_utils.sync_global_devices('tavlo_jax.input_data.ensure_built')


class Data:
  """Data sources of one dataset and the pipelines over them."""

  def __init__(self, config, train_builder, eval_builder):
    self.config = config
    self.train_builder = train_builder
    self.eval_builder = eval_builder

  @staticmethod
  def _source(builder, split: str):
    if split not in builder.info.splits:
      raise ValueError(f'{builder.info.full_name} has no split {split!r}; '
                       f'it has {sorted(builder.info.splits)}')
    return builder.as_data_source(split=split)

  def train_iterator(self):
    src = self._source(self.train_builder, self.config.dataset.train_split)
    return pipeline.make_train_iterator(self.config, src)

  @functools.cache  # pylint: disable=method-cache-max-size-none
  def eval_batches(self, split: str) -> pipeline.EvalBatches:
    src = self._source(self.eval_builder, split)
    return pipeline.make_eval_batches(self.config, src,
                                      windows=pipeline.plan_eval_windows(self.config, src))

  def category_names(self) -> list[str] | None:
    """Category index -> name of the eval dataset, from its builder's metadata
    (avatar_synth: 'category_names', avatar: 'categories'); None if absent."""
    meta = self.eval_builder.info.metadata or {}
    names = meta.get('category_names') or meta.get('categories')
    return list(names) if names else None

  def has_split(self, split: str) -> bool:
    return bool(split) and split in self.eval_builder.info.splits


def prepare(config, workdir: str | None = None) -> Data:
  del workdir
  builders = []
  for for_eval in (False, True):
    builder = get_builder(config, for_eval=for_eval)
    ensure_built(config, builder)
    builders.append(get_builder(config, for_eval=for_eval))  # re-read split info
  return Data(config, *builders)


def eval_only_data(config, dataset: str) -> tuple[Data | None, str]:
  """Data for scoring on `dataset` ('name/builder_config', e.g. 'vggss/default'),
  or (None, why) when it cannot: not built in config.dataset.data_dir, or no
  such builder. Never builds: real test sets come from a deliberate build."""
  name, _, builder_config = dataset.partition('/')
  try:
    importlib.import_module(f'tavlo_datasets.{name}')
    version = str(tfds.builder_cls(name).VERSION)
  except (ModuleNotFoundError, tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    return None, f'no builder {dataset!r} ({e})'
  full_name = '/'.join(p for p in (name, builder_config, version) if p)
  # Looked up before tfds.builder, which warns about a missing dataset_info.json
  # each time it is asked for a dataset that is not built.
  if not os.path.exists(os.path.join(os.path.abspath(config.dataset.data_dir), full_name,
                                     'dataset_info.json')):
    return None, (f'{full_name} is not built in {config.dataset.data_dir}; '
                  f'build it with: python -m tavlo_datasets.build {name}'
                  + (f' --config={builder_config}' if builder_config else '')
                  + f' --data_dir={config.dataset.data_dir} --file_format=array_record'
                  f' --manual_dir=<its raw files>')
  builder = tfds.builder(dataset, data_dir=os.path.abspath(config.dataset.data_dir))
  return Data(config, None, builder), ''

