"""Log-mel spectrograms shaped so the model cuts one audio token per frame.

A clip of T frames comes with an audio window of exactly T * spf samples
(spf = samples per clip frame = sample_rate * frame_stride / fps, see
`sampling.audio_window_start`). The spectrogram has exactly T * C columns
(C = `input.audio.columns_per_frame`), one every `hop = spf / C` samples, and
column j is centred on sample `j * hop + hop // 2` of the window. Column block
t (columns t*C .. t*C+C-1) therefore covers window samples [t*spf, (t+1)*spf)
and is centred on frame t's time, which sits at t*spf + spf/2 (WORKSPACE.md
"Audio alignment").

Each column is a Hann-windowed n_fft-sample frame; samples outside the window
count as zeros. Why not take context from outside the window: on-device
features only ever see the window (`waveform` in the batch), and host and
device must compute the same numbers.

Two implementations, kept in agreement by tests/test_data.py:
  `log_mel_np`   numpy float64 STFT, for the grain workers;
  `log_mel_jnp`  jnp.fft.rfft, jit-friendly, for the train/eval step.
Both use the same filterbank from `librosa.filters.mel` (Slaney norm) and
the periodic Hann window librosa.stft uses. Why not librosa.stft itself: it
gives identical numbers (checked), but is ~4x slower on these short windows
and its first call in every fresh worker loads numba kernels (~4 s).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import scipy.signal


def samples_per_frame(sample_rate: int, fps: float, frame_stride: int) -> int:
  """Audio samples per clip frame (a clip frame spans `frame_stride` frames)."""
  spf = sample_rate * frame_stride / float(fps)
  if abs(spf - round(spf)) > 1e-6:
    raise ValueError(
        f'sample_rate * frame_stride / fps = {sample_rate} * {frame_stride} / '
        f'{fps} = {spf} is not an integer; audio cannot be cut per frame. '
        'Use a sample rate that is a multiple of the video frame rate.')
  return int(round(spf))


def hop_length(sample_rate: int, fps: float, frame_stride: int,
               columns_per_frame: int) -> int:
  """Spectrogram hop so that exactly `columns_per_frame` columns fit a frame."""
  spf = samples_per_frame(sample_rate, fps, frame_stride)
  if spf % columns_per_frame:
    raise ValueError(
        f'input.audio.columns_per_frame={columns_per_frame} does not divide '
        f'the {spf} samples of a clip frame (sample_rate={sample_rate}, '
        f'fps={fps}, frame_stride={frame_stride}); hop must be an integer.')
  return spf // columns_per_frame


@functools.lru_cache(maxsize=16)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                fmax: float) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] float64 librosa mel filterbank (transposed)."""
  import librosa  # pylint: disable=g-import-not-at-top  # slow; only if used
  if fmax > sample_rate / 2:
    raise ValueError(f'input.audio.fmax={fmax} is above the Nyquist '
                     f'frequency {sample_rate / 2} of sample_rate={sample_rate}')
  fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels,
                           fmin=fmin, fmax=fmax, dtype=np.float64)
  return np.ascontiguousarray(fb.T)


@functools.lru_cache(maxsize=16)
def _hann(n_fft: int) -> np.ndarray:
  # The periodic Hann window, as librosa.stft uses ('hann', fftbins=True).
  return scipy.signal.get_window('hann', n_fft, fftbins=True)


def _geometry(num_samples: int, num_columns: int, n_fft: int):
  """hop and the zero padding that centres column j on j*hop + hop//2."""
  if num_columns <= 0 or num_samples % num_columns:
    raise ValueError(
        f'audio window of {num_samples} samples does not split into '
        f'{num_columns} spectrogram columns (expected T * spf samples).')
  hop = num_samples // num_columns
  # Frame j covers [j*hop + hop//2 - n_fft//2, ... + n_fft) of the window.
  left = n_fft // 2 - hop // 2
  needed = (num_columns - 1) * hop + n_fft     # padded length for num_columns
  right = needed - left - num_samples
  return hop, left, right


def _resolve(config, num_columns):
  """Accepts `config.input.audio` + num_columns, or the whole config."""
  if 'input' in config:
    if num_columns is None:
      num_columns = (config.input.num_frames *
                     config.input.audio.columns_per_frame)
    config = config.input.audio
  if num_columns is None:
    raise ValueError('num_columns is required with config.input.audio')
  return config, int(num_columns)


def _audio_params(audio_config: Mapping[str, Any]):
  c = audio_config
  return (int(c['sample_rate']), int(c['n_fft']), int(c['n_mels']),
          float(c['fmin']), float(c['fmax']), float(c['log_offset']))


