"""Encoded frame storage of the real-video builders, read back by the pipeline.

Built from a small textured clip (tests/fixtures/natural_video.py: 1/f
texture, camera pan, sensor noise, h264 + AAC), so the codecs have real
detail to lose, unlike the flat grey frames of the builder tests. Every test
runs for both encoded layouts: 'h264' segments with 16-bit PCM audio (the
`vggsound` defaults) and 'jpeg' frames with FLAC audio.
"""

import io

import av
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fixtures import natural_video
from tavlo_datasets import clip_storage
from tavlo_datasets import media
from tavlo_datasets.vggsound import Builder, VggsoundConfig
from tavlo_jax import config_lib
from tavlo_jax import input_data
from tavlo_jax.data import augment as augment_lib
from tavlo_jax.data import pipeline
from tavlo_jax.data import sampling

FPS = 8.0
SHORT_SIDE = 64
QUALITY = 85
CRF = 25
SEGMENT = 8      # 24 stored frames: 3 segments
SPEC = natural_video.ClipSpec(name='textured', seconds=3.0, fps=25.0,
                              width=192, height=108, video_kbps=300,
                              audio_rate=48000, seed=3)


def make_builder(data_dir, codec='h264', audio_codec='pcm16') -> Builder:
  return Builder(config=VggsoundConfig(
      name='test', ids_file='', fps=FPS, frame_short_side=SHORT_SIDE,
      frame_codec=codec, jpeg_quality=QUALITY, h264_crf=CRF,
      segment_frames=SEGMENT, audio_codec=audio_codec, mask_size=(9, 16)),
      data_dir=str(data_dir))


@pytest.fixture(scope='module')
def source_mp4(tmp_path_factory):
  manual = tmp_path_factory.mktemp('manual')
  natural_video.write_clip(manual / f'{SPEC.name}.mp4', SPEC)
  return manual / f'{SPEC.name}.mp4'


@pytest.fixture(scope='module', params=[('h264', 'pcm16'), ('jpeg', 'flac')],
                ids=['h264-pcm16', 'jpeg-flac'])
def built(request, source_mp4, tmp_path_factory):
  builder = make_builder(tmp_path_factory.mktemp('data'), *request.param)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(source_mp4.parent)),
      file_format='array_record')
  return builder, source_mp4


# (box, flip) of a clip: the whole frame, or a box off the pixel grid, mirrored.
WHOLE_OR_FLIPPED_BOX = [(None, False), ((3.3, 5.6, 90.2, 60.9), True)]


def paper_like_config():
  c = config_lib.base_config()
  c.input.num_frames = 8
  c.input.frame_stride = 1
  c.input.image_size = 56
  c.input.audio.sample_rate = 16000
  return c


def jpeg_roundtrip(frame: np.ndarray, quality: int) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, 'JPEG', quality=quality)
  return np.asarray(Image.open(buffer).convert('RGB'))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


def test_example_frames_equal_the_source_frames_within_jpeg_error(built):
  builder, mp4 = built
  record = builder.as_data_source('train')[0]
  config = paper_like_config()
  clip = sampling.cut_clip(record, 5, config)
  # Reference: the source decoded by PyAV at the stored size (132x64: the
  # 16:9 source with short side 64, rounded to even).
  source, _, _ = media.read_video(mp4, FPS, (64, 114))
  assert clip.frames.shape == (8, 64, 114, 3)
  np.testing.assert_array_equal(clip.frame_index, np.arange(5, 13))
  codec = builder.builder_config.frame_codec
  for frame, k in zip(clip.frames, clip.frame_index):
    if codec == 'jpeg':
      # Exactly the source frame through the JPEG codec at the config's
      # quality (libjpeg-turbo is deterministic).
      np.testing.assert_array_equal(frame, jpeg_roundtrip(source[k], QUALITY))
    # Tolerance: the codec's error on this noisy texture stays above 28 dB
    # PSNR (measured 31.9-33.1 dB for JPEG q85, 29.4-33.2 dB for H.264
    # crf 25 at this small size); the source frame 4 away is below 17 dB,
    # so a wrong or misaligned frame fails.
    assert psnr(frame, source[k]) > 28
    assert psnr(frame, source[min(k + 4, len(source) - 1)]) < 20
  # Decoding only the clip's frames gives what decoding every frame gives.
  every = clip_storage.gather_frames(record, np.arange(len(source)))
  np.testing.assert_array_equal(clip.frames, every[5:13])


