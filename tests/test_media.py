"""datasets/media.py: PyAV read/write against what was written."""

import av
import numpy as np
import pytest

from fixtures import avatar_release as fixture
from tavlo_datasets import media
from tavlo_datasets.robustness import BadExample


def picked_source_frames(frames: np.ndarray, num_source: int) -> np.ndarray:
  """Which source frame each decoded frame shows (from its grey level)."""
  levels = np.asarray([fixture.frame_value(i) for i in range(num_source)])
  means = frames.reshape(len(frames), -1).mean(1)
  return np.abs(means[:, None] - levels[None]).argmin(1)


def expected_source_frames(num_source: int, source_fps: float,
                           fps: float) -> np.ndarray:
  """float64 reference: nearest source frame to k / fps (earlier on ties)."""
  end = num_source / source_fps
  num_out = int(np.ceil(end * fps - 1e-9))
  targets = np.arange(num_out, dtype=np.float64) / fps
  source_times = np.arange(num_source, dtype=np.float64) / source_fps
  distance = np.abs(targets[:, None] - source_times[None])
  return np.argmin(np.round(distance, 9), axis=1)   # argmin: first of ties


@pytest.fixture(scope='module')
def video_12fps(tmp_path_factory):
  video = fixture.FixtureVideo('v', fps=12.5, num_frames=25, audio_rate=22050,
                               tone_hz=500.0)
  path = fixture.write_video(tmp_path_factory.mktemp('m') / 'v.mp4', video)
  return path, video


def test_write_mp4_has_h264_and_aac_streams(video_12fps):
  path, video = video_12fps
  with av.open(str(path)) as container:
    (v,), (a,) = container.streams.video, container.streams.audio
    assert v.codec_context.name == 'h264'
    assert v.codec_context.pix_fmt == 'yuv420p'
    assert (v.codec_context.height, v.codec_context.width) == video.size
    assert float(v.average_rate) == video.fps
    assert a.codec_context.name == 'aac'
    assert a.sample_rate == video.audio_rate and a.layout.name == 'mono'
  info = media.video_info(path)
  assert (info.width, info.height) == (64, 48) and info.has_audio
  assert info.duration == pytest.approx(video.duration)


@pytest.mark.parametrize('fps', [8.0, 12.5, 30.0])
def test_read_video_picks_frames_by_timestamp(video_12fps, fps):
  path, video = video_12fps
  frames, times, original = media.read_video(path, fps, size=(24, 32))
  expected = expected_source_frames(video.num_frames, video.fps, fps)
  assert frames.shape == (len(expected), 24, 32, 3) and frames.dtype == np.uint8
  assert original == (64, 48)
  np.testing.assert_array_equal(
      picked_source_frames(frames, video.num_frames), expected)
  # frame_times are the picked source frames' timestamps ...
  np.testing.assert_allclose(times, expected / video.fps, atol=1e-6)
  # ... so within half a source period of the output grid (until the last
  # source frame, which is shown for one whole period).
  grid = np.arange(len(expected)) / fps
  inner = grid <= (video.num_frames - 1) / video.fps
  assert np.all(np.abs(times - grid)[inner] <= 0.5 / video.fps + 1e-5)
  assert grid[-1] < video.duration <= grid[-1] + 1 / fps


def test_pinned_times_show_their_exact_source_frame(video_12fps):
  path, video = video_12fps
  # 0.4 s = source frame 5; slot round(0.4 * 8) = 3 (grid 0.375 s would show
  # frame 5 anyway); 0.32 s = frame 4 -> slot 3 is taken, so the first wins.
  # 1.12 s = frame 14 -> slot 9 (grid 1.125 s), 1.36 s = frame 17 -> slot 11
  # (grid 1.375 s would show frame 17 too), 0.56 s = frame 7 -> slot 4 (grid
  # 0.5 s would show frame 6).
  pinned = [0.56, 0.4, 0.32]
  frames, times, _ = media.read_video(path, 8.0, (24, 32),
                                      pinned_times=pinned)
  picked = picked_source_frames(frames, video.num_frames)
  assert picked[4] == 7 and picked[3] == 5
  expected = expected_source_frames(video.num_frames, video.fps, 8.0)
  others = [k for k in range(len(picked)) if k not in (3, 4)]
  np.testing.assert_array_equal(picked[others], expected[others])
  np.testing.assert_allclose(times[[3, 4]], [0.4, 0.56], atol=1e-6)
  np.testing.assert_allclose(
      media.output_times(2.0, 8.0, pinned)[2:6], [0.25, 0.4, 0.56, 0.625])
  with pytest.raises(ValueError, match='outside'):
    media.output_times(2.0, 8.0, [2.0])


