"""TAVLO / EZ-VSL models: shapes, time alignment, mixing, leak guard, kernels."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import avatar_synth
from tavlo_jax import config_lib
from tavlo_jax import losses
from tavlo_jax.evaluation import reference
from tavlo_jax.models import build_model, upsample_heatmap
from tavlo_jax.models import attention
from tavlo_jax.models import convert_torch
from tavlo_jax.models.audio_encoder import AudioEncoder
from tavlo_jax.models.resnet import ResNet
from tavlo_jax.models.resnet import max_pool_3x3_stride_2
from tavlo_jax.models import tavlo as tavlo_lib
from tavlo_jax.models.tavlo import AudioCentering

VARIANTS = ('', 'runlocal', 'ezvsl', 'no_temporal', 'global_audio', 'mean_neg')
LOGICAL_NAMES = {'batch', 'time', 'space', 'height', 'width', 'embed', 'heads',
                 'head_dim', 'mlp', 'channels', 'mel', 'audio_time'}


def tiny_config(variant='runlocal', **model):
  c = avatar_synth.get_config(variant)
  c.input.num_frames, c.input.image_size = 6, 16
  c.input.audio.columns_per_frame, c.input.audio.n_mels = 4, 8
  c.model.embed_dim, c.model.temporal_pos_dim, c.model.num_heads = 8, 4, 2
  c.model.visual.width, c.model.audio.channels = 4, (4,)
  c.model.visual.stem = 'small'                    # 3x3/1 stem: the stride comes from the stages
  c.model.visual.stage_sizes, c.model.visual.stage_strides = (1, 1), (2, 2)
  c.model.visual.output_stride = 4                      # 16 px -> 4x4 grid
  # The paper's model: the synthetic default's motion features would widen
  # what a frame reaches by one frame (tested on their own below).
  c.model.motion_features, c.loss.shifted_audio_negatives = False, 0
  c.model.fine_stride = 0                          # maps on the token grid (fine maps: below)
  c.model.fine_motion = False                      # needs fine maps (tested below)
  for k, v in model.items():
    c.model[k] = v
  return c


def inputs(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  t, s = config.input.num_frames, config.input.image_size
  cols, mels = config.input.audio.columns_per_frame, config.input.audio.n_mels
  frames = rng.integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8)
  audio = rng.normal(size=(batch, t * cols, mels)).astype(np.float32)
  return jnp.asarray(frames), jnp.asarray(audio)


def _param_structure(config):
  """The config fields that change the parameters (not windows, kernels,
  or the leak guard), so tests can share one initialisation."""
  m = config.model
  return (m.name, m.num_layers, m.temporal_attention, m.visual.norm,
          m.audio.norm, m.center_audio, m.motion_features, m.fine_stride,
          m.fine_motion,
          config.input.num_frames)


_VARIABLES = {}


def init_key(seed=0):
  # 'rbg' keys: XLA:CPU compiles an init with threefry keys ~5x slower (40 s
  # vs 9 s for the tiny model) and the tests do not care which generator.
  return jax.random.key(seed, impl='rbg')


def init_and_apply(config, frames, audio):
  """(variables, jitted eval apply); initialises once per parameter layout."""
  model = build_model(config)
  key = _param_structure(config) + (frames.shape, audio.shape)
  if key not in _VARIABLES:
    _VARIABLES[key] = nn.meta.unbox(
        jax.jit(functools.partial(model.init, train=False))(
            init_key(), frames, audio))
  return _VARIABLES[key], jax.jit(functools.partial(model.apply, train=False))


@pytest.mark.parametrize('variant', VARIANTS)
def test_output_shapes_for_every_variant(variant):
  c = avatar_synth.get_config(variant)
  frames, audio = inputs(c, batch=1)
  model = build_model(c)
  out = jax.eval_shape(
      lambda f, a: model.init_with_output(jax.random.key(0), f, a)[0],
      frames, audio)
  t, s = c.input.num_frames, c.input.image_size
  stride = c.model.fine_stride or c.model.visual.output_stride
  d = c.model.embed_dim + (c.model.temporal_pos_dim if c.model.name == 'tavlo'
                           else 0)
  g = s // stride
  assert out['visual'].shape == (1, t, g, g, d)
  assert out['audio'].shape == (1, t, d)
  assert out['heatmap'].shape == (1, t, g, g)
  assert all(x.dtype == jnp.float32 for x in out.values())


def test_outputs_are_unit_vectors_and_cosine_maps():
  c = tiny_config()
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  out = apply(variables, frames, audio)
  np.testing.assert_allclose(np.linalg.norm(out['visual'], axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out['audio'], axis=-1), 1, atol=1e-5)
  expect = np.einsum('bthwd,btd->bthw', out['visual'], out['audio'])
  np.testing.assert_allclose(out['heatmap'], expect, atol=1e-5)
  assert np.abs(out['heatmap']).max() <= 1.0


def test_config_errors_name_the_field():
  c = tiny_config()
  c.model.visual.output_stride = 8
  with pytest.raises(ValueError, match='output_stride'):
    build_model(c)
  c = tiny_config(num_heads=5)
  with pytest.raises(ValueError, match='num_heads'):
    build_model(c)
  for fine in (3, 4):                  # not a divisor of 4 / not below it
    with pytest.raises(ValueError, match='fine_stride'):
      build_model(tiny_config(fine_stride=fine))
  c = tiny_config()
  frames, audio = inputs(c)
  with pytest.raises(ValueError, match='uint8'):
    build_model(c).init(jax.random.key(0), frames.astype(jnp.float32), audio)


# --- audio encoder ------------------------------------------------------------


@pytest.mark.parametrize('norm', ['batch', 'group'])
def test_audio_encoder_one_token_per_frame_and_click_moves_peak(norm):
  t, cols, mels = 5, 6, 8
  enc = AudioEncoder(channels=(4, 8), embed_dim=6, norm=norm)
  # 2 extra columns beyond T*C are dropped (floor(W/T) columns per token).
  silent = jnp.zeros((1, t * cols + 2, mels))
  variables = jax.jit(lambda k, a: enc.init(k, a, t, train=False))(
      init_key(1), silent)
  run = jax.jit(lambda a: enc.apply(variables, a, t, train=False))
  base = run(silent)
  assert base.shape == (1, t, 6)
  for frame in (1, 3):
    for col in (0, cols - 1):           # both edges of frame's block
      click = silent.at[0, frame * cols + col, 2:5].set(8.0)
      change = np.linalg.norm(run(click) - base, axis=-1)[0]
      assert np.argmax(change) == frame, (frame, col, change)
      if norm == 'batch':
        # Eval-mode BatchNorm: the receptive field is exactly the block.
        others = np.delete(change, frame)
        np.testing.assert_array_equal(others, 0.0)


# --- temporal mixing, windows, leak guard ------------------------------------------


def _perturb_frame(frames, t):
  return frames.at[:, t].set(255 - frames[:, t])


def _frames_changed(a, b):
  """Per-frame max |change| of the visual output, [T]."""
  return np.abs(np.asarray(a['visual']) - np.asarray(b['visual'])).max(
      axis=(0, 2, 3, 4))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tavlo', 'ezvsl'])
def test_temporal_attention_mixes_frames_baseline_does_not(name):
  c = tiny_config(temporal_window=-1)
  if name == 'ezvsl':
    config_lib.make_image_level(c)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  change = _frames_changed(apply(variables, frames, audio),
                           apply(variables, _perturb_frame(frames, 0), audio))
  assert change[0] > 1e-3
  if name == 'tavlo':
    assert (change[1:] > 1e-5).all(), change
  else:
    np.testing.assert_array_equal(change[1:], 0.0)


@pytest.mark.slow
def test_motion_features_are_the_change_since_the_previous_frame():
  """with_motion against numpy; in the model (no temporal attention), a
  change to frame t reaches the visual tokens of t and t + 1 only."""
  f = np.random.default_rng(1).normal(size=(2, 5, 3, 3, 4)).astype(np.float32)
  prev = np.concatenate([f[:, :1], f[:, :-1]], axis=1)
  np.testing.assert_allclose(
      np.asarray(tavlo_lib.with_motion(jnp.asarray(f))),
      np.concatenate([f, f - prev, np.abs(f - prev)], axis=-1), atol=1e-6)
  c = tiny_config(motion_features=True, temporal_attention=False)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  assert variables['params']['visual_proj']['kernel'].shape[0] == 3 * c.model.visual.width * 2
  change = _frames_changed(apply(variables, frames, audio),
                           apply(variables, _perturb_frame(frames, 2), audio))
  assert (change[2:4] > 1e-3).all(), change
  np.testing.assert_array_equal(change[[0, 1, 4, 5]], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tavlo', 'ezvsl'])
def test_fine_map_is_upsampled_tokens_plus_features_of_each_patch(name):
  """fine_stride=2 on the tiny model (token grid 4x4): the map is 8x8; its
  token part is the bilinear upsampling (float64 reference), and its local
  part sees one 2x2 pixel patch only."""
  c = tiny_config('runlocal' if name == 'tavlo' else 'runlocal+ezvsl', fine_stride=2)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  assert apply(variables, frames, audio)['heatmap'].shape == (2, 6, 8, 8)

  x = tavlo_lib.normalize_frames(frames, jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 4, 4, 8)), jnp.float32)
  fine_only = _FineOnly()
  params = nn.meta.unbox(fine_only.init(init_key(), tokens, x))
  got = np.asarray(fine_only.apply(params, tokens, x) - fine_only.apply(
      params, jnp.zeros_like(tokens), x))
  for b, t, d in [(0, 0, 0), (1, 5, 7), (0, 3, 4)]:
    tok = np.asarray(tokens[b, t, :, :, d])
    want = reference.resize(tok, (8, 8))
    np.testing.assert_allclose(got[b, t, :, :, d], want, atol=1e-5)
  # One 2x2 patch changed (rows 4-5, cols 2-3) moves the patch features at
  # cell (2, 1) only (GroupNorm then rescales them per frame).
  def patch_features(frames):
    _, state = fine_only.apply(params, tokens, frames, capture_intermediates=True,
                                 mutable=['intermediates'])
    return np.asarray(state['intermediates']['local_features']['patch_conv']['__call__'][0])
  moved = x.at[:, :, 4:6, 2:4].add(1.0)
  diff = np.abs(patch_features(moved) - patch_features(x)).max((0, 1, 4))
  assert diff.shape == (8, 8) and diff[2, 1] > 1e-3
  diff[2, 1] = 0.0
  np.testing.assert_array_equal(diff, 0.0)


class _FineOnly(nn.Module):

  @nn.compact
  def __call__(self, tokens, frames):
    return tavlo_lib.add_local_features(tokens, frames, 2, False, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize('stem,strides,size', [
    ('imagenet', (1, 2), 128), ('small', (2, 2), 32), ('imagenet', (1, 2, 2), 128)])
def test_resnet_token_i_is_centred_on_pixel_stride_times_i(stem, strides, size):
  """Torchvision padding (odd kernels, pad k//2): the pixels token i reads
  (where its gradient is nonzero; BatchNorm at eval keeps it local) form a
  window centred on pixel S i, not on its cell's centre, for every stack."""
  model = ResNet(stage_sizes=(1,) * len(strides), width=4, stem=stem,
                 stage_strides=strides, norm='batch')
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, size, size, 3))
  variables = model.init(init_key(), x, train=False)
  grid = model.apply(variables, x, train=False).shape[2]
  stride, i = size // grid, grid // 2
  grad = jax.grad(lambda x: model.apply(variables, x, train=False)[0, 0, i, i].sum())(x)
  reads = np.abs(np.asarray(grad[0, 0])).sum(-1) > 0
  rows, cols = np.nonzero(reads.any(1))[0], np.nonzero(reads.any(0))[0]
  assert rows.min() > 0 and rows.max() < size - 1      # not clipped by the image
  assert (rows.min() + rows.max()) / 2 == stride * i
  assert (cols.min() + cols.max()) / 2 == stride * i


