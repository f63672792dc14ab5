"""What real uploads contain, written with PyAV: each is read correctly or
refused with one line naming the file and the problem.

Variable frame rate, 48 kHz 5.1 AAC, audio shorter or longer than the video,
a rotation tag, odd frame sizes and a video stream without frames; then all
of them through the VGGSound builder with `on_bad_example=skip`, which keeps
the good ones and counts the refused ones.
"""

from fractions import Fraction
import json

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fixtures import avatar_release as fixture
from tavlo_datasets import clip_storage, media, robustness
from tavlo_datasets.robustness import BadExample
from tavlo_datasets.vggsound import Builder, VggsoundConfig

FPS = 8.0
RATE = 16000


def grey(level: int, size=(48, 64)) -> np.ndarray:
  return np.full(size + (3,), level, np.uint8)


def write(path, *, frame_times, size=(48, 64), pix_fmt='yuv420p', codec='libx264',
          audio_seconds=None, audio_rate=16000, layout='mono', tone_hz=440.0,
          rotation=None, images=None):
  """An mp4 whose frame i (a flat grey of `fixture.frame_value(i)`, unless
  `images`) is shown at `frame_times[i]` (s); audio: a tone of
  `audio_seconds` on every channel of `layout`."""
  h, w = size
  with av.open(str(path), 'w') as container:
    video = container.add_stream(codec, rate=30)
    video.width, video.height, video.pix_fmt = w, h, pix_fmt
    video.time_base = Fraction(1, 1000)
    video.codec_context.time_base = Fraction(1, 1000)
    if rotation is not None:
      video.set_display_rotation(rotation)
    audio = None
    if audio_seconds is not None:
      audio = container.add_stream('aac', rate=audio_rate)
      audio.layout = layout
    for i, t in enumerate(frame_times):
      image = grey(fixture.frame_value(i), size) if images is None else images[i]
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = int(round(t * 1000))
      frame.time_base = Fraction(1, 1000)
      container.mux(video.encode(frame))
    container.mux(video.encode())
    if audio is not None:
      n = int(round(audio_seconds * audio_rate))
      tone = 0.3 * np.sin(2 * np.pi * tone_hz * np.arange(n) / audio_rate)
      channels = av.AudioLayout(layout).nb_channels
      samples = np.repeat(tone[None].astype(np.float32), channels, 0)
      frame = av.AudioFrame.from_ndarray(samples, format='fltp', layout=layout)
      frame.sample_rate, frame.pts = audio_rate, 0
      container.mux(audio.encode(frame))
      container.mux(audio.encode())
  return path


def regular(n, fps=10.0):
  return [i / fps for i in range(n)]


def levels(frames) -> list[int]:
  """Which source frame each decoded frame shows (from its grey level)."""
  return [int(round((float(f.mean()) - 4) / 9)) for f in frames]


def read(path):
  return media.read_clip(path, fps=FPS, frame_size=(32, 32), sample_rate=RATE)


def test_variable_frame_rate_picks_the_nearest_frame_by_time(tmp_path):
  # Frame gaps of 40-160 ms, as a phone writes when the light changes.
  gaps = np.random.default_rng(0).uniform(0.04, 0.16, 20)
  times = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]).round(3)
  path = write(tmp_path / 'vfr.mp4', frame_times=times, audio_seconds=times[-1] + 0.1)
  clip = read(path)
  slots = np.arange(len(clip['frames'])) / FPS
  want = [int(np.argmin(np.abs(times - t) + 1e-9 * np.arange(len(times))))
          for t in slots]
  assert levels(clip['frames']) == want
  np.testing.assert_allclose(clip['frame_times'], times[want], atol=1e-3)