def test_read_video_without_resize_keeps_the_size(video_12fps):
  path, video = video_12fps
  frames, _, original = media.read_video(path, 8.0)
  assert frames.shape[1:] == (*video.size, 3) and original == (64, 48)


@pytest.mark.parametrize('rate', [16000, 8000])
def test_read_audio_resamples_and_trims(video_12fps, rate):
  path, video = video_12fps
  # What the decoder gives without trimming: whole AAC frames, too long.
  with av.open(str(path)) as container:
    raw = sum(f.samples for f in container.decode(audio=0))
  assert raw > video.duration * video.audio_rate

  wave = media.read_audio(path, rate)
  assert wave.dtype == np.float32
  assert wave.shape == (int(round(video.duration * rate)),)
  t = np.arange(len(wave), dtype=np.float64) / rate
  reference = 0.3 * np.sin(2 * np.pi * video.tone_hz * t)
  inner = slice(rate // 20, -rate // 20)   # resampler edges aside
  assert np.corrcoef(wave[inner], reference[inner])[0, 1] > 0.98
  assert np.abs(wave[inner] - reference[inner]).max() < 0.06


def test_read_clip_fields(video_12fps):
  path, video = video_12fps
  clip = media.read_clip(path, fps=8.0, frame_size=(24, 32),
                         sample_rate=16000)
  assert clip['frames'].shape == (16, 24, 32, 3)
  assert clip['waveform'].shape == (32000,)
  assert (int(clip['original_width']), int(clip['original_height'])) == (64, 48)
  assert int(clip['sample_rate']) == 16000 and float(clip['fps']) == 8.0


def test_no_audio_stream_is_a_bad_example(tmp_path):
  path = fixture.write_video(tmp_path / 'mute.mp4', fixture.FixtureVideo(
      'mute', audio_rate=None))
  assert not media.video_info(path).has_audio
  assert len(media.read_video(path, 8.0)[0]) == 16     # the video is fine
  for read in (media.read_audio,
               lambda p: media.read_clip(p, fps=8.0, frame_size=(24, 32),
                                         sample_rate=16000)):
    with pytest.raises(BadExample, match=r'mute\.mp4: no_audio'):
      read(path)


def test_garbage_file_is_a_bad_example(tmp_path):
  path = tmp_path / 'garbage.mp4'
  path.write_bytes(np.random.default_rng(0).bytes(3000))
  for read in (media.video_info, media.read_audio,
               lambda p: media.read_video(p, 8.0)):
    with pytest.raises(BadExample, match=r'garbage\.mp4: corrupt_video'):
      read(path)


@pytest.mark.parametrize('faststart', [False, True])
def test_truncated_file_is_a_bad_example(tmp_path, faststart):
  video = fixture.FixtureVideo('t', num_frames=20)
  rng = np.random.default_rng(0)   # noise: frames take real space in the file
  frames = rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)
  path = tmp_path / 't.mp4'
  media.write_mp4(path, frames, video.fps, video.waveform(), 16000,
                  faststart=faststart)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * 0.7)])
  # Index at the end (cut off): does not open. Index first: opens, and the
  # missing frames/samples are noticed instead of returning a short clip.
  with pytest.raises(BadExample, match=r't\.mp4: corrupt_video'):
    media.read_video(path, 8.0)
  with pytest.raises(BadExample, match=r't\.mp4: corrupt_video'):
    media.read_audio(path)


def test_write_mp4_rejects_odd_sizes(tmp_path):
  with pytest.raises(ValueError, match='even'):
    media.write_mp4(tmp_path / 'odd.mp4', np.zeros((2, 47, 64, 3), np.uint8),
                    10.0)


def test_find_files_walks_subfolders(tmp_path):
  for name in ('a/x.mp4', 'a/b/y.mp4', 'z.json'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  found = media.find_files(tmp_path, '.mp4')
  assert [p.name for p in found] == ['y.mp4', 'x.mp4']
