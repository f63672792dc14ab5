"""Input pipeline: log-mel, alignment, augmentation, sharding, resume, eval.

Runs against `tests/fixtures/fixture_builder` (a tiny TFDS dataset in the
shared schema whose frames encode their frame/record index and whose audio
clicks at known frames), built once per pytest run as array_record.
"""

from __future__ import annotations

import json
import pathlib

import jax
import librosa
import numpy as np
import orbax.checkpoint as ocp
import pytest

import grain
from fixtures import fixture_builder as fb
from tavlo_datasets import clip_storage
from tavlo_jax import config_lib
from tavlo_jax import config_validation
from tavlo_jax.data import audio as audio_lib
from tavlo_jax.data import augment as augment_lib
from tavlo_jax.data import pipeline
from tavlo_jax.data import sampling


def small_config(*, stride=1, columns_per_frame=4, features_on='host',
                 augment=True, num_workers=0, block='centred'):
  c = config_lib.base_config()
  c.input.num_frames = 4
  c.input.frame_stride = stride
  c.input.image_size = 16
  c.input.batch_size = 4
  c.input.eval_batch_size = 4
  c.input.num_workers = num_workers
  a = c.input.audio
  a.sample_rate = fb.SAMPLE_RATE
  a.columns_per_frame = columns_per_frame
  a.n_fft = 512
  a.n_mels = 16
  a.fmax = fb.SAMPLE_RATE / 2
  a.features_on = features_on
  a.block = block
  c.input.augment.enabled = augment
  return c


@pytest.fixture(scope='session')
def builder(tmp_path_factory):
  return fb.build(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def train_source(builder):
  return builder.as_data_source('train')


@pytest.fixture(scope='session')
def test_source(builder):
  return builder.as_data_source('test')


def generation_index(source, record_index: int) -> int:
  """TFDS shuffles records on write: map split position -> fixture index."""
  video_id = source[int(record_index)]['video_id']
  return int(video_id.decode().removeprefix('test').removeprefix('train'))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- log-mel ------------------------------------------------------------------


def reference_log_mel(window, audio_config, num_columns):
  """Independent float64 log-mel: explicit framing, np.fft, Hann by formula."""
  sr, n_fft = audio_config.sample_rate, audio_config.n_fft
  hop = len(window) // num_columns
  fb_ = librosa.filters.mel(
      sr=sr, n_fft=n_fft, n_mels=audio_config.n_mels, fmin=audio_config.fmin,
      fmax=audio_config.fmax, dtype=np.float64)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  # Column j: the n_fft samples centred on j*hop + hop//2, zeros outside.
  padded = np.concatenate([np.zeros(n_fft), window, np.zeros(2 * n_fft)])
  out = []
  for j in range(num_columns):
    start = j * hop + hop // 2 - n_fft // 2 + n_fft
    power = np.abs(np.fft.rfft(padded[start:start + n_fft] * hann)) ** 2
    out.append(fb_ @ power)
  return np.log(np.array(out) + audio_config.log_offset)


def test_log_mel_np_and_jnp_agree_with_float64_reference():
  c = config_lib.base_config().input.audio         # 16 kHz, n_fft 512, 40 mels
  t, cols = 4, 16
  n = t * 2000                                      # 8 fps -> hop 125
  rng = np.random.default_rng(0)
  time = np.arange(n) / c.sample_rate
  windows = np.stack([
      0.5 * np.sin(2 * np.pi * 440 * time) + 1e-3 * rng.standard_normal(n),
      0.3 * rng.standard_normal(n),
      np.where(np.arange(n) % 1500 == 0, 1.0, 0.0),   # clicks in silence
  ]).astype(np.float32)
  ref = np.stack([reference_log_mel(w.astype(np.float64), c, t * cols)
                  for w in windows])
  host = audio_lib.log_mel_np(windows, c, t * cols)
  device = np.asarray(jax.jit(
      lambda w: audio_lib.log_mel_jnp(w, c, t * cols))(windows))
  assert host.shape == device.shape == (3, t * cols, c.n_mels)
  assert host.dtype == device.dtype == np.float32
  np.testing.assert_allclose(host, ref, rtol=0, atol=1e-5)
  # The host STFT is librosa.stft's, on the zero-padded window.
  hop, pad = n // (t * cols), c.n_fft // 2 - n // (t * cols) // 2
  stft = librosa.stft(np.pad(windows[0].astype(np.float64), (pad, c.n_fft)),
                      n_fft=c.n_fft, hop_length=hop, center=False)
  mel = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels,
                            fmax=c.fmax, dtype=np.float64) @ np.abs(stft) ** 2
  np.testing.assert_allclose(host[0], np.log(mel.T[:t * cols] + c.log_offset),
                             rtol=0, atol=1e-5)
  # A log-domain difference of 1e-4 is a 1e-4 relative difference of the
  # mel energies (mel + log_offset).
  np.testing.assert_allclose(device, host, rtol=0, atol=1e-4)