def test_waveform_is_the_source_audio_within_16_bit_rounding(built):
  builder, mp4 = built
  record = builder.as_data_source('train')[0]
  audio_codec = builder.builder_config.audio_codec
  assert [k for k in record if k.startswith('waveform')] == [
      f'waveform_{audio_codec}']
  reference = media.read_audio(mp4, 16000)
  stored = clip_storage.waveform(record)
  assert stored.dtype == np.float32 and stored.shape == reference.shape
  np.testing.assert_allclose(stored, np.clip(reference, -1, 1),
                             atol=0.5 / 32767 + 1e-7)
  # A window (what an example reads) is that slice, zero-padded outside.
  n = len(reference)
  for start, length in ((1000, 500), (-300, 800), (n - 200, 700)):
    expected = np.zeros(length, np.float32)
    lo, hi = max(start, 0), min(start + length, n)
    expected[lo - start:hi - start] = stored[lo:hi]
    np.testing.assert_array_equal(
        clip_storage.waveform_window(record, start, length), expected)


def test_corrupt_audio_names_the_record(built):
  builder, _ = built
  record = dict(builder.as_data_source('train')[0])
  if 'waveform_pcm16' in record:   # the same record with FLAC audio
    pcm = record.pop('waveform_pcm16')
    record['waveform_flac'] = clip_storage.encode_flac(
        pcm.astype(np.float32) / 32767, int(record['sample_rate']))
  data = np.asarray(record['waveform_flac']).copy()
  data[:64] = 0
  record['waveform_flac'] = data
  with pytest.raises(ValueError,
                     match=r"record 'textured': the audio \(FLAC\) does not"):
    sampling.cut_clip(record, 4, paper_like_config())


def test_only_the_clip_frames_are_decoded(built, monkeypatch):
  builder, _ = built
  record = builder.as_data_source('train')[0]
  converted = []    # frames turned into RGB pixels
  real_to_ndarray = av.VideoFrame.to_ndarray
  real_open = Image.open
  monkeypatch.setattr(av.VideoFrame, 'to_ndarray', lambda self, **kw: (
      converted.append(1), real_to_ndarray(self, **kw))[1])
  monkeypatch.setattr(Image, 'open', lambda *a, **kw: (
      converted.append(1), real_open(*a, **kw))[1])
  config = paper_like_config()
  config.input.frame_stride = 2
  clip = sampling.cut_clip(record, 3, config)
  assert clip_storage.num_frames(record) == 24
  # Frames 3, 5, ..., 17 of 24.
  np.testing.assert_array_equal(clip.frame_index, np.arange(3, 18, 2))
  assert len(converted) == 8


def test_even_box_moves_each_edge_by_at_most_one_pixel():
  for box in [(3.3, 5.6, 90.2, 60.9), (0.0, 0.0, 114.0, 64.0),
              (112.9, 63.2, 114.0, 64.0), (-0.4, 1.0, 2.0, 1.5)]:
    snapped = clip_storage.even_box(box, 64, 114)
    assert all(v % 2 == 0 for v in snapped)
    assert 0 <= snapped[0] < snapped[2] <= 114
    assert 0 <= snapped[1] < snapped[3] <= 64
    clipped = np.clip(box, 0, [114, 64, 114, 64])
    assert np.abs(np.subtract(snapped, clipped)).max() <= 2
  assert clip_storage.even_box(None, 64, 114) == (0, 0, 114, 64)
  assert clip_storage.even_box((11.2, 7.0, 50.8, 33.1), 64, 114) == (
      12, 8, 50, 34)


@pytest.mark.parametrize('box,flip', [(None, False),
                                      ((3.3, 5.6, 90.2, 60.9), True),
                                      ((20.0, 2.0, 80.0, 50.0), False)])
