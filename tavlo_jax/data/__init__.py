"""Input pipeline: TFDS records -> aligned, augmented, sharded batches.

  audio.py     log-mel (librosa on the host / jnp.fft on device), alignment
  sampling.py  which frames and audio samples a clip holds; eval windows
  augment.py   per-clip video augmentation, SpecAugment
  pipeline.py  grain pipelines, eval padding, global arrays
"""

from tavlo_jax.data.audio import audio_features, log_mel_jnp, log_mel_np
from tavlo_jax.data.pipeline import (EvalBatches, make_eval_batches,
                                     make_global_batch, make_train_dataset,
                                     make_train_iterator, plan_eval_windows)