@pytest.mark.parametrize('impl', ['np', 'jnp'])
def test_log_mel_column_j_centred_on_sample_j_hop_plus_half_hop(impl):
  c = config_lib.base_config().input.audio
  cols, hop = 32, 125
  fn = audio_lib.log_mel_np
  if impl == 'jnp':
    jitted = jax.jit(lambda w: audio_lib.log_mel_jnp(w, c, cols))
    fn = lambda w, *_: jitted(w)
  for j in (0, 5, 17, 31):
    window = np.zeros(cols * hop, np.float32)
    window[j * hop + hop // 2] = 1.0
    energy = np.exp(np.asarray(fn(window, c, cols))).sum(-1)
    # Symmetric around column j, peaked there.
    assert int(np.argmax(energy)) == j
    if 0 < j < cols - 1:
      np.testing.assert_allclose(energy[j - 1], energy[j + 1], rtol=2e-3)


def test_hop_must_be_an_integer():
  assert audio_lib.hop_length(16000, 8.0, 1, 16) == 125
  assert audio_lib.hop_length(16000, 8.0, 2, 16) == 250
  with pytest.raises(ValueError, match='columns_per_frame'):
    audio_lib.hop_length(16000, 8.0, 1, 48)
  with pytest.raises(ValueError, match='not an integer'):
    audio_lib.hop_length(16000, 29.97, 1, 16)
  with pytest.raises(ValueError, match='spectrogram columns'):
    audio_lib.log_mel_np(np.zeros(1001, np.float32),
                         config_lib.base_config().input.audio, 16)


# ---- train batches ----------------------------------------------------------


@pytest.mark.parametrize('features_on', ['host', 'device'])
def test_train_batch_shapes_and_dtypes(train_source, features_on):
  c = small_config(features_on=features_on)
  batch = next(pipeline.make_train_iterator(c, train_source, process_index=0,
                                            process_count=1))
  b, t, s = 4, 4, 16
  expected = {'frames': ((b, t, s, s, 3), np.uint8),
              'clip_index': ((b,), np.int32),
              'frame_index': ((b, t), np.int32)}
  if features_on == 'host':
    expected['audio'] = ((b, t * 4, 16), np.float32)
  else:
    expected['waveform'] = ((b, t * fb.SPF), np.float32)
    expected['spec_time_mask'] = ((b, t * 4), np.bool_)
    expected['spec_freq_mask'] = ((b, 16), np.bool_)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


@pytest.mark.parametrize('stride,columns_per_frame,block', [
    (1, 4, 'centred'), (2, 8, 'centred'), (1, 4, 'trailing'),
    (2, 8, 'trailing')])
def test_train_clip_audio_is_aligned_to_its_frames(train_source, stride,
                                                   columns_per_frame, block):
  """Clicks at known frames land at the centre of their frame's samples
  ('centred'), or just past the end of them ('trailing': block t is the clip
  frame interval that ends at frame t's time, so a click at that time is the
  first sample of block t + 1)."""
  kwargs = dict(stride=stride, columns_per_frame=columns_per_frame,
                augment=False, block=block)
  spf = fb.SPF * stride                                # samples per clip frame
  at = spf // 2 if block == 'centred' else spf         # frame f0's click
  raw = take(pipeline.make_train_iterator(
      small_config(features_on='device', **kwargs), train_source,
      process_index=0, process_count=1), 3)
  mel = take(pipeline.make_train_iterator(
      small_config(features_on='host', **kwargs), train_source,
      process_index=0, process_count=1), 3)
  clicked_blocks_seen = 0
  for raw_batch, mel_batch in zip(raw, mel):
    np.testing.assert_array_equal(raw_batch['frame_index'],
                                  mel_batch['frame_index'])
    for i, record in enumerate(raw_batch['clip_index']):
      r = generation_index(train_source, record)
      fi = raw_batch['frame_index'][i]
      assert np.all(np.diff(fi) == stride) and fi[0] >= 0
      # Frames: channel 0 encodes the stored frame index, 1 the record.
      frames = raw_batch['frames'][i].astype(int)
      np.testing.assert_array_equal(frames[..., 0],
                                    np.broadcast_to(8 * fi[:, None, None],
                                                    frames.shape[:3]))
      assert np.all(frames[..., 1] == 8 * r)
      # Raw window: the click of stored frame f sits at window sample
      # (f - f0)*SPF + spf/2 (the centre of block t for f = fi[t]), i.e. the
      # window starts at (f0 - stride/2) * SPF exactly; trailing: at
      # (f - f0)*SPF + spf, the window starting at (f0 - stride) * SPF.
      clicks = fb.click_frames(r, fb.num_frames('train', r))
      expected = [(f - fi[0]) * fb.SPF + at for f in clicks]
      expected = [x for x in expected if 0 <= x < len(fi) * spf]
      wave = raw_batch['waveform'][i]
      np.testing.assert_array_equal(np.flatnonzero(wave > 0.5), expected)
      assert np.all(wave[expected] == 1.0)
      if any((x - spf // 2) % spf for x in expected) or block == 'trailing':
        continue        # a click between clip frames (stride > 1) or on a
        #                 block edge (trailing), whose energy shows in both
      # Log-mel: a click's energy shows only in its frame's column block.
      energy = np.exp(mel_batch['audio'][i]).sum(-1)          # per column
      loud_columns = np.flatnonzero(energy > 5 * np.median(energy))
      loud = np.unique(loud_columns // columns_per_frame)
      np.testing.assert_array_equal(
          loud, [t for t, f in enumerate(fi) if f in clicks])
      clicked_blocks_seen += len(loud)
  assert clicked_blocks_seen > 0 or block == 'trailing'


def test_audio_window_start_matches_workspace_rule():
  # [(f0 - 0.5) * spf, ...) for stride 1; a frame of audio before f0's time.
  assert sampling.audio_window_start(0, 8.0, 16000, 1) == -1000
  assert sampling.audio_window_start(5, 8.0, 16000, 1) == 9000
  assert sampling.audio_window_start(5, 8.0, 16000, 2) == 8000
  # Trailing: [(f0 - 1) * spf, ...), a whole clip frame before f0's time.
  assert sampling.audio_window_start(5, 8.0, 16000, 1, 'trailing') == 8000
  assert sampling.audio_window_start(5, 8.0, 16000, 2, 'trailing') == 6000
  with pytest.raises(ValueError, match=r"audio.block='center'.*'centred', 'trailing'"):
    sampling.audio_window_start(5, 8.0, 16000, 1, 'center')
  x = np.arange(10, dtype=np.float32)
  np.testing.assert_array_equal(sampling.slice_padded(x, -2, 5),
                                [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(sampling.slice_padded(x, 8, 4), [8, 9, 0, 0])


def test_record_with_other_sample_rate_is_rejected(train_source):
  c = small_config()
  c.input.audio.sample_rate = 16000
  with pytest.raises(ValueError, match='sample_rate'):
    sampling.cut_clip(train_source[0], 0, c)


# ---- augmentation -----------------------------------------------------------


def test_augmentation_is_identical_across_frames():
  aug = small_config().input.augment
  rng = np.random.default_rng(0)
  base = rng.integers(0, 200, (20, 28, 3)).astype(np.uint8)
  # Identical frames stay identical under crop, flip and colour jitter.
  same = np.repeat(base[None], 5, axis=0)
  for seed in range(5):
    out = augment_lib.augment_video(same, np.random.default_rng(seed), aug, 16)
    assert out.shape == (5, 16, 16, 3)
    for t in range(1, 5):
      np.testing.assert_array_equal(out[t], out[0])
  # Frames that differ by a constant keep differing by it (+-1 rounding):
  # the same crop and flip were applied to every frame.
  aug.color_jitter = 0.0
  shifted = np.stack([base + 10 * t for t in range(5)])
  changed = False
  for seed in range(5):
    out = augment_lib.augment_video(shifted, np.random.default_rng(seed), aug,
                                    16).astype(int)
    for t in range(5):
      assert np.abs(out[t] - out[0] - 10 * t).max() <= 1
    plain = augment_lib.augment_video(shifted, np.random.default_rng(seed),
                                      small_config(augment=False).input.augment,
                                      16).astype(int)
    changed |= not np.array_equal(out, plain)
  assert changed, 'augmentation never changed anything'


def test_train_example_is_augment_video_of_the_stored_frames(train_source):
  # Raw records (avatar_synth): the example, which asks the decoder for the
  # cropped, scaled and flipped frames, is bit for bit what augment_video
  # (whole stored frames, then PIL, flip, jitter) gives on the same draws.
  c = small_config()
  example = pipeline._TrainExample(train_source, c, seed=5)
  for r in range(len(train_source)):
    out = example((1, r))
    start_rng, video_rng, _ = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence([5, 1, r]).spawn(3))
    record = train_source[r]
    first = sampling.random_first_frame(len(record['frames']), c, start_rng)
    clip = sampling.cut_clip(record, first, c)
    np.testing.assert_array_equal(
        out['frames'], augment_lib.augment_video(clip.frames, video_rng,
                                                 c.input.augment, 16))
    assert 'color_factors' not in out


_PAGE_FAULTS_OF_EXAMPLE_BUFFERS = """
import resource, sys
import numpy as np
from tavlo_jax.data import pipeline
if sys.argv[1] == 'reuse':
  assert pipeline.reuse_freed_memory()
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def example():   # the buffers of a paper-scale example, written and freed
  record = np.ones(650_000, np.uint8)
  frames = [np.ones(224 * 224 * 3, np.uint8) for _ in range(16)]
  clip = np.ones(16 * 224 * 224 * 3, np.uint8)
example()
before = faults()
for _ in range(20):
  example()
print(faults() - before)
"""


@pytest.mark.slow
def test_reuse_freed_memory_stops_the_page_faults_of_freed_buffers():
  # With glibc's defaults the buffers of each example (a record, 16 RGB
  # frames, the clip: ~5 MB) are mapped afresh or trimmed and regrown, and
  # every page faults on first touch (~1,250 per example measured). With
  # reuse_freed_memory they come back from the heap, already mapped.
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).parents[1]
  def faults(mode):
    out = subprocess.run([sys.executable, '-c',
                          _PAGE_FAULTS_OF_EXAMPLE_BUFFERS, mode],
                         capture_output=True, text=True, check=True, cwd=root)
    return int(out.stdout.split()[-1])
  assert faults('default') > 20 * 500
  assert faults('reuse') < 20 * 20


def _jitter_reference_f64(frames, factors):
  """color_jitter's formula in float64 before rounding, per clip."""
  out = []
  for clip, (b, c, s) in zip(frames, np.asarray(factors, np.float64)):
    x = clip.astype(np.float64) * b
    x = (x - x.mean()) * c + x.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    out.append((x - grey) * s + grey)
  return np.stack(out)


def test_color_jitter_on_device_is_the_host_formula():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (3, 4, 24, 24, 3), np.uint8)
  factors = np.stack([augment_lib.jitter_factors(np.random.default_rng(k), 0.4)
                      for k in range(3)])
  host = np.stack([augment_lib.color_jitter(frames[k],
                                            np.random.default_rng(k), 0.4)
                   for k in range(3)])
  device = np.asarray(jax.jit(augment_lib.color_jitter_batch)(
      frames, factors.astype(np.float32)))
  assert device.dtype == np.uint8
  # float32 on the device (and float32 factors) against float64: a value
  # may round the other way only next to a rounding tie (x.5), and by 1.
  diff = device.astype(int) - host
  assert np.abs(diff).max() <= 1
  exact = _jitter_reference_f64(frames, factors)
  near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
  assert not np.any((diff != 0) & ~near_tie)
  assert (diff != 0).mean() < 1e-3


def _yuv420_to_rgb_f64(y, uv):
  """BT.601 limited range by the inverse of the RGB -> YCbCr matrix (the
  forward definition, inverted in float64), chroma repeated over 2x2."""
  kr, kb = 0.299, 0.114
  kg = 1 - kr - kb
  forward = np.array([[kr, kg, kb],
                      [-kr / (2 - 2 * kb), -kg / (2 - 2 * kb), 0.5],
                      [0.5, -kg / (2 - 2 * kr), -kb / (2 - 2 * kr)]])
  ycc = np.stack([(y - 16.0) / 219.0,
                  (uv[..., 0, :, :].repeat(2, -2).repeat(2, -1) - 128.0) / 224.0,
                  (uv[..., 1, :, :].repeat(2, -2).repeat(2, -1) - 128.0) / 224.0],
                 -1)
  return 255.0 * ycc @ np.linalg.inv(forward).T


def test_yuv420_to_rgb_is_the_bt601_inverse():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 256, (3, 2, 8, 12), np.uint8)
  uv = rng.integers(0, 256, (3, 2, 2, 4, 6), np.uint8)
  got = np.asarray(jax.jit(augment_lib.yuv420_to_rgb)(y, uv))
  assert got.shape == (3, 2, 8, 12, 3) and got.dtype == np.uint8
  exact = _yuv420_to_rgb_f64(y.astype(float), uv.astype(float))
  want = np.clip(np.round(exact), 0, 255)
  diff = got.astype(int) - want
  # float32 against float64: off by 1 only next to a rounding tie.
  near_tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
  assert np.abs(diff).max() <= 1 and not np.any((diff != 0) & ~near_tie)
  # Limited-range black and white, and the chroma of one 2x2 block.
  black = augment_lib.yuv420_to_rgb(np.full((2, 2), 16, np.uint8),
                                    np.full((2, 1, 1), 128, np.uint8))
  white = augment_lib.yuv420_to_rgb(np.full((2, 2), 235, np.uint8),
                                    np.full((2, 1, 1), 128, np.uint8))
  np.testing.assert_array_equal(black, 0)
  np.testing.assert_array_equal(white, 255)


def test_yuv420_frames_need_the_jitter_on_the_device():
  c = small_config()
  c.input.frame_format = 'yuv420'
  c.input.augment.color_jitter_on = 'host'
  with pytest.raises(config_validation.ConfigError,
                     match=r"frame_format.*color_jitter_on='device'"):
    config_validation.validate(c)
  c.input.augment.color_jitter_on = 'device'
  config_validation.validate(c)
  c.input.image_size = 63
  with pytest.raises(config_validation.ConfigError, match='even image_size'):
    config_validation.validate(c)
  c.input.image_size = 64
  c.input.frame_format = 'i420'
  with pytest.raises(config_validation.ConfigError, match='frame_format'):
    config_validation.validate(c)


def test_color_jitter_on_device_uses_the_host_draws(train_source):
  c_host, c_dev, c_off = small_config(), small_config(), small_config()
  c_dev.input.augment.color_jitter_on = 'device'
  c_off.input.augment.color_jitter = 0.0
  host, dev, off = (next(pipeline.make_train_iterator(
      c, train_source, process_index=0, process_count=1))
                    for c in (c_host, c_dev, c_off))
  assert 'color_factors' not in host and 'color_factors' not in off
  assert dev['color_factors'].shape == (4, 3)
  assert np.all(np.abs(dev['color_factors'] - 1) <= 0.2 + 1e-6)
  # The device batch carries the un-jittered frames (same crop and flip)...
  np.testing.assert_array_equal(dev['frames'], off['frames'])
  # ... which the step jitters into the host batch's frames (+-1 at ties).
  jittered = np.asarray(jax.jit(augment_lib.frames_for_model)(dev))
  diff = jittered.astype(int) - host['frames']
  assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 1e-3
  assert not np.array_equal(jittered, dev['frames'])
  c_dev.input.augment.color_jitter_on = 'gpu'
  with pytest.raises(ValueError, match='color_jitter_on'):
    next(pipeline.make_train_iterator(c_dev, train_source, process_index=0,
                                      process_count=1))


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['runlocal', 'real+runlocal'])
def test_paper_train_step_compiles_with_the_jitter_factors(variant):
  # configs/paper.py jitters on the device: its batches carry
  # `color_factors`, and the train step takes them (compiled, no data).
  # On VGGSound's H.264 records (:real) frames come as the crop box's 4:2:0
  # planes, unscaled, in a fixed window.
  from tavlo_jax import aot_compile  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(
      str(pathlib.Path(__file__).parents[1] / f'configs/paper.py:{variant}'))
  assert c.input.augment.color_jitter_on == 'device'
  spec = pipeline.train_batch_spec(c, 8.0)
  b, t, s = c.input.batch_size, c.input.num_frames, c.input.image_size
  assert spec['color_factors'].shape == (b, 3)
  if variant == 'real+runlocal':
    assert (c.input.frame_format, c.input.clip_starts) == (
        'yuv420_unscaled', 'key_frames')
    assert 'frames' not in spec
    wh, ww = c.input.unscaled_window
    assert spec['frames_y'].shape == (b, t, wh, ww)
    assert spec['frames_uv'].shape == (b, t, 2, wh // 2, ww // 2)
    assert spec['frames_box_hw'].shape == (b, 2)
    assert spec['frames_flip'].shape == (b,)
  else:
    assert spec['frames'].shape == (b, t, s, s, 3)
  aot_compile.compile_train_step(c, aot_compile.get_topology('cpu:1').devices)


def test_pipeline_augments_whole_clips_and_not_eval(train_source, test_source):
  c = small_config()
  c.input.augment.color_jitter = 0.0      # jitter mixes channels; see above
  batches = take(pipeline.make_train_iterator(c, train_source, process_index=0,
                                              process_count=1), 2)
  plain_ramp = clip_storage.resize_frames(
      np.broadcast_to(fb.GRADIENT[None, None, :, None],
                      (1, fb.HEIGHT, fb.WIDTH, 3)).astype(np.uint8), 16)[0, ..., 0]
  differs = 0
  for batch in batches:
    ramp = batch['frames'][..., 2]          # the stored ramp, augmented
    np.testing.assert_array_equal(ramp, ramp[:, :1].repeat(4, axis=1))
    differs += sum(not np.array_equal(r[0], plain_ramp) for r in ramp)
  assert differs > 0
  # Eval frames are only resized.
  batch = next(iter(pipeline.make_eval_batches(
      small_config(), test_source, process_index=0, process_count=1)))
  np.testing.assert_array_equal(
      batch['frames'][..., 2], np.broadcast_to(plain_ramp,
                                               batch['frames'].shape[:-1]))


def test_spec_masks_same_on_host_and_device(train_source):
  c_host, c_dev = small_config(), small_config(features_on='device')
  for c in (c_host, c_dev):
    c.input.augment.spec_time_masks = 2
    c.input.augment.spec_freq_masks = 2
  host = next(pipeline.make_train_iterator(c_host, train_source,
                                           process_index=0, process_count=1))
  dev = next(pipeline.make_train_iterator(c_dev, train_source,
                                          process_index=0, process_count=1))
  assert dev['spec_time_mask'].any() and dev['spec_freq_mask'].any()
  np.testing.assert_array_equal(host['frames'], dev['frames'])
  audio = np.asarray(jax.jit(
      lambda b: audio_lib.audio_features(b, c_dev))(dev))
  np.testing.assert_allclose(audio, host['audio'], rtol=0, atol=1e-4)
  # Masked columns hold the example's mean log-mel (before masking).
  unmasked = audio_lib.log_mel_np(dev['waveform'], c_dev.input.audio, 16)
  i = int(np.flatnonzero(dev['spec_time_mask'].any(-1))[0])
  col = int(np.flatnonzero(dev['spec_time_mask'][i])[0])
  np.testing.assert_allclose(host['audio'][i, col], unmasked[i].mean(),
                             rtol=1e-5)
  keep = ~dev['spec_time_mask'][i][:, None] & ~dev['spec_freq_mask'][i]
  np.testing.assert_array_equal(host['audio'][i][keep], unmasked[i][keep])


# ---- order, determinism, resume, sharding ------------------------------------


def test_same_seed_same_batches_other_seed_other_batches(train_source):
  c = small_config()
  a = take(pipeline.make_train_iterator(c, train_source, process_index=0,
                                        process_count=1, seed=3), 3)
  b = take(pipeline.make_train_iterator(c, train_source, process_index=0,
                                        process_count=1, seed=3), 3)
  other = take(pipeline.make_train_iterator(c, train_source, process_index=0,
                                            process_count=1, seed=4), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['frames'], other[0]['frames'])


def test_resume_from_saved_state_gives_the_same_next_batches(train_source,
                                                             tmp_path):
  c = small_config()
  make = lambda: pipeline.make_train_iterator(c, train_source, process_index=0,
                                              process_count=1)
  uninterrupted = take(make(), 7)

  it = make()
  take(it, 3)
  state = it.get_state()
  fresh = make()
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), uninterrupted[3:])

  # The way the trainer saves it: grain's Orbax handler next to the model.
  it = make()
  take(it, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    restored = make()
    manager.restore(5, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), uninterrupted[5:])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(train_source):
  """mp_prefetch (2 spawned workers): same batches as in-process; resumes.

  One iterator is rewound with set_state (a fresh one would spawn workers
  again: ~20 s of imports on a loaded 2-core box).
  """
  make = lambda workers: pipeline.make_train_iterator(
      small_config(num_workers=workers, features_on='device'), train_source,
      process_index=0, process_count=1)
  expected = take(make(0), 5)
  it = make(2)
  try:
    assert_batches_equal(take(it, 2), expected[:2])
    state = json.loads(json.dumps(it.get_state()))   # as the Orbax handler
    assert_batches_equal(take(it, 2), expected[2:4])
    it.set_state(state)
    assert_batches_equal(take(it, 3), expected[2:5])
  finally:
    it.close()


