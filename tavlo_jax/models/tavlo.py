"""TAVLO (video-level) and the EZ-VSL-style image-level baseline.

Both map (frames uint8 [B, T, S, S, 3], log-mel [B, T*C, M]) to
  visual  [B, T, h, w, D]  L2-normalised
  audio   [B, T, D]        L2-normalised
  heatmap [B, T, h, w]     cosine(audio_t, visual_t,y,x) in [-1, 1]
(no temperature: that belongs to the loss, and evaluation only ranks pixels).

TAVLO: D = Df + Dt. The temporal code is concatenated (as in the paper) and
the tokens stay D wide through the AST blocks and the output heads: no
projection back to Df, which would only mix the code into the features.

Leak guard. With cross_modal_attention=False the spatial
step lets the audio token attend only to itself and the visual tokens only to
visual tokens; the temporal step attends along one token position (the audio
token is its own position) and the MLP is per token. The visual tokens then
never depend on the audio, so the contrastive task can only be solved by the
similarity map. cross_modal_attention=True is the paper's joint
[audio ; visual] attention, where a clip's own audio can leak into its
visual tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tavlo_jax.models.attention import MultiHeadAttention, window_or_none
from tavlo_jax.models.audio_encoder import AudioEncoder
from tavlo_jax.models.resnet import ResNet, conv, norm_layer

TOKEN_AXES = ('batch', 'time', 'space', 'embed')
LOCAL_WIDTH = 32                 # channels of LocalFeatures (fine maps)
# torchvision's ImageNet statistics, so converted pretrained weights see the
# inputs they were trained on.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_frames(frames, dtype):
  if frames.dtype != jnp.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
    raise ValueError('frames must be uint8 [B, T, S, S, 3]; got '
                     f'{frames.dtype} {frames.shape}')
  x = frames.astype(jnp.float32) / 255.0
  x = (x - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
  return x.astype(dtype)


def l2_normalize(x, eps: float = 1e-3):
  # Embeddings have norms ~sqrt(D); eps only matters for a (near-)zero vector,
  # e.g. a centred audio embedding that equals the batch mean, which must stay
  # ~0 rather than blow float32 round-off up to a unit vector.
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_heatmap(visual, audio):
  """visual [B,T,h,w,D], audio [B,T,D], both unit norm -> [B,T,h,w]."""
  return jnp.clip(jnp.einsum('bthwd,btd->bthw', visual, audio), -1.0, 1.0)


def _dense(features, name, axes, dtype):
  return nn.Dense(
      features, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             (axes[-1],)))


def _layer_norm(name, dtype):
  return nn.LayerNorm(
      dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Mlp(nn.Module):
  ratio: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = _dense(width * self.ratio, 'fc1', ('embed', 'mlp'), self.dtype)(x)
    y = nn.with_logical_constraint(nn.gelu(y),
                                   ('batch', 'time', 'space', 'mlp'))
    return _dense(width, 'fc2', ('mlp', 'embed'), self.dtype)(y)


class ASTBlock(nn.Module):
  """Pre-norm divided attention: spatial (per frame), temporal, MLP.

  Tokens [B, T, 1+N, D]; position 0 of the token axis is the audio token.
  """
  num_heads: int
  mlp_ratio: int
  temporal_attention: bool
  temporal_window: int            # +-k frames; -1 whole clip
  cross_modal_attention: bool
  attention_impl: str
  attention_block: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    mha = lambda axis, name: MultiHeadAttention(
        self.num_heads, axis, self.attention_impl, self.attention_block,
        self.dtype, name=name)
    num_tokens = x.shape[2]
    segments = None
    if not self.cross_modal_attention:
      segments = jnp.arange(num_tokens) > 0     # audio: 0, visual: 1
      segments = segments.astype(jnp.int32)
    y = _layer_norm('spatial_norm', self.dtype)(x)
    x = x + mha('space', 'spatial_attention')(y, segment_ids=segments)
    if self.temporal_attention:
      window = window_or_none(self.temporal_window, x.shape[1])
      y = _layer_norm('temporal_norm', self.dtype)(x)
      x = x + mha('time', 'temporal_attention')(y, window=window)
    y = _layer_norm('mlp_norm', self.dtype)(x)
    x = x + Mlp(self.mlp_ratio, self.dtype, name='mlp')(y)
    return nn.with_logical_constraint(x, TOKEN_AXES)


class TAVLO(nn.Module):
  """Video-level audio-visual localiser (per-frame audio tokens + AST)."""
  visual_encoder: ResNet
  audio_encoder: AudioEncoder
  num_frames: int                  # T of the config: size of learned codes
  embed_dim: int = 64              # Df
  temporal_pos_dim: int = 16       # Dt
  num_layers: int = 1
  num_heads: int = 4
  mlp_ratio: int = 2
  temporal_attention: bool = True
  temporal_window: int = 2
  per_frame_audio: bool = True
  cross_modal_attention: bool = False
  attention_impl: str = 'xla'
  attention_block: int = 128
  dtype: jnp.dtype = jnp.float32
  center_audio: bool = True
  motion_features: bool = False
  fine_stride: int = 0             # 0: map on the token grid; else LocalFeatures' stride
  fine_motion: bool = False        # the fine features' change since the previous frame too

  def _codes(self, name, length, dim):
    """A learned [length, dim] position table."""
    table = self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                           (None, 'embed')), (length, dim))
    return table.astype(self.dtype)

  @nn.compact
  def __call__(self, frames, audio, train: bool = False, audio_shifts=None):
    """audio_shifts: optional int [K, B]. For each row k, clip b's audio
    tokens are rolled by audio_shifts[k, b] frames and sent through the audio
    path again, giving `shifted_audio` [K, B, T, D]: the clip's own sound, out
    of sync with its frames (hard negatives for the loss; see
    tavlo_jax/losses.py "Out-of-sync negatives")."""
    b, t = frames.shape[:2]
    x_frames = normalize_frames(frames, self.dtype)
    feats = self.visual_encoder(x_frames, train)              # [B,T,h,w,C]
    h, w = feats.shape[2:4]
    if self.motion_features:
      feats = with_motion(feats)                              # [B,T,h,w,3C]
    visual = _dense(self.embed_dim, 'visual_proj', ('channels', 'embed'),
                    self.dtype)(feats).reshape(b, t, h * w, self.embed_dim)
    spatial = self._codes('spatial_pos', h * w, self.embed_dim)
    visual = nn.with_logical_constraint(visual + spatial, TOKEN_AXES)

    tokens = self.audio_encoder(audio, t, train)              # [B,T,Df]
    if not self.per_frame_audio:
      tokens = jnp.broadcast_to(tokens.mean(1, keepdims=True), tokens.shape)

    if t > self.num_frames:
      raise ValueError(f'clip has {t} frames; the learned temporal code has '
                       f'config.input.num_frames={self.num_frames}')
    temporal = self._codes('temporal_pos', self.num_frames,
                           self.temporal_pos_dim)[:t]
    x = jnp.concatenate([tokens[:, :, None], visual], axis=2)   # [B,T,1+N,Df]
    with_code = lambda x: nn.with_logical_constraint(jnp.concatenate(
        [x, jnp.broadcast_to(temporal[None, :, None],
                             x.shape[:3] + (self.temporal_pos_dim,))], -1),
        TOKEN_AXES)
    x = with_code(x)

    # Built once, called on the full tokens and (below) on shifted audio alone.
    blocks = [ASTBlock(self.num_heads, self.mlp_ratio, self.temporal_attention,
                       self.temporal_window, self.cross_modal_attention,
                       self.attention_impl, self.attention_block, self.dtype,
                       name=f'block{i + 1}') for i in range(self.num_layers)]
    final_norm = _layer_norm('final_norm', self.dtype)
    audio_head = _dense(x.shape[-1], 'audio_head', ('embed', None), self.dtype)
    centering = AudioCentering(name='audio_centering')

    def run_blocks(x):
      for block in blocks:
        x = block(x)
      return final_norm(x)

    x = run_blocks(x)
    width = x.shape[-1]
    audio_raw = audio_head(x[:, :, 0])
    visual_out = _dense(width, 'visual_head', ('embed', None), self.dtype)(
        x[:, :, 1:]).reshape(b, t, h, w, width)
    audio_out = centering(audio_raw, train) if self.center_audio else audio_raw
    visual_out = onto_map_grid(visual_out, x_frames, self.fine_stride, train,
                               self.dtype, self.fine_motion)
    outputs = make_outputs(visual_out, audio_out)
    if audio_shifts is None:
      return outputs

    # Out-of-sync copies of the audio. With the leak guard on, the audio
    # token's path never reads a visual token (spatial attention: itself only;
    # temporal attention and MLP: per position), so running the blocks on the
    # audio token alone gives exactly what the full forward would give it.
    if self.cross_modal_attention or not self.per_frame_audio:
      raise ValueError('out-of-sync audio negatives (config.loss.'
                       'shifted_audio_negatives) need per_frame_audio=True and '
                       'cross_modal_attention=False')
    roll = jax.vmap(lambda seq, k: jnp.roll(seq, k, axis=0))
    shifted = []
    for shifts in audio_shifts:
      y = run_blocks(with_code(roll(tokens, shifts)[:, :, None]))
      y = audio_head(y[:, :, 0])
      if self.center_audio:
        # Minus what AudioCentering removed from the in-sync audio: the
        # shifted copies are centred the same way, not by their own mean.
        y = y - (audio_raw - audio_out)
      shifted.append(l2_normalize(y))
    outputs['shifted_audio'] = jnp.stack(shifted)
    return outputs


class LocalFeatures(nn.Module):
  """A patch embedding (as in ViT): one conv whose kernel is its stride, so
  each cell's features come from its own stride x stride pixels alone, then
  GroupNorm (statistics of the whole frame) and ReLU."""
  width: int
  stride: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.width, self.stride, self.stride, pad=0, dtype=self.dtype,
             name='patch_conv')(x)
    return nn.relu(norm_layer('group', train, self.width, dtype=self.dtype,
                              name='patch_norm')(x))


def place_tokens(visual, image_size: int, cell_stride: int):
  """The token grid [B, T, h, w, D] on the map's grid of `cell_stride` px
  (a bilinear resize: each token drawn at its cell's centre)."""
  h, w = visual.shape[2:4]
  out_hw = (image_size // cell_stride, image_size // cell_stride)
  if out_hw == (h, w):
    return visual
  return jax.image.resize(visual, visual.shape[:2] + out_hw + visual.shape[-1:],
                          'bilinear')


def onto_map_grid(visual, frames, fine_stride, train, dtype, motion=False):
  """Token-grid embeddings [B, T, h, w, D] -> the map's grid: fine maps
  (`add_local_features`) when fine_stride > 0, else the token grid itself."""
  if fine_stride:
    return add_local_features(visual, frames, fine_stride, train, dtype, motion)
  size = frames.shape[2]
  return place_tokens(visual, size, size // visual.shape[2])


def add_local_features(visual, frames, stride, train, dtype, motion=False):
  """Token-grid embeddings [B, T, h, w, D] -> [B, T, S/stride, S/stride, D]:
  upsampled, plus a projection of the LocalFeatures of the
  normalised frames [B, T, S, S, 3] (with `motion`, of those features and
  their change since the previous frame, `with_motion`).

  Why: the tokens see most of the frame (the ResNet's receptive field, then
  spatial attention), and the max-MIL loss only asks that SOME token near the
  source match its sound. Each category's argmax settled at a fixed mean
  offset of 0.2-0.8 cells from its object (a different one per seed), and
  nearly all pointing misses on Single-sound were next to the source
  (WORKSPACE.md, Model, "Fine maps"). Features that see only their own
  patch anchor the peak on the object.
  """
  d = visual.shape[-1]
  fine = LocalFeatures(LOCAL_WIDTH, stride, dtype, name='local_features')(frames, train)
  if motion:
    fine = with_motion(fine)
  coarse = place_tokens(visual, frames.shape[2], stride)
  return coarse + _dense(d, 'local_proj', ('channels', None), dtype)(fine)


def with_motion(feats):
  """[B, T, h, w, C] -> [B, T, h, w, 3C]: each frame's features, their change
  since the previous frame d_t = f_t - f_{t-1} (0 at t = 0) and |d_t|.

  Why: an instance acts (hops, squashes, flashes, pulses) while it sounds,
  so on Multi-entity only the CHANGE tells the sounding twin from its
  identical silent ones. Temporal attention can in principle learn a
  difference, but at the CPU budget it did not: the model without these
  features preferred the sounding twin on 62-70% of two-twin frames (chance
  50%; WORKSPACE.md, Model). Here the difference is an input of the
  projection, per location.
  """
  prev = jnp.concatenate([feats[:, :1], feats[:, :-1]], axis=1)
  delta = feats - prev
  return jnp.concatenate([feats, delta, jnp.abs(delta)], axis=-1)


class EZVSL(nn.Module):
  """Image-level baseline: each frame alone, one audio embedding per clip.

  No position codes and no attention: frame t's visual tokens depend on
  frame t only, and the audio encoder's per-frame tokens are averaged over
  the whole clip into one embedding, tiled over T. D = Df.
  """
  visual_encoder: ResNet
  audio_encoder: AudioEncoder
  embed_dim: int = 64
  dtype: jnp.dtype = jnp.float32
  center_audio: bool = True
  fine_stride: int = 0             # as TAVLO's: the same map resolution for both

  @nn.compact
  def __call__(self, frames, audio, train: bool = False):
    t = frames.shape[1]
    x_frames = normalize_frames(frames, self.dtype)
    feats = self.visual_encoder(x_frames, train)
    visual = _dense(self.embed_dim, 'visual_proj', ('channels', 'embed'),
                    self.dtype)(feats)
    visual = onto_map_grid(visual, x_frames, self.fine_stride, train,
                           self.dtype)
    clip_audio = self.audio_encoder(audio, t, train).mean(1)
    clip_audio = _dense(self.embed_dim, 'audio_proj', ('embed', None),
                        self.dtype)(clip_audio)
    if self.center_audio:
      clip_audio = AudioCentering(name='audio_centering')(clip_audio, train)
    return make_outputs(
        visual, jnp.broadcast_to(clip_audio[:, None],
                                 (frames.shape[0], t, self.embed_dim)))


class AudioCentering(nn.Module):
  """Subtracts the mean audio embedding: of the batch in training, a running
  mean of those at eval (BatchNorm's bookkeeping, without the scaling).

  Why (inverted maps): the contrastive loss only compares
  audios against each other, so any part of the map that is the same for
  every audio, v . E[a], costs nothing and drifts freely; in our runs it grew
  into an "objects are cold" pattern that explained ~85% of every map and put
  the minimum on the source. With the mean removed the map is
  v . (a - E[a]): only what the clip's own audio adds, which the loss
  rewards where the source is.
  """
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    # One mean per frame position ([B, T, D] -> [T, D]): the temporal code
    # makes frame t's audio tokens share a part that other frames lack.
    running = self.variable('batch_stats', 'mean', jnp.zeros, x.shape[1:],
                            jnp.float32)
    if train:
      # Under jit with a sharded batch this is the mean of the GLOBAL batch
      # (XLA adds the all-reduce).
      mean = x.astype(jnp.float32).mean(axis=0)
      if not self.is_initializing():
        running.value = (self.momentum * running.value
                         + (1 - self.momentum) * jax.lax.stop_gradient(mean))
    else:
      mean = running.value
      if x.shape[1:] != mean.shape:
        if x.ndim != 3 or x.shape[1] > mean.shape[0] or x.shape[2:] != mean.shape[1:]:
          raise ValueError(f'audio tokens {x.shape[1:]} do not fit the running '
                           f'mean {mean.shape} (config.input.num_frames)')
        mean = mean[:x.shape[1]]
    return x - mean.astype(x.dtype)


def make_outputs(visual, audio):
  visual, audio = l2_normalize(visual), l2_normalize(audio)
  visual = nn.with_logical_constraint(
      visual, ('batch', 'time', 'height', 'width', 'embed'))
  audio = nn.with_logical_constraint(audio, ('batch', 'time', 'embed'))
  return dict(visual=visual, audio=audio, heatmap=cosine_heatmap(visual, audio))



def upsample_heatmap(heatmap, size, method: str = 'bilinear'):
  """[..., h, w] -> [..., H, W] (size = (H, W)) with jax.image.resize.

  Bilinear interpolation keeps values in the input's [min, max] range, so a
  cosine map stays in [-1, 1].
  """
  size = tuple(int(s) for s in size)
  return jax.image.resize(heatmap, heatmap.shape[:-2] + size, method=method)