def _pad_or_crop(x, left: int, right: int, xp):
  """Zero-pads (or crops, for negative amounts) the last axis."""
  if left < 0:
    x, left = x[..., -left:], 0
  if right < 0:
    x, right = x[..., :x.shape[-1] + right], 0
  pad = [(0, 0)] * (x.ndim - 1) + [(left, right)]
  return xp.pad(x, pad)


def log_mel_np(waveform: np.ndarray, audio_config: Mapping[str, Any],
               num_columns: int | None = None) -> np.ndarray:
  """Host log-mel: [..., T*spf] window -> f32 [..., num_columns, n_mels].

  Args:
    waveform: the clip's audio window (any leading batch dims).
    audio_config: `config.input.audio` (sample_rate, n_fft, n_mels, fmin,
      fmax, log_offset), or the whole config (then num_columns defaults to
      T * columns_per_frame).
    num_columns: T * columns_per_frame; the hop is the window length / this.
  """
  audio_config, num_columns = _resolve(audio_config, num_columns)
  sr, n_fft, _, fmin, fmax, offset = _audio_params(audio_config)
  hop, left, right = _geometry(waveform.shape[-1], num_columns, n_fft)
  # float64 so the host result is the accurate one; the cost is negligible
  # next to decoding the clip.
  x = _pad_or_crop(np.asarray(waveform, np.float64), left, right, np)
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)
  frames = frames[..., ::hop, :][..., :num_columns, :]     # [..., cols, n_fft]
  power = np.abs(np.fft.rfft(frames * _hann(n_fft), axis=-1)) ** 2
  mel = power @ _filterbank(sr, n_fft, int(audio_config['n_mels']), fmin,
                            fmax)
  return np.log(mel + offset).astype(np.float32)


def log_mel_jnp(waveform, audio_config: Mapping[str, Any],
                num_columns: int | None = None):
  """On-device log-mel, same numbers as `log_mel_np` (float32, jit-friendly).

  waveform: f32 [..., T*spf] (the batch's `waveform`); returns
  f32 [..., num_columns, n_mels]. Shapes are static, so the hop is too.
  Arguments as `log_mel_np`. In a train step prefer `audio_features(batch,
  config)`: it also applies the batch's SpecAugment masks.
  """
  audio_config, num_columns = _resolve(audio_config, num_columns)
  sr, n_fft, n_mels, fmin, fmax, offset = _audio_params(audio_config)
  hop, left, right = _geometry(waveform.shape[-1], num_columns, n_fft)
  x = _pad_or_crop(jnp.asarray(waveform, jnp.float32), left, right, jnp)
  # Frames by gather: [cols, n_fft] sample indices into the padded window.
  idx = (np.arange(num_columns)[:, None] * hop + np.arange(n_fft)[None, :])
  frames = x[..., idx] * jnp.asarray(_hann(n_fft), jnp.float32)
  spec = jnp.fft.rfft(frames, axis=-1)                     # [..., cols, F]
  power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  fb = jnp.asarray(_filterbank(sr, n_fft, n_mels, fmin, fmax), jnp.float32)
  mel = jnp.einsum('...cf,fm->...cm', power, fb,
                   precision='highest')
  return jnp.log(mel + offset)


# ---- EZ-VSL's linear spectrogram ------------------------------------------------

FEATURE_KINDS = ('log_mel', 'log_stft')
# EZ-VSL normalises its log spectrogram with mean 0 and std 12
# (torchvision Normalize on the log power): the same scale here.
LOG_STFT_STD = 12.0
# scipy.signal.spectrogram's default window: Tukey with a 25% taper.
_TUKEY_ALPHA = 0.25


def feature_kind(audio_config: Mapping[str, Any]) -> str:
  kind = audio_config.get('features', 'log_mel')
  if kind not in FEATURE_KINDS:
    raise ValueError(f'config.input.audio.features={kind!r}; expected one of '
                     f'{FEATURE_KINDS}')
  return kind


def feature_bins(audio_config: Mapping[str, Any]) -> int:
  """Width of a spectrogram column: n_mels, or n_fft // 2 + 1 for log_stft."""
  if feature_kind(audio_config) == 'log_stft':
    return int(audio_config['n_fft']) // 2 + 1
  return int(audio_config['n_mels'])