def test_process_shards_are_disjoint_and_cover_the_split_each_epoch(
    train_source):
  n = len(train_source)                     # 16 records
  c = small_config()
  c.input.batch_size = 8                    # 4 per process, 2 batches/epoch
  per_process = []
  for p in range(2):
    it = pipeline.make_train_iterator(c, train_source, process_index=p,
                                      process_count=2)
    per_process.append([np.concatenate([b['clip_index'] for b in take(it, 2)])
                        for _ in range(2)])
  for epoch in range(2):
    a, b = (set(per_process[p][epoch]) for p in range(2))
    assert len(a) == len(b) == n // 2       # no repeats within an epoch
    assert not a & b                        # disjoint
    assert a | b == set(range(n))           # together: the whole split
  assert not np.array_equal(per_process[0][0], per_process[0][1])  # reshuffled


def test_global_batches_do_not_depend_on_the_process_count(train_source):
  c = small_config()
  c.input.batch_size = 8
  one = pipeline.make_train_iterator(c, train_source, process_index=0, process_count=1)
  two = [pipeline.make_train_iterator(c, train_source, process_index=p, process_count=2)
         for p in range(2)]
  for _ in range(5):                        # crosses an epoch boundary
    whole = next(one)
    halves = [next(it) for it in two]
    for key in ('clip_index', 'frames', 'frame_index'):
      np.testing.assert_array_equal(
          whole[key], np.concatenate([h[key] for h in halves]))


