"""TFDS builder `avatar_synth`: AVATAR-Synth clips in the shared record schema.

  python -c "import tavlo_datasets.avatar_synth, tensorflow_datasets as tfds; \
tfds.builder('avatar_synth/small', data_dir='./data/tfds')\
.download_and_prepare(file_format='array_record')"

Nothing is downloaded: every record is `generator.generate_clip(cfg, split, i)`.
Read it back with `builder.as_data_source()` (no TensorFlow needed).
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing

import tensorflow_datasets as tfds

from tavlo_datasets import schema
from tavlo_datasets.avatar_synth import generator


@dataclasses.dataclass(eq=False)
class SynthBuilderConfig(tfds.core.BuilderConfig):
  """A named `generator.SynthConfig` (every knob lives there)."""
  synth: generator.SynthConfig = generator.SynthConfig()


def _config(name, description, **knobs) -> SynthBuilderConfig:
  return SynthBuilderConfig(name=name, description=description,
                            synth=generator.SynthConfig(**knobs))


BUILDER_CONFIGS = [
    _config('tiny', 'Unit tests: 32x32, 8 fps, 2 s, 4 categories, 36 clips; '
            'builds in seconds.',
            image_size=32, fps=8.0, duration_s=2.0, num_categories=4,
            num_train=12, num_validation=8, num_test=16,
            train_annotate_every_k_frames=2),
    _config('small', 'The CPU main job: 64x64, 8 fps, 4 s, 8 categories, '
            '3000/200/400 clips; builds in about a minute on 2 cores.',
            image_size=64, fps=8.0, duration_s=4.0, num_categories=8,
            num_train=3000, num_validation=200, num_test=400),
    _config('standard', 'The spec default: 128x128, 8 fps, 4 s, 8 categories, '
            '6000/400/800 clips.',
            image_size=128, fps=8.0, duration_s=4.0, num_categories=8,
            num_train=6000, num_validation=400, num_test=800),
    _config('paper', 'AVATAR-like: 224x224, 8 fps, 8 s (64 frames), 16 '
            'categories, 10000/400/800 clips; frames annotated every 4th '
            '(AVATAR has ~5 per video). Tens of GB: for a big machine.',
            image_size=224, fps=8.0, duration_s=8.0, num_categories=16,
            num_train=10000, num_validation=400, num_test=800,
            annotate_every_k_frames=4, train_annotate_every_k_frames=8),
]


def synth_config(builder_config: str) -> generator.SynthConfig:
  """The generator knobs of a named builder config, e.g. 'small'."""
  configs = {c.name: c.synth for c in BUILDER_CONFIGS}
  if builder_config not in configs:
    raise ValueError(f'unknown builder_config {builder_config!r}; expected one '
                     f'of {sorted(configs)}')
  return configs[builder_config]


class Builder(tfds.core.ShardBasedBuilder):
  """AVATAR-Synth: procedural audio-visual localisation clips, exact labels.

  A `ShardBasedBuilder`, not a `GeneratorBasedBuilder`: the latter buffers a
  whole split in memory to shuffle it and, past 1 GB, spills to disk through
  `tf.io.gfile`, which fails without TensorFlow (the `small` train split is
  ~2 GB). Shard-based generation streams each shard straight to its
  array_record file, in index order: record i of a split is clip i.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = 'small'
  CLIPS_PER_SHARD = 100     # bounds the memory TFDS holds per shard

  def __init__(self, *, num_workers: int = 1, **kwargs):
    """`num_workers` > 1 generates clips in that many processes while this one
    encodes and writes them (TFDS serialises in the calling process). Records
    do not depend on it. Pass it as `tfds.builder(..., num_workers=2)`."""
    super().__init__(**kwargs)
    self._num_workers = int(num_workers)
    self._pool = None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.synth.image_size
    return self.dataset_info_from_configs(
        features=schema.features(frame_height=size, frame_width=size,
                                 mask_height=size, mask_width=size),
        supervised_keys=None,
        homepage='https://arxiv.org/abs/2507.04667',
        metadata=tfds.core.MetadataDict(
            category_names=generator.category_names(self.builder_config.synth),
            scenarios=list(schema.SCENARIOS)),
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._pool is not None:
        self._pool.close()
        self._pool.join()
        self._pool = None

  def _shard_iterators_per_split(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config.synth
    out = {}
    for split in generator.SPLITS:
      n = cfg.num_examples(split)
      starts = range(0, n, self.CLIPS_PER_SHARD)
      out[split] = [
          functools.partial(self._generate_examples, split,
                            range(s, min(n, s + self.CLIPS_PER_SHARD)))
          for s in starts]
    return out

  def _generate_examples(self, split, indices):
    make = functools.partial(generator.generate_clip,
                             self.builder_config.synth, split)
    if self._num_workers <= 1:
      records = map(make, indices)
    else:
      if self._pool is None:
        # spawn, not fork: this process already runs TFDS/absl threads.
        self._pool = multiprocessing.get_context('spawn').Pool(self._num_workers)
      records = self._pool.imap(make, indices, chunksize=4)
    # Keys are the video ids: stable, and in index order.
    for record in records:
      yield record['video_id'], record