def _routed_pool_gradient(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """float64 reference: each output's gradient g routed to its window's
  first maximum (3x3, stride 2, padding 1: torchvision's stem pool)."""
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)),
                  constant_values=-np.inf)
  out = np.zeros(padded.shape)
  for i in range(g.shape[1]):
    for j in range(g.shape[2]):
      window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(
          len(x), 9, -1)
      k = np.argmax(window, axis=1)                       # [B, C]
      b, c = np.indices(k.shape)
      np.add.at(out, (b, 2 * i + k // 3, 2 * j + k % 3, c), g[:, i, j])
  return out[:, 1:-1, 1:-1]


@pytest.mark.parametrize('shape', [(2, 12, 10, 3), (2, 7, 9, 2), (1, 1, 2, 1)])
def test_stem_max_pool_is_torchvisions(shape):
  # Values: exactly flax's reduce-window pool. Gradient: the float64 routing
  # to each window's maximum, on post-ReLU input (many exact zeros, whose
  # tied maxima get any split: the ReLU before the pool drops them).
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
  want = nn.max_pool(jnp.asarray(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  got, vjp = jax.vjp(max_pool_3x3_stride_2, jnp.asarray(x))
  np.testing.assert_array_equal(got, want)
  g = rng.standard_normal(got.shape).astype(np.float32)
  grad = np.asarray(vjp(jnp.asarray(g))[0])
  positive = x > 0
  np.testing.assert_allclose(grad[positive],
                             _routed_pool_gradient(x, g)[positive],
                             rtol=1e-6, atol=1e-6)
  # Leading axes (B, T) pass through.
  np.testing.assert_array_equal(
      max_pool_3x3_stride_2(jnp.asarray(x)[None])[0], want)


@pytest.mark.slow
@pytest.mark.parametrize('impl,layers', [('xla', 1), ('blockwise', 2)])
def test_window_limits_mixing_to_k_frames_per_layer(impl, layers):
  c = tiny_config(temporal_window=1, num_layers=layers, attention_impl=impl,
                  attention_block=2)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  change = _frames_changed(apply(variables, frames, audio),
                           apply(variables, _perturb_frame(frames, 0), audio))
  reach = 1 * layers
  assert (change[:reach + 1] > 1e-5).all(), change
  np.testing.assert_allclose(change[reach + 1:], 0.0, atol=1e-6)


@pytest.mark.parametrize('cross_modal', [False, True])
def test_leak_guard_swapping_audio_moves_the_map(cross_modal):
  c = tiny_config(cross_modal_attention=cross_modal)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  out = apply(variables, frames, audio)
  swapped = apply(variables, frames, audio[::-1])
  visual_moved = np.abs(swapped['visual'] - out['visual']).max()
  if cross_modal:
    assert visual_moved > 1e-4   # the joint attention reads the clip's audio
    return
  # Visual tokens never see the audio, the audio tokens never see the frames:
  # the swapped map is exactly the other clip's audio against these frames.
  np.testing.assert_allclose(swapped['visual'], out['visual'], atol=1e-6)
  np.testing.assert_allclose(swapped['audio'], out['audio'][::-1], atol=1e-6)
  recomputed = np.einsum('bthwd,btd->bthw', out['visual'], out['audio'][::-1])
  np.testing.assert_allclose(swapped['heatmap'], recomputed, atol=1e-5)
  assert np.abs(swapped['heatmap'] - out['heatmap']).max() > 1e-3


@pytest.mark.slow
def test_global_audio_is_one_token_tiled_over_time():
  c = tiny_config(per_frame_audio=False, temporal_attention=False)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  out = apply(variables, frames, audio)
  # Only the concatenated temporal code distinguishes the frames' audio.
  later = apply(variables, frames, jnp.roll(audio, 4, axis=1))
  np.testing.assert_allclose(later['audio'], out['audio'], atol=1e-5)


# --- determinism, eval mode, BatchNorm -------------------------------------------------


@pytest.mark.slow
def test_jit_and_eval_mode_are_deterministic_batchnorm_batch_independent():
  c = tiny_config()
  c.model.visual.norm = c.model.audio.norm = 'batch'
  frames, audio = inputs(c, batch=3)
  model = build_model(c)
  variables, apply = init_and_apply(c, frames, audio)
  assert 'batch_stats' in variables
  a, b = apply(variables, frames, audio), apply(variables, frames, audio)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  eager = apply(variables, frames[:1], audio[:1])
  # Eval mode uses running statistics: a clip's output ignores its batch.
  np.testing.assert_allclose(eager['heatmap'], a['heatmap'][:1], atol=1e-5)
  out, updates = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats']))(variables, frames, audio)
  moved = jax.tree.map(lambda x, y: np.abs(x - y).max(),
                       updates['batch_stats'], variables['batch_stats'])
  assert max(jax.tree.leaves(moved)) > 0
  assert np.isfinite(out['heatmap']).all()


def test_audio_centering_batch_mean_in_training_running_mean_at_eval():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 3, 5)) + 7.0, jnp.float32)  # big common part
  module = AudioCentering(momentum=0.9)
  variables = module.init(init_key(), x, train=False)
  np.testing.assert_array_equal(variables['batch_stats']['mean'],
                                np.zeros((3, 5)))   # one per frame position
  y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  batch_mean = np.asarray(x, np.float64).mean(0)
  np.testing.assert_allclose(np.asarray(y).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * batch_mean,
                             rtol=1e-5)
  # Eval: the running mean, whatever else is in the batch.
  y_eval = module.apply(updates, x[:1], train=False)
  np.testing.assert_allclose(y_eval, x[:1] - 0.1 * batch_mean, rtol=1e-5)
  np.testing.assert_allclose(module.apply(updates, x[:, :2], train=False),
                             x[:, :2] - 0.1 * batch_mean[:2], rtol=1e-5)
  with pytest.raises(ValueError, match='num_frames'):
    module.apply(updates, jnp.zeros((1, 4, 5)), train=False)


@pytest.mark.slow
def test_shifted_audio_is_the_model_run_on_rolled_audio():
  """Out-of-sync negatives: a shift of 0 gives the in-sync audio tokens, and
  a shift of k gives what the model makes of the spectrogram rolled by k
  frames (the audio path is per frame block, and never reads the frames), so
  the copies differ from the real thing only in timing; centred by the
  in-sync batch mean."""
  c = tiny_config()
  c.loss.shifted_audio_negatives = 2
  frames, audio = inputs(c, batch=3)
  model = build_model(c)
  variables = nn.meta.unbox(model.init(init_key(), frames, audio))
  shifts = jnp.array([[2, 3, 4], [0, 0, 0]])
  apply = functools.partial(model.apply, variables, train=True,
                            mutable=['batch_stats'])
  out, _ = apply(frames, audio, audio_shifts=shifts)
  assert out['shifted_audio'].shape == (2,) + out['audio'].shape
  np.testing.assert_allclose(out['shifted_audio'][1], out['audio'], atol=1e-5)
  cols = c.input.audio.columns_per_frame
  rolled = jnp.stack([jnp.roll(audio[i], int(k) * cols, axis=0)
                      for i, k in enumerate(shifts[0])])
  # The rolled clip's raw audio head output minus the IN-SYNC batch mean
  # (the centring), from two separate forward passes.
  def audio_head_output(a):
    _, state = apply(frames, a, capture_intermediates=True)
    return np.asarray(state['intermediates']['audio_head']['__call__'][0],
                      np.float64)
  expect = audio_head_output(rolled) - audio_head_output(audio).mean(0)
  expect /= np.linalg.norm(expect, axis=-1, keepdims=True)
  np.testing.assert_allclose(out['shifted_audio'][0], expect, atol=1e-5)


def test_shifted_audio_needs_per_frame_audio_that_never_sees_frames():
  for fields in (dict(per_frame_audio=False), dict(cross_modal_attention=True)):
    c = tiny_config(**fields)
    c.loss.shifted_audio_negatives = 1
    with pytest.raises(ValueError, match='shifted_audio_negatives'):
      build_model(c)
  c = tiny_config('ezvsl')
  c.loss.shifted_audio_negatives = 1
  with pytest.raises(ValueError, match='shifted_audio_negatives'):
    build_model(c)


def test_image_level_baseline_refuses_motion_features():
  c = tiny_config('ezvsl', motion_features=True)
  with pytest.raises(ValueError, match='motion_features'):
    build_model(c)
  with pytest.raises(ValueError, match='fine_motion'):
    build_model(tiny_config('ezvsl', fine_stride=2, fine_motion=True))
  with pytest.raises(ValueError, match='fine_motion.*fine_stride'):
    build_model(tiny_config(fine_motion=True))


@pytest.mark.slow
def test_fine_motion_adds_the_patch_features_change_since_the_previous_frame():
  """With fine_motion the local projection reads [f, f - f_prev, |...|] of the
  patch features; without temporal attention or token motion, a change to
  frame t then reaches the maps of t and t + 1 only (without it: t only)."""
  for fine_motion, reached in ((True, [2, 3]), (False, [2])):
    c = tiny_config(temporal_attention=False, fine_stride=2, fine_motion=fine_motion)
    frames, audio = inputs(c)
    variables, apply = init_and_apply(c, frames, audio)
    width = 3 * tavlo_lib.LOCAL_WIDTH if fine_motion else tavlo_lib.LOCAL_WIDTH
    assert variables['params']['local_proj']['kernel'].shape[0] == width
    change = _frames_changed(apply(variables, frames, audio),
                             apply(variables, _perturb_frame(frames, 2), audio))
    assert (change[reached] > 1e-3).all(), change
    np.testing.assert_array_equal(np.delete(change, reached), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tavlo', 'ezvsl'])
def test_audio_shared_by_every_clip_makes_no_map_in_training(name):
  """The sign safeguard: what every clip's audio has in common is removed, so
  the same audio for every clip of the batch leaves nothing to localise
  (without centring it would still paint a map)."""
  c = tiny_config('' if name == 'tavlo' else 'ezvsl')
  frames, audio = inputs(c, batch=3)
  same = jnp.broadcast_to(audio[:1], audio.shape)
  model = build_model(c)
  variables, _ = init_and_apply(c, frames, same)
  out, _ = model.apply(variables, frames, same, train=True,
                       mutable=['batch_stats'])
  assert np.abs(np.asarray(out['heatmap'])).max() < 1e-2
  c.model.center_audio = False
  variables, _ = init_and_apply(c, frames, same)
  out = build_model(c).apply(variables, frames, same, train=True)
  assert np.abs(np.asarray(out['heatmap'])).max() > 0.1


# --- attention kernels -----------------------------------------------------------------


def _reference_attention(q, k, v, window, segments, ct=None):
  """float64 numpy attention; with a cotangent ct also its VJP (dq, dk, dv)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = 1 / math.sqrt(q.shape[-1])
  s = np.einsum('nqhd,nkhd->nhqk', q, k) * scale
  pos = np.arange(q.shape[1])
  ok = np.ones((len(pos), len(pos)), bool)
  if window >= 0:
    ok &= np.abs(pos[:, None] - pos[None]) <= window
  if segments is not None:
    ok &= segments[:, None] == segments[None]
  s = np.where(ok, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('nhqk,nkhd->nqhd', p, v)
  if ct is None:
    return out
  ct = np.asarray(ct, np.float64)
  dv = np.einsum('nhqk,nqhd->nkhd', p, ct)
  dp = np.einsum('nqhd,nkhd->nhqk', ct, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))     # softmax Jacobian
  dq = np.einsum('nhqk,nkhd->nqhd', ds, k) * scale
  dk = np.einsum('nhqk,nqhd->nkhd', ds, q) * scale
  return out, (dq, dk, dv)


@pytest.mark.parametrize('window,use_segments,block_size', [
    (-1, False, 4),    # 13 keys in blocks of 4: the last block is padded
    (0, False, 4),     # every query sees only itself
    (2, True, 4),      # window and segments together
    (3, False, 16),    # one block longer than the sequence
])
def test_blockwise_attention_matches_xla_and_float64(window, use_segments,
                                                     block_size):
  """Values and gradients w.r.t. q, k, v (the flash custom VJP), under jit."""
  rng = np.random.default_rng(3)
  q, k, v, ct = (jnp.asarray(rng.normal(size=(3, 13, 2, 8)), jnp.float32)
                 for _ in range(4))
  segments = (jnp.asarray(rng.integers(0, 2, 13), jnp.int32)
              if use_segments else None)
  kw = dict(window=window, segment_ids=segments)
  xla = functools.partial(attention.xla_attention, **kw)
  block = functools.partial(attention.blockwise_attention,
                            block_size=block_size, **kw)
  ref_out, ref_grads = _reference_attention(
      q, k, v, window, None if segments is None else np.asarray(segments), ct)

  @jax.jit
  def both(q, k, v, ct):
    def value_and_vjp(f):
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(ct)
    return value_and_vjp(xla), value_and_vjp(block)
  (out_xla, grads_xla), (out_block, grads_block) = both(q, k, v, ct)
  np.testing.assert_allclose(out_block, out_xla, atol=1e-5)
  np.testing.assert_allclose(out_block, ref_out, atol=1e-5)
  for g_block, g_xla, g_ref in zip(grads_block, grads_xla, ref_grads):
    np.testing.assert_allclose(g_block, g_xla, atol=1e-5)
    np.testing.assert_allclose(g_block, g_ref, atol=1e-5)


def test_blockwise_training_memory_is_linear_in_length():
  """The custom VJP keeps only O(L) residuals: doubling L at most ~doubles the
  compiled temporary memory of forward + backward (autodiff through the
  scan kept one [L, H, d] carry per key block: x2.57 per doubling)."""
  def grad_temp_bytes(length):
    x = jax.ShapeDtypeStruct((2, length, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(
        attention.blockwise_attention(q, k, v, block_size=64) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  small, large = grad_temp_bytes(512), grad_temp_bytes(1024)
  assert large / small <= 2.2, (small, large)


@pytest.mark.slow
def test_blockwise_model_matches_xla_model():
  c = tiny_config(attention_impl='xla', num_layers=2)
  frames, audio = inputs(c)
  variables, apply = init_and_apply(c, frames, audio)
  c_block = tiny_config(attention_impl='blockwise', attention_block=4,
                        num_layers=2)
  block_apply = jax.jit(functools.partial(build_model(c_block).apply,
                                          train=False))
  a = apply(variables, frames, audio)
  b = block_apply(variables, frames, audio)
  np.testing.assert_allclose(a['heatmap'], b['heatmap'], atol=1e-5)


def test_upsample_heatmap():
  heat = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 4)),
                     jnp.float32)
  up = upsample_heatmap(heat, (36, 64))
  assert up.shape == (2, 3, 36, 64)
  assert float(up.min()) >= float(heat.min()) - 1e-6
  assert float(up.max()) <= float(heat.max()) + 1e-6
  flat = upsample_heatmap(jnp.full((1, 2, 2), 0.3), (5, 7), method='nearest')
  np.testing.assert_allclose(flat, 0.3)


# --- sharding annotations ----------------------------------------------------------------


@pytest.mark.slow
def test_logical_names_and_sharded_apply_matches_unsharded():
  # Motion features on: their frame-to-frame difference crosses the `seq`
  # shards; fine maps on: the upsampling and the patch features are sharded too.
  c = tiny_config(motion_features=True, fine_stride=2)
  frames, audio = inputs(c, batch=4)
  model = build_model(c)
  specs = nn.get_partition_spec(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), frames,
      audio))
  used = {n for spec in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
          for n in spec if n is not None}
  assert used <= LOGICAL_NAMES, used - LOGICAL_NAMES
  variables, apply = init_and_apply(c, frames, audio)
  expected = apply(variables, frames, audio)

  auto = (jax.sharding.AxisType.Auto,) * 3
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'seq'), axis_types=auto)
  rules = (('batch', 'data'), ('time', 'seq'), ('embed', 'fsdp'),
           ('channels', 'fsdp'), ('mlp', 'fsdp'))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shard = lambda x, names: jax.device_put(x, jax.sharding.NamedSharding(
        mesh, nn.logical_to_mesh_axes(names)))
    param_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    variables = jax.device_put(variables, param_shardings)
    frames, audio = shard(frames, ('batch', 'time')), shard(audio, ('batch',))
    out = jax.jit(functools.partial(model.apply, train=False))(
        variables, frames, audio)
    # The same weights with the temporal step sequence-parallel over 'seq'.
    ring = build_model(tiny_config(attention_impl='ring', motion_features=True,
                                   fine_stride=2))
    out_ring = jax.jit(functools.partial(ring.apply, train=False))(
        variables, frames, audio)
  np.testing.assert_allclose(out['heatmap'], expected['heatmap'], atol=1e-5)
  np.testing.assert_allclose(out_ring['heatmap'], expected['heatmap'], atol=1e-5)


# --- overfitting --------------------------------------------------------------------------


def _train_tiny(negatives, frames, audio, steps, **model_fields):
  """Adam on the tiny model; returns the loss history and the last aux."""
  c = tiny_config(temporal_window=-1, **model_fields)
  c.loss.positives, c.loss.negatives = 'max', negatives
  model = build_model(c)
  variables = init_and_apply(c, frames, audio)[0]
  params, stats = variables['params'], variables.get('batch_stats', {})
  loss_fn = losses.make_loss(c)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, stats, opt_state):
    def objective(p):
      out, updates = model.apply({'params': p, 'batch_stats': stats}, frames,
                                 audio, train=True, mutable=['batch_stats'])
      loss, aux = loss_fn(out)
      return loss, (aux, updates.get('batch_stats', {}))
    (loss, (aux, stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, aux

  opt_state = tx.init(params)
  history = []
  for _ in range(steps):
    params, stats, opt_state, loss, aux = step(params, stats, opt_state)
    history.append(float(loss))
  assert np.isfinite(history).all()
  return history, aux


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_clips():
  frames, audio = inputs(tiny_config(), batch=4, seed=5)
  history, aux = _train_tiny('max', frames, audio, steps=60)
  assert history[-1] < history[0] / 10, history[::10]
  assert aux['retrieval_accuracy'] == 1.0


@pytest.mark.slow
def test_mean_negatives_collapse_in_the_model_with_identical_audio():
  """The max/mean collapse in the real model: every clip gets the SAME audio, so no
  loss can be lowered by matching sounds; mean negatives still reach ~0.
  (Without audio centring: centred, identical audio is the zero vector and
  no pooling can separate anything.)"""
  frames, audio = inputs(tiny_config(), batch=4, seed=5)
  same = jnp.broadcast_to(audio[:1], audio.shape)
  history, _ = _train_tiny('mean', frames, same, steps=30, center_audio=False)
  assert history[-1] < 1e-2, history[::5]


# --- torchvision weights -----------------------------------------------------------------


def _torch_layout(variables):
  """Our ResNet variables -> a torchvision-named state dict (inverse map)."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  inverse = {'norm1': 'bn1', 'norm2': 'bn2', 'downsample_conv': 'downsample.0',
             'downsample_norm': 'downsample.1'}
  leaf_names = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}
  for path, value in flat:
    keys = [p.key for p in path]
    coll, *mods, leaf = keys
    if mods[0] in ('stem_conv', 'stem_norm'):
      name = {'stem_conv': 'conv1', 'stem_norm': 'bn1'}[mods[0]]
    else:
      stage, block = mods[0].replace('stage', '').split('_block')
      name = f'layer{stage}.{int(block) - 1}.{inverse.get(mods[1], mods[1])}'
    value = np.asarray(value)
    if leaf == 'kernel':
      out[f'{name}.weight'] = value.transpose(3, 2, 0, 1)
    else:
      out[f'{name}.{leaf_names[leaf]}'] = value
  del coll
  return out