def test_global_batch_must_split_over_processes(train_source):
  c = small_config()
  c.input.batch_size = 6
  with pytest.raises(ValueError, match='input.batch_size=6'):
    pipeline.make_train_iterator(c, train_source, process_index=0,
                                 process_count=4)


def test_make_global_batch_shards_the_batch_dimension():
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
  host = {'frames': np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
          'valid': np.arange(8) % 2 == 0}
  glob = pipeline.make_global_batch(host, mesh)
  for k, v in glob.items():
    assert v.shape == host[k].shape
    assert v.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
    np.testing.assert_array_equal(np.asarray(v), host[k])
    # Each device holds one row: the batch really is split 8 ways.
    assert {s.data.shape[0] for s in v.addressable_shards} == {1}
  with pytest.raises(ValueError, match='data axes'):
    pipeline.make_global_batch(host, jax.make_mesh((8,), ('model',)))


# ---- evaluation -------------------------------------------------------------


@pytest.mark.parametrize('stride', [1, 2, 3])
def test_eval_windows_score_every_annotated_frame_once(stride):
  rng = np.random.default_rng(stride)
  for _ in range(200):
    n = int(rng.integers(1, 40))
    t = int(rng.integers(1, 9))
    annotated = np.flatnonzero(rng.random(n) < rng.random())
    windows = sampling.eval_windows(7, n, annotated, t, stride)
    owned = [f for w in windows for f in w.owned]
    assert sorted(owned) == sorted(annotated)       # each exactly once
    for w in windows:
      frames = set(range(w.first_frame, w.first_frame + t * stride, stride))
      assert set(w.owned) <= frames and w.owned
      # Windows show real frames unless the video is shorter than one.
      span = (t - 1) * stride + 1
      assert w.first_frame + span <= n or w.first_frame < stride


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_cover_the_split_and_pad_to_equal_counts(
    test_source, process_count):
  c = small_config()
  c.input.eval_batch_size = 6 if process_count == 2 else 4
  windows = pipeline.plan_eval_windows(c, test_source)
  scored, counts, valid_flags = [], set(), []
  for p in range(process_count):
    ev = pipeline.make_eval_batches(c, test_source, process_index=p,
                                    process_count=process_count,
                                    windows=windows)
    batches = list(ev)
    counts.add(len(batches))
    assert len(batches) == ev.num_batches
    for b in batches:
      assert b['valid'].shape == (c.input.eval_batch_size // process_count,)
      valid_flags.append(b['valid'])
      assert not b['ann_valid'][~b['valid']].any()
      assert np.all(b['clip_index'][~b['valid']] == -1)
      for i, t in zip(*np.nonzero(b['ann_valid'])):
        scored.append((int(b['clip_index'][i]), int(b['frame_index'][i, t])))
  assert len(counts) == 1
  total = sum(len(v) for v in valid_flags)
  assert total % c.input.eval_batch_size == 0
  assert sum(v.sum() for v in valid_flags) == len(windows)
  expected = [(r, int(f)) for r in range(len(test_source))
              for f in sampling.annotated_frames(test_source[r])]
  assert sorted(scored) == sorted(expected)            # each exactly once


def test_eval_annotations_match_the_record(test_source):
  c = small_config()
  ev = pipeline.make_eval_batches(c, test_source, process_index=0,
                                  process_count=1)
  checked = 0
  for b in ev:
    for i in np.flatnonzero(b['valid']):
      r = generation_index(test_source, b['clip_index'][i])
      fa, inst = fb.annotations(r, fb.num_frames('test', r))
      for t, f in enumerate(b['frame_index'][i]):
        gt = np.zeros((fb.MASK_H, fb.MASK_W), np.uint8)
        anym = gt.copy()
        boxes = []
        if f in fa['frame_index']:
          k = fa['frame_index'].index(f)
          np.testing.assert_array_equal(b['tags'][i, t], fa['tags'][k])
          assert b['cross_event'][i, t] == fa['cross_event'][k]
          for j, kk in enumerate(inst['annotation_index']):
            if kk == k:
              anym |= inst['mask'][j]
              if inst['sounding'][j]:
                gt |= inst['mask'][j]
                boxes.append(inst['box'][j])
          checked += 1
        else:
          assert not b['ann_valid'][i, t] and not b['tags'][i, t].any()
        np.testing.assert_array_equal(b['gt_mask'][i, t], gt)
        np.testing.assert_array_equal(b['any_mask'][i, t], anym)
        nb = len(boxes)
        np.testing.assert_array_equal(b['gt_box_valid'][i, t],
                                      np.arange(4) < nb)
        if nb:
          np.testing.assert_array_equal(b['gt_boxes'][i, t, :nb],
                                        np.stack(boxes))
  assert checked > 10
  # Frames with sounding and silent instances exist, so gt != any somewhere.
  assert any((b['gt_mask'] != b['any_mask']).any() for b in ev)


def test_eval_batches_are_deterministic_and_device_mode_pads(test_source):
  c = small_config(features_on='device')
  c.input.eval_batch_size = 6                          # 16 windows -> 3 x 6
  ev = pipeline.make_eval_batches(c, test_source, process_index=0,
                                  process_count=1)
  first, second = list(ev), list(ev)
  assert_batches_equal(first, second)
  last = first[-1]
  assert last['valid'].sum() == 4
  assert last['waveform'].shape == (6, 4 * fb.SPF)
  assert np.all(last['waveform'][~last['valid']] == 0)
  assert 'spec_time_mask' not in last


def test_color_jitter_is_the_plain_formula_bit_for_bit():
  # Reference: the out-of-place formula (float64, as numpy promotes the
  # float64 factors), against the in-place implementation.
  frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
  for seed in range(4):
    b, c, s = np.random.default_rng(seed).uniform(0.6, 1.4, size=3)
    x = frames.astype(np.float32) * b
    x = (x - x.mean()) * c + x.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (x - grey) * s + grey
    expected = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(
        augment_lib.color_jitter(frames, np.random.default_rng(seed), 0.4),
        expected)