def test_48khz_5_1_aac_is_mixed_down_to_mono_at_the_model_rate(tmp_path):
  path = write(tmp_path / 'surround.mp4', frame_times=regular(20),
               audio_seconds=2.0, audio_rate=48000, layout='5.1', tone_hz=500.0)
  with av.open(str(path)) as c:
    assert (c.streams.audio[0].rate, c.streams.audio[0].layout.nb_channels) == (48000, 6)
  wave = read(path)['waveform']
  assert wave.shape == (int(round(media.video_info(path).duration * RATE)),)
  spectrum = np.abs(np.fft.rfft(wave[RATE // 4:-RATE // 4]))
  peak_hz = np.argmax(spectrum) * RATE / (len(wave) - RATE // 2)
  assert abs(peak_hz - 500.0) < 5
  assert np.abs(wave[RATE // 4:-RATE // 4]).max() > 0.1     # not lost in the mix


@pytest.mark.parametrize('audio_seconds', [1.0, 1.9, 2.1, 3.0])
def test_waveform_spans_the_video(tmp_path, audio_seconds):
  """Audio a little shorter is padded with silence, longer audio is cut at
  the video's end; audio missing for much of the video is refused."""
  path = write(tmp_path / 'clip.mp4', frame_times=regular(20),
               audio_seconds=audio_seconds)
  if audio_seconds < 1.5:
    with pytest.raises(BadExample, match=r'short_audio: the audio stream ends at '
                       r'1\.0\d* s, the video at 1\.9\d* s'):
      read(path)
    return
  wave = read(path)['waveform']
  video_seconds = media.video_info(path).duration
  assert wave.shape == (int(round(video_seconds * RATE)),)
  heard = min(audio_seconds, video_seconds)
  assert np.abs(wave[int(0.5 * RATE):int((heard - 0.1) * RATE)]).max() > 0.2
  if audio_seconds < video_seconds:
    assert np.abs(wave[int((heard + 0.03) * RATE):]).max() < 1e-3   # padded silence


def test_rotation_tag_is_applied_as_a_player_would(tmp_path):
  """A portrait phone video: stored 64 wide x 48 high, tagged to turn 90
  degrees clockwise; the bright left half of the stored frame is on top."""
  stored = np.zeros((48, 64, 3), np.uint8)
  stored[:, :32] = 220
  path = write(tmp_path / 'portrait.mp4', frame_times=regular(10),
               audio_seconds=1.0, rotation=-90, images=[stored] * 10)
  frames, _, original = media.read_video(path, FPS)
  assert original == (48, 64)                           # (width, height) as shown
  assert frames.shape[1:] == (64, 48, 3)
  top, bottom = frames[0, :28].mean(), frames[0, 36:].mean()
  assert top > 180 and bottom < 40, (top, bottom)
  clip = read(path)
  assert (int(clip['original_width']), int(clip['original_height'])) == (48, 64)
  assert clip['frames'][0, :14].mean() > 180 and clip['frames'][0, 18:].mean() < 40


def test_odd_frame_size_is_read_and_resized(tmp_path):
  path = write(tmp_path / 'odd.mp4', frame_times=regular(10), size=(45, 61),
               pix_fmt='yuv444p', audio_seconds=1.0)
  clip = read(path)
  assert (int(clip['original_width']), int(clip['original_height'])) == (61, 45)
  assert clip['frames'].shape == (8, 32, 32, 3)
  assert levels(clip['frames']) == [0, 1, 2, 4, 5, 6, 7, 9]


def test_video_stream_without_frames_is_refused(tmp_path):
  path = write(tmp_path / 'empty.mp4', frame_times=[], audio_seconds=1.0)
  with pytest.raises(BadExample, match=r'empty\.mp4: (no_video|corrupt_video): '):
    read(path)


@pytest.mark.slow
def test_builder_keeps_what_it_can_read_and_counts_the_rest(tmp_path):
  manual = tmp_path / 'vggsound'
  manual.mkdir()
  good = {
      'vfr': dict(frame_times=[0, .05, .2, .26, .4, .55, .6, .75, .9, 1.0],
                  audio_seconds=1.1),
      'surround': dict(frame_times=regular(10), audio_seconds=1.0,
                       audio_rate=48000, layout='5.1'),
      'long_audio': dict(frame_times=regular(10), audio_seconds=2.0),
      'portrait': dict(frame_times=regular(10), audio_seconds=1.0, rotation=90),
      'odd': dict(frame_times=regular(10), size=(45, 61), pix_fmt='yuv444p',
                  audio_seconds=1.0),
  }
  bad = {
      'short_audio': (dict(frame_times=regular(20), audio_seconds=0.5), 'short_audio'),
      'no_frames': (dict(frame_times=[], audio_seconds=1.0), None),
  }
  for name, kwargs in {**good, **{k: v[0] for k, v in bad.items()}}.items():
    write(manual / f'{name}.mp4', **kwargs)
  (manual / 'ids.txt').write_text('\n'.join([*good, *bad]) + '\n')
  builder = Builder(config=VggsoundConfig(name='uploads', ids_file='ids.txt',
                                          fps=FPS, frame_short_side=32,
                                          on_bad_example='skip'),
                    data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
      file_format='array_record')
  built = {r['video_id'].decode(): r for r in builder.as_data_source(split='train')}
  assert set(built) == set(good)
  # Stored as shown: the 64x48 landscape source with a 90-degree tag is a
  # portrait clip, short side 32.
  first = clip_storage.gather_frames(built['portrait'], [0])
  assert first.shape[1] > first.shape[2] == 32, first.shape
  summary = robustness.read_summary(builder.data_dir)
  assert summary['num_skipped'] == len(bad), json.dumps(summary)
  kinds = {e['id']: e['kind'] for e in summary['skipped']}
  assert set(kinds) == set(bad), json.dumps(summary)
  for name, (_, kind) in bad.items():
    assert kind is None or kinds[name] == kind, json.dumps(summary)


def test_localize_reads_the_same_span_and_refuses_the_same_files(tmp_path):
  from tavlo_jax import video_maps   # pylint: disable=g-import-not-at-top
  long_audio = write(tmp_path / 'long.mp4', frame_times=regular(10), audio_seconds=3.0)
  info = media.video_info(long_audio)
  wave = video_maps._read_waveform(str(long_audio), info, RATE, 'error')  # pylint: disable=protected-access
  np.testing.assert_array_equal(wave, read(long_audio)['waveform'])
  short = write(tmp_path / 'short.mp4', frame_times=regular(20), audio_seconds=0.5)
  with pytest.raises(BadExample, match='short.mp4: short_audio: '):
    video_maps._read_waveform(str(short), media.video_info(short), RATE, 'error')  # pylint: disable=protected-access