def test_decoder_crops_scales_and_flips_like_pil(built, box, flip):
  builder, _ = built
  record = builder.as_data_source('train')[0]
  index = np.arange(2, 10)
  whole = clip_storage.gather_frames(record, index)
  got = clip_storage.gather_frames(record, index, size=56,
                                   geometry=lambda h, w: (box, flip))
  assert got.shape == (8, 56, 56, 3) and got.dtype == np.uint8
  def pil(crop_box, mirrored=flip):
    out = clip_storage.resize_frames(whole, 56, crop_box)
    return out[:, :, ::-1] if mirrored else out
  if builder.builder_config.frame_codec == 'jpeg':
    # Whole frames through PIL, the box as it is: exactly the old path.
    np.testing.assert_array_equal(got, pil(box))
    return
  # H.264: cropped on even pixels and scaled by swscale in YUV before the
  # RGB conversion. Reference: PIL's bilinear on the same box of the whole
  # RGB frames. Two bilinear implementations (chroma scaled at its own
  # resolution here, after upsampling there; other rounding) differ by ~1
  # level on average, a few at sharp edges: far below the codec's own error
  # (PSNR ~30 dB: RMS ~8 levels) and the colour jitter (+-20% of the value).
  # Measured on this tiny noisy clip, scaled down up to 2x: mean |d| 1.5-1.7,
  # 99th percentile 7-8 (on the benchmark's 456x256 frames to 224: mean
  # 0.75-1.0, 99th percentile 3-4).
  d = np.abs(got.astype(int) - pil(clip_storage.even_box(box, 64, 114)))
  assert d.mean() < 2.5 and np.percentile(d, 99) <= 10, (
      d.mean(), np.percentile(d, 99))
  # ... while a box 2 pixels off, or a missing flip, is far outside that.
  x0, y0, x1, y1 = clip_storage.even_box(box, 64, 114)
  shifted = pil((x0 + 2, y0, min(x1 + 2, 114), y1))
  assert np.abs(got.astype(int) - shifted).mean() > 2 * d.mean()
  if flip:
    unflipped = pil(clip_storage.even_box(box, 64, 114), mirrored=False)
    assert np.abs(got.astype(int) - unflipped).mean() > 4 * d.mean()


@pytest.mark.parametrize('box,flip', WHOLE_OR_FLIPPED_BOX)
def test_yuv420_frames_are_the_rgb_frames_before_conversion(built, box, flip):
  # 'yuv420p' hands over the planes the RGB path converts on the host;
  # converted in the step (augment.yuv420_to_rgb, rounding) they are the
  # host's frames (libswscale's fast path, truncating) within 3 levels.
  builder, _ = built
  record = builder.as_data_source('train')[0]
  index = np.array([2, 3, 9, -1, 4])                 # one padding slot
  geometry = lambda h, w: (box, flip)
  rgb = clip_storage.gather_frames(record, index, size=56, geometry=geometry)
  yuv = clip_storage.gather_frames(record, index, size=56, geometry=geometry,
                                   frame_format='yuv420')
  assert yuv.y.shape == (5, 56, 56) and yuv.uv.shape == (5, 2, 28, 28)
  assert yuv.y.dtype == yuv.uv.dtype == np.uint8
  converted = np.asarray(augment_lib.yuv420_to_rgb(yuv.y, yuv.uv))
  assert converted.shape == rgb.shape and converted.dtype == np.uint8
  np.testing.assert_array_equal(converted[3], 0)     # padding: black
  d = np.abs(converted.astype(int) - rgb)
  if builder.builder_config.frame_codec == 'h264':
    # Measured: mean 1.07, max 3 (on the benchmark's 224 px frames: 1.16, 3).
    assert d.max() <= 3 and d.mean() < 1.3, (d.max(), d.mean())
  else:
    # JPEG frames are RGB: the host converts them to 4:2:0 (what x264 is
    # fed), which keeps one colour per 2x2 pixels: exact on luma-only
    # detail, off at colour edges (measured: mean 1.6, max 13). The luma is
    # kept up to rounding (measured: mean 0.33).
    luma = lambda x: x.astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(luma(converted) - luma(rgb)).mean() < 0.6
  # A box 2 pixels off is far outside the conversion's error.
  if box is not None:
    x0, y0, x1, y1 = box
    other = clip_storage.gather_frames(
        record, index, size=56, geometry=lambda h, w: ((x0 + 2, y0, x1 + 2, y1), flip))
    assert np.abs(converted.astype(int) - other).mean() > 2 * d.mean()


def test_yuv420_needs_an_even_size(built):
  builder, _ = built
  record = builder.as_data_source('train')[0]
  with pytest.raises(ValueError, match='even size'):
    clip_storage.gather_frames(record, [0, 1], size=55, frame_format='yuv420')
  with pytest.raises(ValueError, match='frame_format'):
    clip_storage.gather_frames(record, [0, 1], size=56, frame_format='nv12')


