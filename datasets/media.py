"""mp4 reading and writing with PyAV (FFmpeg bundled in the wheel; no TF).

  read_video   frames resampled to a fixed fps by timestamp, optionally resized
  read_audio   mono float waveform at a given rate, trimmed to the stream length
  video_info   stream facts (fps, size, duration, audio present) without decoding
  read_clip    the clip fields of a `schema` record (frames, times, waveform
               over exactly the video's span)
  write_mp4    h264 (yuv420p) + aac: test fixtures, releases, map overlays
  find_files   every file with a suffix under a folder (local or cloud)

Any file that does not open, does not decode, or decodes to less than its
container says it holds (a truncated download) raises
`robustness.BadExample(kind='corrupt_video')`; a missing stream raises
`kind='no_video'` / `'no_audio'`. Never a silently short clip.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
import itertools
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import av
from etils import epath
import numpy as np

from tavlo_datasets.robustness import BadExample


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  fps: float            # the video stream's average frame rate
  width: int
  height: int
  duration: float       # seconds, of the video stream
  has_audio: bool


def _open(path) -> av.container.InputContainer:
  try:
    return av.open(os.fspath(path))
  except (av.FFmpegError, OSError) as e:
    raise BadExample(path, 'corrupt_video',
                     f'cannot open as a media file ({e})') from e


def _video_stream(container, path):
  if not container.streams.video:
    raise BadExample(path, 'no_video', 'the file has no video stream')
  return container.streams.video[0]


def _seconds(value, time_base) -> Optional[float]:
  if value is None or time_base is None:
    return None
  return float(value * time_base)


def _stream_duration(stream, container) -> Optional[float]:
  # Stream duration when the muxer wrote one (mp4 does), else the container's.
  duration = _seconds(stream.duration, stream.time_base)
  if duration is None and container.duration is not None:
    duration = container.duration / av.time_base
  return duration


def video_info(path) -> VideoInfo:
  with _open(path) as container:
    stream = _video_stream(container, path)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
      raise BadExample(path, 'corrupt_video', 'video stream has no frame rate')
    duration = _stream_duration(stream, container)
    if duration is None:
      raise BadExample(path, 'corrupt_video', 'video stream has no duration')
    return VideoInfo(fps=float(rate), width=stream.codec_context.width,
                     height=stream.codec_context.height, duration=duration,
                     has_audio=bool(container.streams.audio))


def output_times(duration: float, fps: float,
                 pinned_times: Sequence[float] = ()) -> np.ndarray:
  """The times (s, float64) whose source frames `read_video` returns.

  Slot k is at k / fps, for every k / fps before `duration`. A pinned time t
  (an annotated source frame's time) replaces the time of its nearest slot,
  round(t * fps), so that slot shows exactly that source frame and a mask
  drawn on it matches its pixels. Slot times stay non-decreasing. When two
  pinned times share a slot, the first one keeps it.
  """
  times = np.arange(int(math.ceil(duration * fps - 1e-6)), dtype=np.float64)
  times /= fps
  pinned_slots = set()
  for t in pinned_times:
    if not 0 <= t < duration:
      raise ValueError(f'pinned time {t} outside the video [0, {duration})')
    slot = min(int(math.floor(t * fps + 0.5)), len(times) - 1)
    if slot not in pinned_slots:
      pinned_slots.add(slot)
      times[slot] = t
  return times


def read_video(path, fps: float,
               size: Optional[tuple[int, int] | Callable[[int, int], tuple[int, int]]] = None,
               pinned_times: Sequence[float] = ()):
  """Decodes the frames shown at times 0, 1/fps, 2/fps, ... of the video.

  Args:
    path: the mp4 file.
    fps: output frame rate. Output frame k is the source frame whose
      presentation time (relative to the stream's first frame) is nearest to
      `output_times(...)[k]` (= k / fps, or a pinned time), the earlier one on
      a tie; k runs while k / fps is before the end of the video stream.
    size: (height, width) to resize to (swscale, bilinear); or a function of
      the displayed (width, height) that returns it (the size then follows the
      orientation a rotation tag gives); or None (the displayed size).
    pinned_times: source frame times that must appear exactly (see
      `output_times`).

  Returns:
    frames: uint8 [N, H, W, 3] RGB.
    frame_times: f32 [N], the presentation time (s) of each picked source
      frame, so |frame_times[k] - k / fps| <= half a source frame period
      (except after the last source frame, which is shown for one period,
      and at pinned slots, which are within half an output period).
    original_size: (width, height) of the source video as a player shows it
      (a display rotation tag applied: a portrait phone video is tall).
  """
  if fps <= 0:
    raise ValueError(f'fps must be positive, got {fps}')
  with _open(path) as container:
    stream = _video_stream(container, path)
    coded = (stream.codec_context.width, stream.codec_context.height)
    duration = _stream_duration(stream, container)
    if not duration:
      raise BadExample(path, 'corrupt_video', 'video stream has no duration')
    targets = output_times(duration, fps, pinned_times)
    expected_frames = stream.frames or None
    start = _seconds(stream.start_time, stream.time_base) or 0.0
    # Set from the first frame: its display rotation (a phone's portrait
    # video is stored landscape with a rotation tag) decides the shown size.
    quarter_turns = None
    original = coded

    frames, times = [], []
    previous = None      # (time, av frame, cached rgb or None) of last frame
    decoded = 0

    def take(item):
      t, frame, rgb = item
      if rgb is None:    # each source frame is converted at most once
        if callable(size):
          height, width = size(*original)
        else:
          height, width = size if size is not None else (original[1], original[0])
        rgb = _displayed_rgb(frame, quarter_turns, height, width)
      frames.append(rgb)
      times.append(t)
      return (t, frame, rgb)

    try:
      for frame in container.decode(stream):
        if frame.time is None:
          raise BadExample(path, 'corrupt_video',
                           f'frame {decoded} has no timestamp')
        if quarter_turns is None:
          quarter_turns = _quarter_turns(frame, path)
          original = coded[::-1] if quarter_turns % 2 else coded
        current = (frame.time - start, frame, None)
        decoded += 1
        if previous is not None:
          # Slots whose time is nearer to `previous` than to `current`.
          midpoint = (previous[0] + current[0]) / 2
          while len(frames) < len(targets) and targets[len(frames)] <= midpoint:
            previous = take(previous)
        previous = current
    except av.FFmpegError as e:
      raise BadExample(path, 'corrupt_video',
                       f'decoding failed after {decoded} frames ({e})') from e
    if previous is None:
      raise BadExample(path, 'corrupt_video', 'no video frame decodes')
    if expected_frames is not None and decoded < expected_frames:
      raise BadExample(path, 'corrupt_video',
                       f'truncated: {decoded} of {expected_frames} frames '
                       'decode')
    while len(frames) < len(targets):   # the last frame shows until the end
      previous = take(previous)
  return (np.stack(frames).astype(np.uint8), np.asarray(times, np.float32),
          original)


def _quarter_turns(frame, path) -> int:
  """Counter-clockwise quarter turns that show `frame` upright (its display
  matrix; players apply it, the decoder does not)."""
  degrees = frame.rotation or 0
  if degrees % 90:
    raise BadExample(path, 'corrupt_video',
                     f'display rotation of {degrees} degrees; expected a '
                     'multiple of 90')
  return (degrees // 90) % 4


def _displayed_rgb(frame, quarter_turns: int, height: int, width: int):
  """[height, width, 3] RGB of the frame as a player shows it: resized in
  its stored orientation, then turned."""
  if quarter_turns % 2:
    height, width = width, height
  rgb = frame.to_ndarray(width=width, height=height, format='rgb24')
  return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def read_audio(path, sample_rate: int = 16000) -> np.ndarray:
  """The first audio stream as f32 mono at `sample_rate`, trimmed.

  AAC decoders emit whole 1024-sample frames, so the decoded signal is padded
  past the true end; it is cut to the stream's duration (as the container
  records it). A stream that decodes to clearly less than that is truncated.
  """
  with _open(path) as container:
    if not container.streams.audio:
      raise BadExample(path, 'no_audio', 'the file has no audio stream')
    stream = container.streams.audio[0]
    duration = _stream_duration(stream, container)
    resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
    chunks = []
    try:
      for frame in container.decode(stream):
        chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
      chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    except av.FFmpegError as e:
      raise BadExample(path, 'corrupt_video',
                       f'audio decoding failed ({e})') from e
  wave = (np.concatenate(chunks, axis=1)[0] if chunks
          else np.zeros((0,), np.float32))
  if duration is None:
    return wave.astype(np.float32)
  expected = int(round(duration * sample_rate))
  # One codec frame of slack: the resampler's filter delay can hold back a
  # few samples at the very end.
  slack = int(math.ceil(2048 * sample_rate / (stream.sample_rate or
                                               sample_rate)))
  if wave.shape[0] < expected - slack:
    raise BadExample(path, 'corrupt_video',
                     f'truncated audio: {wave.shape[0]} of {expected} samples '
                     'decode')
  wave = wave[:expected]
  if wave.shape[0] < expected:
    wave = np.pad(wave, (0, expected - wave.shape[0]))
  return wave.astype(np.float32)


# Audio may end this much before the video and be padded with silence:
# encoder priming and muxers' rounding leave real uploads tens of ms apart.
# A longer gap would leave frames with no sound to localise: refused.
MAX_AUDIO_SHORTFALL_S = 0.25


def audio_for_video(path, waveform: np.ndarray, sample_rate: int,
                    video_seconds: float) -> np.ndarray:
  """The waveform over the video's span [0, video_seconds): audio past the
  last frame is cut, a short tail (<= MAX_AUDIO_SHORTFALL_S) is padded with
  silence, a longer shortfall is a `short_audio` bad example."""
  want = int(round(video_seconds * sample_rate))
  have = waveform.shape[0]
  if want - have > MAX_AUDIO_SHORTFALL_S * sample_rate:
    raise BadExample(path, 'short_audio',
                     f'the audio stream ends at {have / sample_rate:.3f} s, '
                     f'the video at {video_seconds:.3f} s; expected audio for '
                     f'the whole video (at most {MAX_AUDIO_SHORTFALL_S} s short)')
  return np.pad(waveform[:want], (0, max(want - have, 0))).astype(np.float32)


def write_mp4(path, frames: Iterable[np.ndarray], fps: float,
              waveform: Optional[np.ndarray] = None, sample_rate: int = 16000,
              crf: int = 18, faststart: bool = False, *, audio_from=None,
              pad_odd: bool = False) -> None:
  """Writes RGB uint8 frames [N, H, W, 3] as h264 and audio as aac.

  `frames` may be any iterable of [H, W, 3] frames (an overlay of an HD
  video is streamed, never held whole). H and W must be even (yuv420p
  halves the chroma planes) unless `pad_odd`, which repeats the last
  row/column. Audio: `waveform` (mono, at `sample_rate`), or `audio_from`,
  a media file whose first audio stream is re-encoded (cut to its own
  duration), or neither (a file without an audio stream). `faststart` puts
  the index (moov) before the data, as web downloads have it: such a file
  still opens when its end is cut off.
  """
  frames = iter(frames)
  first = next(frames, None)
  if first is None or np.ndim(first) != 3 or np.shape(first)[-1] != 3 or (
      np.asarray(first).dtype != np.uint8):
    raise ValueError(f'{path}: frames must be uint8 [N, H, W, 3], got '
                     + ('no frame' if first is None else
                        f'{np.asarray(first).dtype} frames of {np.shape(first)}'))
  height, width = np.shape(first)[:2]
  if (height % 2 or width % 2) and not pad_odd:
    raise ValueError(f'{path}: h264/yuv420p needs even height and width, got '
                     f'{height}x{width}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  options = {'movflags': 'faststart'} if faststart else {}
  source = av.open(os.fspath(audio_from)) if audio_from is not None else None
  try:
    with av.open(os.fspath(path), 'w', options=options) as container:
      # Every stream must exist before the first packet is muxed.
      video = container.add_stream('libx264', rate=Fraction(fps).limit_denominator(1001))
      video.width, video.height = width + width % 2, height + height % 2
      video.pix_fmt, video.options = 'yuv420p', {'crf': str(crf)}
      audio = source_audio = None
      if source is not None and source.streams.audio:
        source_audio = source.streams.audio[0]
        audio = container.add_stream('aac', rate=source_audio.codec_context.sample_rate,
                                     layout=source_audio.codec_context.layout.name)
      elif waveform is not None:
        audio = container.add_stream('aac', rate=sample_rate)
        audio.layout = 'mono'
      for i, image in enumerate(itertools.chain([first], frames)):
        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode='edge')
        frame = av.VideoFrame.from_ndarray(image, format='rgb24')
        frame.pts = i
        container.mux(video.encode(frame))
      container.mux(video.encode())
      if source_audio is not None:
        _reencode_audio(source, source_audio, container, audio)
      elif audio is not None:
        samples = np.asarray(waveform, np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format='flt', layout='mono')
        frame.sample_rate, frame.pts = sample_rate, 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
  finally:
    if source is not None:
      source.close()


def _reencode_audio(src, source, out, audio) -> None:
  """Re-encodes the source's audio, cut to the stream's own duration.

  Why the cut: the decoder returns whole codec frames (aac: 1024 samples),
  padding included; re-encoding that padding would make the audio longer
  than the original each time a file goes through here.
  """
  rate = source.codec_context.sample_rate
  layout = source.codec_context.layout.name
  duration = (source.duration * source.time_base if source.duration is not None
              else src.duration / av.time_base if src.duration is not None else None)
  remaining = int(round(duration * rate)) if duration is not None else None
  resampler = av.AudioResampler(format='fltp', layout=layout, rate=rate)

  def resampled():
    for frame in src.decode(source):
      yield from resampler.resample(frame)
    yield from resampler.resample(None)       # what the resampler holds back

  done = 0
  for frame in resampled():
    samples = frame.to_ndarray()                        # [channels, n]
    if remaining is not None:
      samples = samples[:, :max(remaining - done, 0)]
    if not samples.shape[1]:
      break
    chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format='fltp',
                                       layout=layout)
    # Timestamps from 0 in samples: the audio starts with the video.
    chunk.sample_rate, chunk.pts = rate, done
    chunk.time_base = Fraction(1, rate)
    done += samples.shape[1]
    out.mux(audio.encode(chunk))
  out.mux(audio.encode())


def read_clip(path, *, fps: float,
              frame_size: tuple[int, int] | Callable[[int, int], tuple[int, int]],
              sample_rate: int, pinned_times: Sequence[float] = ()) -> dict:
  """The clip-level fields of a `schema` record, from one mp4.

  A clip must have both streams: a video without audio is a bad example (the
  model learns from their correspondence). The waveform spans the video
  stream exactly (see `audio_for_video`).
  """
  info = video_info(path)
  if not info.has_audio:
    raise BadExample(path, 'no_audio', 'the file has no audio stream')
  frames, frame_times, (width, height) = read_video(path, fps, frame_size,
                                                    pinned_times)
  return {
      'frames': frames,
      'frame_times': frame_times,
      'waveform': audio_for_video(path, read_audio(path, sample_rate),
                                  sample_rate, info.duration),
      'sample_rate': np.int32(sample_rate),
      'fps': np.float32(fps),
      'original_width': np.int32(width),
      'original_height': np.int32(height),
  }


def find_files(root, suffix: str) -> list:
  """All files under `root` (any depth) ending in `suffix`, sorted.

  Walks with etils.epath, so a cloud bucket works as well as a local folder
  (epath's `rglob` refuses `**` patterns).
  """
  root = epath.Path(root)
  found = []
  for directory, _, files in root.walk():
    found.extend(directory / name for name in files if name.endswith(suffix))
  return sorted(found)