@functools.lru_cache(maxsize=16)
def _psd_window(n_fft: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
  """(Tukey window, per-bin scale) of scipy's one-sided 'density' PSD."""
  window = scipy.signal.get_window(('tukey', _TUKEY_ALPHA), n_fft)
  scale = np.full(n_fft // 2 + 1, 1.0 / (sample_rate * (window**2).sum()))
  # One-sided: every bin but DC (and Nyquist for an even n_fft) counts twice.
  scale[1:n_fft // 2 + (n_fft % 2)] *= 2.0
  return window, scale


def _log_stft(waveform, audio_config, num_columns, xp, dtype):
  """Shared by the host and device paths; xp is numpy or jax.numpy."""
  audio_config, num_columns = _resolve(audio_config, num_columns)
  sr, n_fft, offset = (int(audio_config['sample_rate']),
                       int(audio_config['n_fft']),
                       float(audio_config['log_offset']))
  hop, left, right = _geometry(waveform.shape[-1], num_columns, n_fft)
  x = _pad_or_crop(xp.asarray(waveform, dtype), left, right, xp)
  idx = np.arange(num_columns)[:, None] * hop + np.arange(n_fft)[None, :]
  frames = x[..., idx]                                      # [..., cols, n_fft]
  window, scale = _psd_window(n_fft, sr)
  # detrend='constant' (scipy's default): each frame loses its mean first.
  frames = (frames - frames.mean(-1, keepdims=True)) * xp.asarray(window, dtype)
  spec = xp.fft.rfft(frames, axis=-1)
  power = (xp.real(spec) ** 2 + xp.imag(spec) ** 2) * xp.asarray(scale, dtype)
  return xp.log(power + offset) / LOG_STFT_STD


def log_stft_np(waveform: np.ndarray, audio_config: Mapping[str, Any],
                num_columns: int | None = None) -> np.ndarray:
  """EZ-VSL's input: log power spectral density / 12, f32 [..., cols, F].

  As `scipy.signal.spectrogram(x, sr, nperseg=n_fft)` computes it (Tukey 0.25
  window, per-frame mean removed, one-sided density scaling), then
  log(psd + log_offset) / 12, F = n_fft // 2 + 1 linear bins. The columns
  follow this module's geometry (centred on j*hop + hop//2, zeros outside
  the window), so a 3 s window with 200 columns has hop 240 where EZ-VSL's
  noverlap=274 gives 238 (also 200 columns). Arguments as `log_mel_np`.
  """
  return _log_stft(waveform, audio_config, num_columns, np,
                   np.float64).astype(np.float32)


def log_stft_jnp(waveform, audio_config: Mapping[str, Any],
                 num_columns: int | None = None):
  """On-device `log_stft_np` (float32, jit-friendly)."""
  return _log_stft(waveform, audio_config, num_columns, jnp, jnp.float32)


def log_features_np(waveform, audio_config, num_columns=None):
  """The configured features (`input.audio.features`) on the host."""
  section = audio_config.input.audio if 'input' in audio_config else audio_config
  fn = log_stft_np if feature_kind(section) == 'log_stft' else log_mel_np
  return fn(waveform, audio_config, num_columns)


def log_features_jnp(waveform, audio_config, num_columns=None):
  """The configured features (`input.audio.features`) on device."""
  section = audio_config.input.audio if 'input' in audio_config else audio_config
  fn = log_stft_jnp if feature_kind(section) == 'log_stft' else log_mel_jnp
  return fn(waveform, audio_config, num_columns)
def apply_spec_masks(logmel, time_mask, freq_mask, xp=np):
  """SpecAugment: replaces masked columns/bins by the example's mean log-mel.

  The masks are sampled on the host (augment.sample_spec_masks).

  logmel [..., cols, mels], time_mask [..., cols], freq_mask [..., mels].
  The mean, not zero: zero would be a loud value on a log scale whose
  silence is log(log_offset).
  """
  mean = xp.mean(logmel, axis=(-2, -1), keepdims=True)
  masked = time_mask[..., :, None] | freq_mask[..., None, :]
  return xp.where(masked, mean, logmel)


def audio_features(batch: Mapping[str, Any], config) -> Any:
  """The log-mel `audio` [B, T*C, M] of a batch, whichever side computed it
  (or the log spectrogram [B, T*C, F] with `input.audio.features='log_stft'`).

  With `features_on='host'` the batch already carries `audio`. With 'device'
  it carries `waveform` and, in training, the SpecAugment masks sampled on
  the host (`spec_time_mask` [B, T*C], `spec_freq_mask` [B, M]), so both
  paths apply the same augmentation for the same seed. Call this inside the
  jitted step.
  """
  if 'audio' in batch:
    return batch['audio']
  if 'waveform' not in batch:
    raise KeyError("batch has neither 'audio' nor 'waveform'")
  logmel = log_features_jnp(batch['waveform'], config)
  if 'spec_time_mask' in batch:
    logmel = apply_spec_masks(
        logmel, batch['spec_time_mask'], batch['spec_freq_mask'], xp=jnp)
  return logmel