def test_yuv420_train_batches_carry_planes_the_step_converts(built):
  # frame_format='yuv420': the same clips, crops, flips and jitter draws as
  # 'rgb', shipped as planes (half the bytes) and made RGB in the step.
  builder, _ = built
  source = builder.as_data_source('train')
  rgb_config = paper_like_config()
  rgb_config.input.batch_size = 2
  rgb_config.input.augment.color_jitter_on = 'device'
  yuv_config = paper_like_config()
  yuv_config.input.batch_size = 2
  yuv_config.input.augment.color_jitter_on = 'device'
  yuv_config.input.frame_format = 'yuv420'
  rgb, yuv = (next(pipeline.make_train_iterator(c, source, process_index=0,
                                                process_count=1))
              for c in (rgb_config, yuv_config))
  assert 'frames' not in yuv and 'frames_y' not in rgb
  assert yuv['frames_y'].shape == (2, 8, 56, 56)
  assert yuv['frames_uv'].shape == (2, 8, 2, 28, 28)
  assert yuv['frames_y'].nbytes + yuv['frames_uv'].nbytes == rgb['frames'].nbytes // 2
  for key in ('frame_index', 'color_factors', 'waveform', 'clip_index'):
    np.testing.assert_array_equal(yuv[key], rgb[key])
  step = jax.jit(augment_lib.frames_for_model)
  got, want = np.asarray(step(yuv)), np.asarray(step(rgb))
  assert got.shape == want.shape == (2, 8, 56, 56, 3)
  d = np.abs(got.astype(int) - want)
  if builder.builder_config.frame_codec == 'h264':
    # Measured: mean 1.2, max 4 (the conversion's 3, +-1 at jitter ties).
    assert d.max() <= 4 and d.mean() < 1.4, (d.max(), d.mean())
  else:
    assert d.mean() < 2.5, d.mean()        # 4:2:0 chroma of RGB frames: 1.8


def stored_planes(record, index):
  """The stored frames' 4:2:0 planes at the stored size: the decoder's own
  for 'h264', libswscale's conversion of the RGB frames otherwise."""
  if clip_storage.storage_of(record) == 'h264':
    frames = clip_storage._decode_h264(record, list(index),  # pylint: disable=protected-access
                                       lambda f: f.reformat(format='yuv420p'))
    return [frames[i] for i in index]
  rgb = clip_storage.gather_frames(record, np.asarray(index))
  return [av.VideoFrame.from_ndarray(f, format='rgb24').reformat(
      format='yuv420p') for f in rgb]


