"""Audio encoder: log-mel [B, T*C, M] -> one token per video frame [B, T, Df].

The spectrogram is cut into T blocks of C = floor(W/T) columns (block t is
centred on frame t, see WORKSPACE "Audio alignment"; columns past T*C are
dropped). Every conv runs on the block axis as a batch axis ([B, T, C, M, ch]
with Flax's leading batch dims), so its zero 'SAME' padding sits at the block
edges and no kernel ever reads a neighbouring frame's columns. The earlier
convs keep the time resolution and halve the mel axis; the last conv's kernel
spans the whole block (C columns x the remaining mel bins) with that stride,
which leaves exactly one position per block: token t is computed from frame
t's columns only.

The one exception is GroupNorm (the CPU default): its statistics are taken per
clip over all blocks, so the absolute loudness of a frame survives (per-block
statistics would turn a silent frame into amplified noise). Token t therefore
depends on the other frames only through two scalars per group. With
BatchNorm in eval mode (running statistics) the locality is exact.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tavlo_jax.models.resnet import ResNet, norm_layer

AUDIO_AXES = ('batch', 'time', 'audio_time', 'mel', 'channels')


def split_into_frame_blocks(audio, num_frames: int):
  """[B, W, M] -> [B, T, C, M] with C = W // T (trailing columns dropped)."""
  if audio.ndim != 3:
    raise ValueError(f'audio must be a log-mel [B, T*C, M]; got shape '
                     f'{audio.shape}')
  b, width, mels = audio.shape
  cols = width // num_frames
  if cols < 1:
    raise ValueError(f'audio has {width} columns, fewer than the {num_frames} '
                     'frames (config.input.audio.columns_per_frame)')
  return audio[:, :num_frames * cols].reshape(b, num_frames, cols, mels)


class AudioEncoder(nn.Module):
  channels: Sequence[int] = (32, 64)   # widths of the per-block 3x3 convs
  embed_dim: int = 64                  # Df
  norm: str = 'group'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, num_frames: int, train: bool):
    x = split_into_frame_blocks(audio.astype(self.dtype), num_frames)[..., None]
    x = nn.with_logical_constraint(x, AUDIO_AXES)
    for i, width in enumerate(self.channels):
      x = nn.Conv(
          width, (3, 3), strides=(1, 2), padding='SAME', use_bias=False,
          dtype=self.dtype, name=f'conv{i + 1}',
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
              (None, None, None, 'channels')))(x)
      # image_axes=4: statistics over one clip's (T, C, M) and channel group.
      x = norm_layer(self.norm, train, width, dtype=self.dtype, image_axes=4,
                     name=f'norm{i + 1}')(x)
      x = nn.with_logical_constraint(nn.relu(x), AUDIO_AXES)
    cols, mels = x.shape[-3:-1]
    x = nn.Conv(
        self.embed_dim, (cols, mels), strides=(cols, mels), padding='VALID',
        dtype=self.dtype, name='token_conv',
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, 'channels', 'embed')),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ('embed',)))(x)
    tokens = x.reshape(x.shape[0], num_frames, self.embed_dim)
    return nn.with_logical_constraint(tokens, ('batch', 'time', 'embed'))


class ResNetAudioEncoder(nn.Module):
  """EZ-VSL's audio branch: the whole clip's spectrogram [B, W, F] ->
  [B, T, C], one clip embedding tiled over the T frames.

  A ResNet-18 (torchvision's layout, 1-channel 7x7/2 stem + max pool, widths
  64..512) over the spectrogram as a 1-channel image of F rows (frequency)
  and W columns (time), as EZ-VSL feeds torch [B, 1, F, W]; then the maximum
  over all positions (its AdaptiveMaxPool2d), no fc. C = 8 * width (512);
  the image-level model's `audio_proj` is EZ-VSL's aud_proj. The embedding
  sees the whole clip, so it suits the image-level model only.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  norm: str = 'batch'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, audio, num_frames: int, train: bool):
    if audio.ndim != 3:
      raise ValueError(f'audio must be a spectrogram [B, W, F]; got shape '
                       f'{audio.shape}')
    # [B, W, F] -> one image per clip, [B, 1, F, W, 1] (the ResNet's T = 1).
    image = jnp.swapaxes(audio.astype(self.dtype), 1, 2)[:, None, :, :, None]
    feats = ResNet(stage_sizes=tuple(self.stage_sizes), width=self.width,
                   stem='imagenet', stage_strides=(1,) + (2,) * (
                       len(self.stage_sizes) - 1),
                   norm=self.norm, dtype=self.dtype, name='resnet')(image, train)
    pooled = feats.max(axis=(2, 3))                       # [B, 1, C]
    return jnp.broadcast_to(pooled, (audio.shape[0], num_frames,
                                     pooled.shape[-1]))