def _resnet18():
  return ResNet()   # defaults are torchvision's resnet18


@pytest.mark.slow
def test_converter_round_trip_and_stem_layout_against_numpy():
  net = _resnet18()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 32, 32, 3)),
                  jnp.float32)
  variables = nn.meta.unbox(jax.jit(functools.partial(net.init, train=False))(
      init_key(2), x))
  sd = _torch_layout(variables)
  sd['fc.weight'] = np.zeros((1000, 512), np.float32)
  assert len([k for k in sd if k.startswith('layer')]) == 4 * 2 * 10 + 3 * 5
  restored = convert_torch.load_visual_encoder(
      jax.tree.map(jnp.zeros_like, variables), sd, scope=None)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)

  # The stem conv in torch semantics (OIHW weights, stride 2, padding 3),
  # in float64 numpy, against the converted Flax conv.
  w = sd['conv1.weight'].astype(np.float64)                     # [64, 3, 7, 7]
  img = np.pad(np.asarray(x[0, 0], np.float64), ((3, 3), (3, 3), (0, 0)))
  expect = np.zeros((16, 16, 64))
  for i in range(7):
    for j in range(7):
      expect += np.einsum('hwc,oc->hwo', img[i:i + 32:2, j:j + 32:2], w[:, :, i, j])
  stem = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)
  got = stem.apply({'params': {'kernel': restored['params']['stem_conv']['kernel']}},
                   x[0])
  np.testing.assert_allclose(got[0], expect, atol=1e-4)

  with pytest.raises(ValueError, match='do not match'):
    convert_torch.load_visual_encoder(
        variables, {k: v for k, v in sd.items() if 'layer4' not in k}, scope=None)


def test_parity_with_torchvision_resnet18():
  torch = pytest.importorskip('torch', reason='torch is not installed')
  torchvision = pytest.importorskip('torchvision',
                                    reason='torchvision is not installed')
  tnet = torchvision.models.resnet18().eval()
  with torch.no_grad():          # non-trivial running statistics
    for m in tnet.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  sd = {k: v.numpy() for k, v in tnet.state_dict().items()
        if v.is_floating_point()}
  net = _resnet18()
  x = np.random.default_rng(0).normal(size=(1, 2, 64, 64, 3)).astype(np.float32)
  variables = convert_torch.load_visual_encoder(
      net.init(jax.random.key(0), x, train=False), sd, scope=None)
  ours = net.apply(variables, x, train=False)              # [1, 2, 2, 2, 512]
  trunk = torch.nn.Sequential(*list(tnet.children())[:-2])
  with torch.no_grad():
    theirs = trunk(torch.from_numpy(x[0].transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(ours[0], theirs.transpose(0, 2, 3, 1), atol=1e-4)
