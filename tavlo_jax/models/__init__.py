"""Models: `build_model(config)` turns the whole config into a Flax module.

  module = build_model(config)
  variables = module.init(rng, frames, audio, train=False)
  out = module.apply(variables, frames, audio, train=False)
  out, updates = module.apply(variables, frames, audio, train=True,
                              mutable=['batch_stats'])   # running means

`out` is dict(visual [B,T,h,w,D], audio [B,T,D], heatmap [B,T,h,w]); see
tavlo.py for D and the leak guard. Logical axis names used on parameters and
activations (mapped to mesh axes by tavlo_jax/sharding.py): batch, time,
space, height, width, embed, heads, head_dim, mlp, channels, mel, audio_time.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tavlo_jax.data import audio as audio_lib
from tavlo_jax.models.attention import IMPLEMENTATIONS
from tavlo_jax.models.audio_encoder import AudioEncoder, ResNetAudioEncoder
from tavlo_jax.models.resnet import ResNet, total_stride
from tavlo_jax.models.tavlo import EZVSL, TAVLO, upsample_heatmap

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


def _check(config: ml_collections.ConfigDict) -> None:
  m, v = config.model, config.model.visual
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}; expected one of '
                     f'{sorted(DTYPES)}')
  stride = total_stride(v.stem, v.stage_strides)
  if v.output_stride != stride:
    raise ValueError(
        f'config.model.visual.output_stride={v.output_stride} but stem '
        f'{v.stem!r} with stage_strides={tuple(v.stage_strides)} gives '
        f'{stride}')
  if config.input.image_size % stride:
    raise ValueError(f'config.input.image_size={config.input.image_size} is '
                     f'not a multiple of the output stride {stride}')
  # A divisor of the output stride also divides image_size (checked above).
  if m.fine_stride and (m.fine_stride >= stride or stride % m.fine_stride):
    raise ValueError(f'config.model.fine_stride={m.fine_stride}: expected 0 (maps on '
                     f'the token grid) or a divisor of the output stride {stride} '
                     'below it')
  if m.attention_impl not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention_impl={m.attention_impl!r}; '
                     f'expected one of {IMPLEMENTATIONS}')
  if m.name == 'tavlo' and (m.embed_dim + m.temporal_pos_dim) % m.num_heads:
    raise ValueError(
        f'embed_dim + temporal_pos_dim = {m.embed_dim + m.temporal_pos_dim} '
        f'must be divisible by config.model.num_heads={m.num_heads}')
  for field in ('motion_features', 'fine_motion'):
    if m.name == 'ezvsl' and m[field]:
      raise ValueError(f'config.model.{field}=True: the image-level '
                       'EZ-VSL model sees each frame alone; set it to False')
  if m.audio.arch == 'resnet18' and m.name != 'ezvsl':
    raise ValueError('config.model.audio.arch=resnet18 gives one embedding per '
                     'clip: it needs the image-level model (config.model.name='
                     f'ezvsl), not {m.name!r}')
  if m.fine_motion and not m.fine_stride:
    raise ValueError('config.model.fine_motion=True needs fine maps '
                     '(config.model.fine_stride > 0)')
  if config.loss.shifted_audio_negatives and (
      m.name != 'tavlo' or not m.per_frame_audio or m.cross_modal_attention):
    raise ValueError(
        'config.loss.shifted_audio_negatives needs per-frame audio that never '
        'sees the frames: model.name=tavlo, per_frame_audio=True, '
        f'cross_modal_attention=False (got {m.name!r}, {m.per_frame_audio}, '
        f'{m.cross_modal_attention}); set it to 0 for this model')


def _check_init_from(v: ml_collections.ConfigDict) -> None:
  """Pretrained weights fit only torchvision's ResNet-18: say so before any
  data is read or anything compiled (the loader checks every tensor too)."""
  path = v.init_from
  if not path:
    return
  if not os.path.isfile(path):
    raise ValueError(f'config.model.visual.init_from={path!r}: no such file')
  if not path.endswith(('.safetensors', '.npz', '.pth', '.pt')):
    raise ValueError(f'config.model.visual.init_from={path!r}: expected a '
                     '.safetensors or .npz file (or .pth with torch installed)')
  got = dict(stem=v.stem, width=v.width, stage_sizes=tuple(v.stage_sizes),
             stage_strides=tuple(v.stage_strides), norm=v.norm)
  want = dict(stem='imagenet', width=64, stage_sizes=(2, 2, 2, 2),
              stage_strides=(1, 2, 2, 2), norm='batch')
  if got != want:
    diff = ', '.join(f'{k}={got[k]} (need {want[k]})' for k in want
                     if got[k] != want[k])
    raise ValueError('config.model.visual.init_from needs the torchvision '
                     f'ResNet-18 shape: {diff}')


def _audio_encoder(m, dtype) -> nn.Module:
  arch = m.audio.arch
  if arch == 'tokens':
    return AudioEncoder(channels=tuple(m.audio.channels),
                        embed_dim=m.embed_dim, norm=m.audio.norm, dtype=dtype)
  if arch == 'resnet18':
    return ResNetAudioEncoder(norm=m.audio.norm, dtype=dtype)
  raise ValueError(f'config.model.audio.arch={arch!r}; expected tokens|resnet18')


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  _check(config)
  _check_init_from(config.model.visual)
  m = config.model
  dtype = DTYPES[m.dtype]
  visual = ResNet(stage_sizes=tuple(m.visual.stage_sizes), width=m.visual.width,
                  stem=m.visual.stem,
                  stage_strides=tuple(m.visual.stage_strides),
                  norm=m.visual.norm, dtype=dtype)
  audio = _audio_encoder(m, dtype)
  if m.name == 'ezvsl':
    return EZVSL(visual, audio, embed_dim=m.embed_dim, dtype=dtype,
                 center_audio=m.center_audio, fine_stride=m.fine_stride)
  if m.name != 'tavlo':
    raise ValueError(f'config.model.name={m.name!r}; expected tavlo|ezvsl')
  return TAVLO(
      visual, audio, num_frames=config.input.num_frames,
      embed_dim=m.embed_dim, temporal_pos_dim=m.temporal_pos_dim,
      num_layers=m.num_layers,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
      temporal_attention=m.temporal_attention,
      temporal_window=m.temporal_window, per_frame_audio=m.per_frame_audio,
      cross_modal_attention=m.cross_modal_attention,
      attention_impl=m.attention_impl, attention_block=m.attention_block,
      dtype=dtype,
      center_audio=m.center_audio, motion_features=m.motion_features,
      fine_stride=m.fine_stride,
      fine_motion=m.fine_motion)



def input_spec(config: ml_collections.ConfigDict, batch_size: int):
  """The model's inputs as ShapeDtypeStructs: frames uint8 [B, T, S, S, 3]
  and the spectrogram f32 [B, T * columns_per_frame, F] (F: n_mels, or the
  linear bins of `input.audio.features='log_stft'`)."""
  t, s = config.input.num_frames, config.input.image_size
  a = config.input.audio
  return (jax.ShapeDtypeStruct((batch_size, t, s, s, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch_size, t * a.columns_per_frame,
                                audio_lib.feature_bins(a)), jnp.float32))


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int):
  """Zeros of `input_spec`, e.g. for `init`."""
  return tuple(jnp.zeros(x.shape, x.dtype) for x in input_spec(config, batch_size))


def abstract_variables(config: ml_collections.ConfigDict) -> dict:
  """The model's variables as ShapeDtypeStructs (unboxed); allocates nothing."""
  model = build_model(config)
  return jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), *dummy_inputs(config, 1), train=False)))


__all__ = ['build_model', 'input_spec', 'dummy_inputs', 'abstract_variables',
           'TAVLO', 'EZVSL', 'upsample_heatmap']
