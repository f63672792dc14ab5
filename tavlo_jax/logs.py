"""The console filter: library chatter stays out of what a user reads."""

from __future__ import annotations

import logging

# Sources of INFO narration a user never needs (every Orbax save/restore,
# JAX's backend probing, TFDS's 'Load dataset info from ...' per builder).
NOISY = ('orbax', 'checkpoint_manager', 'async_checkpointer', 'xla_bridge',
         'dataset_info.py')


class QuietLibraries(logging.Filter):
  """Drops records of the NOISY sources below `level`; keeps everything else.

  `main` keeps their warnings (`level='warning'`); a one-shot tool such as
  `localize` drops them too (`level='error'`): Orbax warns about a metadata
  file that TrainState checkpoints never have.
  """

  def __init__(self, level: str = 'warning'):
    super().__init__()
    self.level = logging.getLevelName(level.upper())

  def filter(self, record):
    if record.levelno >= self.level:
      return True
    return not any(n in record.pathname for n in NOISY)
