"""EZ-VSL as published (`configs/paper.py:ezvsl`): its log spectrogram, its
audio ResNet-18, the parameter count of the PyTorch model, one train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from configs import paper
from tavlo_jax import models, sharding, train
from tavlo_jax.data import audio as audio_lib

SR, SECONDS, COLUMNS, N_FFT, FREQ = 16000, 3, 200, 512, 257
PUBLISHED_PARAMS = 22_872_064      # EZ-VSL at dim 512, derived below


def _stft_config(**overrides):
  return dict(dict(sample_rate=SR, n_fft=N_FFT, n_mels=40, fmin=0.0,
                   fmax=8000.0, log_offset=1e-7, features='log_stft'),
              **overrides)


def test_log_stft_is_scipy_spectrogram_log_over_12():
  rng = np.random.default_rng(0)
  wave = 0.1 * rng.normal(size=(2, SR * SECONDS))
  wave[1, :SR] = 0.0                                   # silence: the offset floor
  host = audio_lib.log_stft_np(wave, _stft_config(), COLUMNS)
  device = np.asarray(jax.jit(lambda w: audio_lib.log_stft_jnp(
      w, _stft_config(), COLUMNS))(wave.astype(np.float32)))
  # Reference: scipy's own spectrogram (float64) of the zero-padded window,
  # its frames placed at this module's column centres.
  hop, left, right = audio_lib._geometry(wave.shape[-1], COLUMNS, N_FFT)
  padded = np.pad(wave, [(0, 0), (left, right)])
  _, _, psd = scipy.signal.spectrogram(padded, SR, nperseg=N_FFT,
                                       noverlap=N_FFT - hop)
  want = np.swapaxes(np.log(psd + 1e-7) / 12.0, -1, -2)
  assert hop == 240 and host.shape == want.shape == (2, COLUMNS, 257)
  np.testing.assert_allclose(host, want, atol=1e-5)
  np.testing.assert_allclose(device, want, atol=2e-4)
  assert np.isclose(host[1, 50:60].mean(), np.log(1e-7) / 12, atol=1e-3)


def test_features_field_picks_the_kind_and_its_width():
  assert audio_lib.feature_bins(_stft_config()) == 257
  assert audio_lib.feature_bins(_stft_config(features='log_mel')) == 40
  wave = np.zeros((1, 4800), np.float32)
  assert audio_lib.log_features_np(wave, _stft_config(features='log_mel'),
                                   20).shape == (1, 20, 40)
  with pytest.raises(ValueError, match='config.input.audio.features'):
    audio_lib.feature_bins(_stft_config(features='mfcc'))


def _published_config(batch=2):
  c = paper.get_config('ezvsl')
  c.input.batch_size = batch
  c.model.dtype = 'float32'
  c.mesh.fsdp, c.mesh.data = 1, -1
  return c


def _resnet18_params(in_channels: int) -> int:
  """torchvision resnet18 without fc, from its layer shapes: conv weights
  (no bias) and a BatchNorm weight + bias per conv."""
  total = 7 * 7 * in_channels * 64 + 2 * 64                 # conv1, bn1
  c_in = 64
  for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    for block in range(2):
      total += 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
      if block == 0 and (stride != 1 or c_in != c_out):
        total += c_in * c_out + 2 * c_out                   # downsample
      c_in = c_out
  return total


def test_parameter_count_is_the_published_models():
  config = _published_config()
  dim = config.model.embed_dim
  # EZ-VSL: imgnet (resnet18, fc=Identity) + img_proj (1x1 conv, bias) +
  # audnet (resnet18, 1-channel conv1, fc=Identity) + aud_proj (Linear).
  assert _resnet18_params(3) == 11_689_512 - (512 * 1000 + 1000)   # torchvision
  published = (_resnet18_params(3) + 512 * dim + dim
               + _resnet18_params(1) + 512 * dim + dim)
  assert _resnet18_params(1) == 11_170_240
  model = models.build_model(config)
  frames, audio = models.dummy_inputs(config, 2)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), frames, audio, train=False)))
  audio_net = shapes['params']['audio_encoder']
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(audio_net) == _resnet18_params(1)
  assert count(shapes['params']) == published == PUBLISHED_PARAMS


def test_shapes_one_frame_and_a_257x200_spectrogram():
  config = _published_config()
  frames, audio = models.dummy_inputs(config, 2)
  assert frames.shape == (2, 1, 224, 224, 3) and audio.shape == (2, 200, 257)
  model = models.build_model(config)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), frames, audio, train=False)[0])
  assert out['visual'].shape == (2, 1, 7, 7, 512)
  assert out['audio'].shape == (2, 1, 512)
  assert out['heatmap'].shape == (2, 1, 7, 7)


def test_resnet18_audio_needs_the_image_level_model():
  config = _published_config()
  config.model.name = 'tavlo'
  with pytest.raises(ValueError, match='config.model.audio.arch=resnet18'):
    models.build_model(config)


@pytest.mark.slow
def test_one_training_step_is_finite_and_moves_the_audio_net():
  config = _published_config(batch=2)
  config.input.image_size = 64                  # the audio side at full size
  config.optimizer.warmup_steps = 1             # step 0 at lr 0 otherwise
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  model = models.build_model(config)
  state, shardings, _ = train.create_state(config, model, mesh,
                                           jax.random.key(0, impl='rbg'))
  before = jax.device_get(state.params['audio_encoder'])
  step_fn, _ = train.compile_steps(config, model, mesh, shardings)
  rng = np.random.default_rng(0)
  wave = 0.1 * rng.normal(size=(2, SR * SECONDS))
  batch = {'frames': rng.integers(0, 255, (2, 1, 64, 64, 3), dtype=np.uint8),
           'audio': audio_lib.log_features_np(wave, config)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    for _ in range(2):
      state, metrics = step_fn(state, batch, jax.random.key(1, impl='rbg'))
  metrics = jax.device_get(metrics)
  assert bool(metrics['finite']) and np.isfinite(metrics['loss'])
  assert metrics['grad_norm'] > 0
  after = jax.device_get(state.params['audio_encoder'])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after)
  assert max(jax.tree.leaves(moved)) > 0


def test_torch_benchmark_model_is_the_same_architecture(benchmark_module):
  """benchmarks/torch_step.py's PyTorch model (optional extra: torch)."""
  torch = pytest.importorskip('torch')
  model = benchmark_module('torch_step').torch_model()
  assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS
  assert sum(p.numel() for p in model.audnet.parameters()) == _resnet18_params(1)
  loss = model(torch.randn(2, 3, 64, 64), torch.randn(2, 1, FREQ, COLUMNS))
  assert torch.isfinite(loss)
