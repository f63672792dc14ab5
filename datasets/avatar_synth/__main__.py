"""Builds AVATAR-Synth (the `tfds build` CLI imports TensorFlow at start-up).

  python -m tavlo_datasets.avatar_synth --config=small --data_dir=./data/tfds \
      --num_workers=2
"""

from absl import app
from absl import flags
import tensorflow_datasets as tfds

import tavlo_datasets.avatar_synth  # noqa: F401  (registers the builder)

_CONFIG = flags.DEFINE_enum('config', 'small', ['tiny', 'small', 'standard', 'paper'],
                            'Builder config.')
_DATA_DIR = flags.DEFINE_string('data_dir', './data/tfds', 'TFDS data_dir.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', 2, 'Generator processes (records do not depend on it).')


def main(argv):
  del argv
  builder = tfds.builder(f'avatar_synth/{_CONFIG.value}', data_dir=_DATA_DIR.value,
                         num_workers=_NUM_WORKERS.value)
  builder.download_and_prepare(file_format='array_record')
  print(builder.info.splits)


if __name__ == '__main__':
  app.run(main)