def planes_of(frame):
  rows = lambda p: np.frombuffer(p, np.uint8).reshape(-1, p.line_size)
  return [rows(p)[:frame.height // s, :frame.width // s]
          for p, s in zip(frame.planes, (1, 2, 2))]


@pytest.mark.parametrize('box,flip', WHOLE_OR_FLIPPED_BOX)
def test_unscaled_frames_are_the_stored_planes_of_the_box(built, box, flip):
  # 'yuv420_unscaled': no scaling, no mirroring on the host: each slot's
  # window holds exactly the stored frame's planes inside the (even) box.
  record = built[0].as_data_source('train')[0]
  index = np.array([2, 3, 9, -1, 4])                 # one padding slot
  got = clip_storage.gather_frames(
      record, index, geometry=lambda h, w: (box, flip),
      frame_format='yuv420_unscaled', window=(64, 88))
  assert got.y.shape == (5, 64, 88) and got.uv.shape == (5, 2, 32, 44)
  assert got.y.dtype == got.uv.dtype == np.uint8
  assert bool(got.flip) == flip
  if box is None:
    # The whole 64x114 frame does not fit 64x88: scaled down on the host to
    # fit, aspect kept (64 * 88/114 = 49.4 -> 48 rows, 88 columns), like
    # the host's scaling of the whole frame.
    np.testing.assert_array_equal(got.box_hw, [48, 88])
    assert (got.y[:, 48:] == 16).all()                # the rest stays black
    whole = clip_storage.gather_frames(record, index[:3], size=48,
                                       frame_format='yuv420')
    shrunk = np.stack([pil_resize(y, 48) for y in got.y[:3, :48, :88]])
    assert np.abs(shrunk.astype(int) - whole.y).mean() < 3
    return
  x0, y0, x1, y1 = clip_storage.even_box(box, 64, 114)
  np.testing.assert_array_equal(got.box_hw, [y1 - y0, x1 - x0])
  for slot, frame in zip([0, 1, 2, 4], stored_planes(record, [2, 3, 9, 4])):
    y, u, v = planes_of(frame)
    h, w = y1 - y0, x1 - x0
    np.testing.assert_array_equal(got.y[slot, :h, :w], y[y0:y1, x0:x1])
    np.testing.assert_array_equal(got.uv[slot, 0, :h // 2, :w // 2],
                                  u[y0 // 2:y1 // 2, x0 // 2:x1 // 2])
    np.testing.assert_array_equal(got.uv[slot, 1, :h // 2, :w // 2],
                                  v[y0 // 2:y1 // 2, x0 // 2:x1 // 2])
  assert (got.y[3] == 16).all() and (got.uv[3] == 128).all()   # padding
  with pytest.raises(ValueError, match='window'):
    clip_storage.gather_frames(record, index, frame_format='yuv420_unscaled',
                               window=(63, 88))


def pil_resize(plane: np.ndarray, size: int) -> np.ndarray:
  return np.asarray(Image.fromarray(plane).resize((size, size),
                                                  Image.Resampling.BILINEAR))


@pytest.mark.parametrize('height,width,size', [(50, 66, 28), (40, 34, 56),
                                               (64, 88, 64)])
def test_step_scales_unscaled_frames_as_pil_does(height, width, size):
  # Independent reference: PIL's bilinear resize (a triangle filter widened
  # when shrinking, in fixed point with uint8 between its two passes) of the
  # box alone; the window around it must not leak in. Shrinking, growing,
  # and the whole window.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 256, (2, 3, 64, 88), dtype=np.uint8)
  uv = rng.integers(0, 256, (2, 3, 2, 32, 44), dtype=np.uint8)
  box_hw = np.array([[height, width], [height, width]], np.int32)
  flip = np.array([False, True])
  got_y, got_uv = jax.jit(augment_lib.scale_unscaled_frames,
                          static_argnums=4)(y, uv, box_hw, flip, size)
  assert got_y.shape == (2, 3, size, size) and got_y.dtype == np.uint8
  assert got_uv.shape == (2, 3, 2, size // 2, size // 2)
  for b in range(2):
    mirror = (lambda x: x[:, ::-1]) if flip[b] else (lambda x: x)
    for t in range(3):
      want = pil_resize(y[b, t, :height, :width], size)
      d = np.abs(np.asarray(got_y[b, t], int) - mirror(want))
      assert d.max() <= 1, d.max()         # PIL's intermediate rounding
      for c in range(2):
        want = pil_resize(uv[b, t, c, :height // 2, :width // 2], size // 2)
        d = np.abs(np.asarray(got_uv[b, t, c], int) - mirror(want))
        assert d.max() <= 1, d.max()


def test_unscaled_train_batches_become_the_scaled_frames_in_the_step(built):
  # The same clips, crops, flips and jitter draws as 'yuv420'; the step's
  # scaling (after the crop, before the flip) against swscale's on the host
  # (flip before scaling): two bilinear filters, close but not equal.
  builder, _ = built
  source = builder.as_data_source('train')
  configs = []
  for frame_format in ('yuv420', 'yuv420_unscaled'):
    c = paper_like_config()
    c.input.batch_size = 2
    c.input.augment.color_jitter_on = 'device'
    c.input.frame_format = frame_format
    c.input.unscaled_window = (64, 88)
    configs.append(c)
  scaled, unscaled = (next(pipeline.make_train_iterator(
      c, source, process_index=0, process_count=1)) for c in configs)
  assert unscaled['frames_y'].shape == (2, 8, 64, 88)
  assert unscaled['frames_uv'].shape == (2, 8, 2, 32, 44)
  assert unscaled['frames_box_hw'].shape == (2, 2)
  assert unscaled['frames_flip'].shape == (2,)
  for key in ('frame_index', 'color_factors', 'waveform', 'clip_index'):
    np.testing.assert_array_equal(unscaled[key], scaled[key])
  step = jax.jit(augment_lib.frames_for_model, static_argnums=1)
  got, want = np.asarray(step(unscaled, 56)), np.asarray(step(scaled, 56))
  assert got.shape == want.shape == (2, 8, 56, 56, 3)
  d = np.abs(got.astype(int) - want)
  if builder.builder_config.frame_codec == 'h264':
    # Measured: mean 0.21, 99th percentile 3, max 7 (on the benchmark's
    # 456x256 frames to 224: mean 0.15, max 5).
    assert d.mean() < 0.4 and np.percentile(d, 99) <= 4, d.mean()
  else:
    # JPEG frames are RGB: 'yuv420' scales them before taking 4:2:0 chroma,
    # 'yuv420_unscaled' after; colour edges differ (measured: mean 2.2).
    assert d.mean() < 3, d.mean()
  unflipped = dict(unscaled, frames_flip=~unscaled['frames_flip'])
  other = np.asarray(step(unflipped, 56))
  assert np.abs(other.astype(int) - want).mean() > 4 * d.mean()


def test_clips_can_start_on_key_frames_only(built):
  builder, _ = built
  source = builder.as_data_source('train')
  config = paper_like_config()          # T = 8 of 24 stored frames
  config.input.clip_starts = 'key_frames'
  example = pipeline._TrainExample(source, config, seed=0)
  starts = {int(example((epoch, 0))['frame_index'][0]) for epoch in range(40)}
  if builder.builder_config.frame_codec == 'h264':
    assert starts == {0, 8, 16}         # the segment starts (SEGMENT = 8)
  else:
    assert starts <= set(range(17)) and len(starts) > 3   # every frame
  config.input.clip_starts = 'any'
  example = pipeline._TrainExample(source, config, seed=0)
  assert len({int(example((epoch, 0))['frame_index'][0])
              for epoch in range(40)}) > 3
  config.input.clip_starts = 'segments'
  with pytest.raises(ValueError, match='clip_starts'):
    pipeline._TrainExample(source, config, seed=0)((0, 0))


def test_train_examples_from_jpeg_records(built):
  builder, _ = built
  config = paper_like_config()
  config.input.batch_size = 2
  it = pipeline.make_train_iterator(config, builder.as_data_source('train'),
                                    process_index=0, process_count=1)
  batch = next(it)
  assert batch['frames'].shape == (2, 8, 56, 56, 3)
  assert batch['frames'].dtype == np.uint8 and batch['frames'].std() > 10


def _with_unit_bytes(record, data_key: str, offsets_key: str, index: int,
                     replace):
  """A copy of `record` whose encoded unit `index` (a JPEG frame or an
  H.264 segment) is `replace(its bytes)`."""
  data = np.asarray(record[data_key]).tobytes()
  offsets = np.asarray(record[offsets_key])
  lo, hi = int(offsets[index]), int(offsets[index + 1])
  new = replace(data[lo:hi])
  out = dict(record)
  out[data_key] = np.frombuffer(data[:lo] + new + data[hi:], np.uint8)
  out[offsets_key] = np.concatenate(
      [offsets[:index + 1], offsets[index + 1:] + len(new) - (hi - lo)])
  return out


@pytest.mark.parametrize('damage', [
    lambda b: b'\x00' * 16 + b[16:],          # header overwritten
    lambda b: b[:len(b) // 2],                 # truncated
], ids=['bad_header', 'truncated'])
def test_corrupt_frame_names_the_record_and_frame(built, damage):
  builder, _ = built
  record = builder.as_data_source('train')[0]
  config = paper_like_config()
  if builder.builder_config.frame_codec == 'jpeg':
    record = _with_unit_bytes(record, 'frames_jpeg', 'frame_offsets', 7, damage)
    expected = r"record 'textured': frame 7 does not decode"
  else:   # segment 0 holds frames 0-7; the clip from 4 needs 4-7 from it
    record = _with_unit_bytes(record, 'frames_h264', 'segment_offsets', 0,
                              damage)
    expected = (r"record 'textured': frame [4-7] does not decode \(H.264 "
                r'segment 0')
  with pytest.raises(ValueError, match=expected):
    sampling.cut_clip(record, 4, config)
  # The same line when the frames are cropped, scaled and kept as 4:2:0.
  with pytest.raises(ValueError, match=expected):
    sampling.cut_clip(record, 4, config, size=56, frame_format='yuv420')
  sampling.cut_clip(record, 8, config)    # the other frames still decode
  sampling.cut_clip(record, 8, config, size=56, frame_format='yuv420')


def test_dataset_of_an_older_builder_version_is_refused(tmp_path):
  data_dir = tmp_path / 'data'
  old = data_dir / 'vggsound' / 'test' / '1.0.0'
  old.mkdir(parents=True)
  (old / 'dataset_info.json').write_text('{}')
  config = config_lib.base_config()
  config.dataset.data_dir = str(data_dir)
  config.dataset.manual_dir = '/data/vggsound'
  fresh = make_builder(data_dir)
  assert not fresh.is_prepared()
  with pytest.raises(SystemExit) as e:
    input_data.ensure_built(config, fresh)
  message = str(e.value.code)
  assert '\n' not in message
  assert 'version(s) 1.0.0' in message and 'reads 2.1.0' in message
  assert 'Rebuild it: python -m tavlo_datasets.build vggsound' in message
