"""What a builder does with a bad input file: stop with a clear error, or skip it.

Every problem found in a raw file (a corrupt mp4, a JSON that does not parse, a
polygon outside the frame, ...) is raised as a `BadExample` naming the file, the
kind of problem and what was expected. The builder config's `on_bad_example`
decides what happens next:

  'raise' (default)  the build stops with that error. TFDS writes into a
                     temporary `incomplete.*` directory and renames it only on
                     success, so a failed build leaves nothing a later run (or
                     `builder.is_prepared()`) would mistake for a dataset.
  'skip'             the example (the whole video record) is left out, a
                     warning is logged, and it is counted in
                     `<data_dir>/<name>/<config>/<version>/bad_examples.json`,
                     written next to the dataset's own `dataset_info.json`.

Why one small JSON file per skipped example (`SkipLog.record`) and a merge at the
end (`SkipLog.write_summary`): under Apache Beam the examples are processed by
worker processes (possibly on other machines) that share no memory with the
builder, but all of them can write into the dataset's temporary directory.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Iterator

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

ON_BAD_EXAMPLE = ('raise', 'skip')
SUMMARY_FILE = 'bad_examples.json'
_PARTS_DIR = 'bad_examples.parts'

# The kinds of problem the builders detect (the `kind` of a BadExample).
KINDS = (
    'corrupt_video',     # mp4 that does not open or decode, or is truncated
    'no_video',          # mp4 without a video stream
    'no_audio',          # mp4 without an audio stream
    'short_audio',       # audio stream ending well before the video
    'bad_json',          # annotation file that does not parse as JSON
    'bad_xml',           # annotation file that does not parse as XML
    'missing_field',     # annotation JSON lacking a field or with a bad value
    'polygon_outside',   # a polygon entirely outside the frame
    'frame_outside',     # an annotated frame past the end of the video
    'missing_video',     # annotations (or an id list entry) without an mp4
    'duplicate_id',      # two different source files claim the same id
)


class BadExample(ValueError):
  """A raw input file the builder cannot turn into a correct example."""

  def __init__(self, path, kind: str, problem: str, example_id: str = ''):
    if kind not in KINDS:
      raise ValueError(f'unknown bad-example kind {kind!r}; expected one of '
                       f'{KINDS}')
    self.path = os.fspath(path)
    self.kind = kind
    self.problem = problem
    self.example_id = example_id
    super().__init__(f'{self.path}: {kind}: {problem}')

  def to_json(self) -> dict:
    return {'id': self.example_id, 'file': self.path, 'kind': self.kind,
            'problem': self.problem}


def check_policy(policy: str) -> str:
  if policy not in ON_BAD_EXAMPLE:
    raise ValueError(f'on_bad_example={policy!r}; expected one of '
                     f'{ON_BAD_EXAMPLE}')
  return policy


class SkipLog:
  """Applies the `on_bad_example` policy; records skips under `directory`.

  Picklable (plain strings only), so Beam workers carry it along.
  """

  def __init__(self, directory: epath.PathLike, policy: str):
    self.directory = os.fspath(directory)
    self.policy = check_policy(policy)

  @property
  def _parts(self) -> epath.Path:
    return epath.Path(self.directory) / _PARTS_DIR

  def handle(self, error: BadExample) -> None:
    """Raises `error` under 'raise'; records it under 'skip'."""
    if self.policy == 'raise':
      raise error
    logging.warning('Skipping bad example (on_bad_example=skip): %s', error)
    self._parts.mkdir(parents=True, exist_ok=True)
    # Named by content: a Beam retry of the same example overwrites its record
    # instead of counting it twice.
    text = json.dumps(error.to_json(), sort_keys=True)
    name = hashlib.sha1(text.encode()).hexdigest()[:20] + '.json'
    (self._parts / name).write_text(text)

  def write_summary(self) -> epath.Path:
    """Merges the per-example records into `SUMMARY_FILE`; returns its path."""
    records = []
    if self._parts.exists():
      for part in sorted(self._parts.iterdir()):
        records.append(json.loads(part.read_text()))
      self._parts.rmtree()
    records.sort(key=lambda r: (r['id'], r['file'], r['kind'], r['problem']))
    summary = {
        'on_bad_example': self.policy,
        'num_skipped': len(records),
        'by_kind': dict(sorted(
            collections.Counter(r['kind'] for r in records).items())),
        'skipped': records,
    }
    path = epath.Path(self.directory) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=1))
    if records:
      # `path` is still in the temporary dir; name the file, not the path.
      logging.warning('%d bad examples skipped %s; listed in %s next to the '
                      "dataset's dataset_info.json", len(records),
                      summary['by_kind'], SUMMARY_FILE)
    return path


def read_summary(dataset_dir: epath.PathLike) -> dict:
  """The summary of a built dataset (`builder.data_dir`)."""
  return json.loads((epath.Path(dataset_dir) / SUMMARY_FILE).read_text())


def _process_or_skip(item, *, process, skip_log: SkipLog) -> Iterator[Any]:
  try:
    # Materialised first, so a problem found late never leaves a partial item.
    examples = list(process(item))
  except BadExample as e:
    skip_log.handle(e)
    return
  yield from examples


class RobustBuilderMixin:
  """Skip policy, summary and optional Apache Beam for a GeneratorBasedBuilder.

  Put it before `tfds.core.GeneratorBasedBuilder` in the bases; the builder
  config needs an `on_bad_example` field. In `_generate_examples`, return
  `self.examples(items, process)`: `process(item)` turns one picklable item
  into `(key, example)` pairs or raises `BadExample`. Without Beam it runs
  here, one item after the other; when the build was given Beam options or a
  runner (`tfds build --beam_pipeline_options=...`) it becomes
  `beam.Create(items) | Reshuffle | FlatMap(process)` on the workers.
  """

  def skip_log(self) -> SkipLog:
    # `self.data_dir` is TFDS's temporary `incomplete.*` dir during a build,
    # so the summary lands in the dataset only if the build succeeds.
    return SkipLog(self.data_dir, self.builder_config.on_bad_example)

  def _create_builder_config(self, builder_config, version):
    # TFDS refuses a custom config named like a registered one. Allow it when
    # only the policy differs, so `--config '{"name": "default",
    # "on_bad_example": "skip"}'` builds the `default` dataset, skipping.
    if isinstance(builder_config, tfds.core.BuilderConfig):
      registered = self.get_builder_config(name=builder_config.name,
                                           version=builder_config.version)
      if registered is not None and registered is not builder_config:
        ignore = {'on_bad_example', 'description', 'tags'}
        if all(getattr(registered, f.name) == getattr(builder_config, f.name)
               for f in dataclasses.fields(registered)
               if f.name not in ignore):
          return dataclasses.replace(
              registered, on_bad_example=builder_config.on_bad_example)
    return super()._create_builder_config(builder_config, version)

  def _download_and_prepare(self, dl_manager, download_config):
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    super()._download_and_prepare(dl_manager, download_config)
    self.skip_log().write_summary()

  def examples(self, items: Iterable[Any],
               process: Callable[[Any], Iterable[Any]]):
    fn = functools.partial(_process_or_skip, process=process,
                           skip_log=self.skip_log())
    if getattr(self, '_use_beam', False):
      beam = tfds.core.lazy_imports.apache_beam
      return (beam.Create(list(items)) | beam.Reshuffle()
              | beam.FlatMap(fn))
    return (example for item in items for example in fn(item))
