"""How a record stores its frames and waveform, and how a reader gets them back.

Three layouts share the schema (schema.py):

  'raw'   frames   uint8 [N, H, W, 3] zlib'd as one tensor, waveform f32 [S].
          Lossless; `avatar_synth` uses it (its results depend on exact
          pixels), and a reader decompresses every frame of the clip.
  'h264'  frames_h264     uint8 [total bytes]  H.264 segments, back to back
          segment_offsets i64 [G + 1]          segment g = bytes [o[g], o[g+1])
          segment_frames  i32 []               stored frames per segment
          Segment g holds frames [g*L, (g+1)*L) (L = segment_frames), starts
          with a key frame and has no B-frames, so it decodes on its own, in
          order, and decoding stops at the last frame an example needs. The
          default of the real-video builders: on camera-like 360p content it
          takes ~1/8 of the bytes of JPEG at a similar PSNR and decodes as
          fast per frame (benchmarks/paper_data_path.py, BENCHMARKS.md).
          (Without B-frames x264's output is also deterministic: the same
          source always gives the same record.)
  'jpeg'  frames_jpeg    uint8 [total bytes]  the N JPEG files, back to back
          frame_offsets  i64 [N + 1]          frame k = bytes [o[k], o[k+1])
          Each frame on its own: the simplest random access, ~8x the bytes.
  Both encoded layouts store the waveform * 32767 rounded to 16 bits (the
  source is AAC, whose own error is far above 16-bit rounding) instead of
  `waveform`, as one of the AUDIO_CODECS (the builders' `audio_codec`):
    waveform_pcm16 int16 [S]       plain samples: a reader slices its window
                                   (~0.03 ms for 2 s at 16 kHz)
    waveform_flac  uint8 [bytes]   FLAC (lossless): ~2/3 of the 16-bit bytes
                                   on camera audio, but decoding a 2 s window
                                   costs ~0.7 CPU ms, ~8% of a paper-scale
                                   training example
  Frame sizes are free (they keep the source's aspect ratio): they live in
  the bitstreams.

TFDS decodes these flat BYTES tensors without TensorFlow and without a copy,
and never decodes the frames themselves (its `Sequence(Image)` would decode
all N on every read); readers call `num_frames`, `gather_frames` and
`waveform`, which accept every layout and decode only the frames asked for.
"""

from __future__ import annotations

from fractions import Fraction
import io
from typing import Any, Mapping, NamedTuple

import av
from av.video.reformatter import Interpolation
from av.video.reformatter import VideoReformatter
import numpy as np
from PIL import Image
import soundfile

from tavlo_datasets import media

FRAME_STORAGES = ('raw', 'h264', 'jpeg')
AUDIO_CODECS = ('pcm16', 'flac')
_PCM16_SCALE = 32767.0


def check_audio_codec(audio_codec: str) -> None:
  """The builders' `audio_codec` field is one of AUDIO_CODECS."""
  if audio_codec not in AUDIO_CODECS:
    raise ValueError(f'audio_codec={audio_codec!r}; expected one of '
                     f'{AUDIO_CODECS}')


def storage_of(record: Mapping[str, Any]) -> str:
  if 'frames_h264' in record:
    return 'h264'
  if 'frames_jpeg' in record:
    return 'jpeg'
  if 'frames' in record:
    return 'raw'
  raise ValueError(f'record {_name(record)} has none of `frames`, '
                   '`frames_h264`, `frames_jpeg`: not a record of this schema')


def _name(record: Mapping[str, Any]) -> str:
  video_id = record.get('video_id', '?')
  if isinstance(video_id, bytes):
    video_id = video_id.decode('utf-8', 'replace')
  return repr(str(video_id))


# ---- writing (builders) -----------------------------------------------------


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(height, width) with the short side `short_side`, the aspect kept.

  Both rounded to even numbers (what video codecs and most resizers like);
  `short_side=0` keeps the source size (rounded down to even).
  """
  if short_side <= 0:
    return (height - height % 2, width - width % 2)
  scale = short_side / min(width, height)
  def even(v):
    return max(2, int(round(v * scale / 2)) * 2)
  return (even(height), even(width))


def encode_jpeg(frames: np.ndarray, quality: int) -> dict[str, np.ndarray]:
  """uint8 [N, H, W, 3] -> the 'jpeg' frame fields (PIL, libjpeg-turbo)."""
  if not 1 <= int(quality) <= 100:
    raise ValueError(f'jpeg_quality must be in [1, 100], got {quality}')
  chunks, offsets = [], [0]
  for frame in frames:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, 'JPEG', quality=int(quality))
    chunks.append(buffer.getvalue())
    offsets.append(offsets[-1] + len(chunks[-1]))
  return {
      'frames_jpeg': np.frombuffer(b''.join(chunks), np.uint8),
      'frame_offsets': np.asarray(offsets, np.int64),
  }


def encode_h264(frames: np.ndarray, crf: int,
                segment_frames: int) -> dict[str, np.ndarray]:
  """uint8 [N, H, W, 3] (H, W even) -> the 'h264' frame fields (PyAV x264)."""
  if segment_frames < 1:
    raise ValueError(f'segment_frames must be >= 1, got {segment_frames}')
  _, height, width, _ = frames.shape
  segments, offsets = [], [0]
  for start in range(0, len(frames), segment_frames):
    encoder = av.CodecContext.create('libx264', 'w')
    encoder.width, encoder.height, encoder.pix_fmt = width, height, 'yuv420p'
    # Only orders the frames: their times live in `frame_times`.
    encoder.time_base, encoder.framerate = Fraction(1, 8), Fraction(8)
    # bframes=0: frames decode in order (stop early) and x264 is
    # deterministic; fastdecode: CAVLC and no deblocking, cheaper to decode.
    encoder.options = {'crf': str(int(crf)), 'preset': 'fast',
                       'tune': 'fastdecode', 'x264-params': 'bframes=0'}
    data = []
    for i, image in enumerate(frames[start:start + segment_frames]):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      data += [bytes(p) for p in encoder.encode(frame)]
    data += [bytes(p) for p in encoder.encode(None)]
    segments.append(b''.join(data))
    offsets.append(offsets[-1] + len(segments[-1]))
  return {
      'frames_h264': np.frombuffer(b''.join(segments), np.uint8),
      'segment_offsets': np.asarray(offsets, np.int64),
      'segment_frames': np.int32(segment_frames),
  }


def encode_pcm16(waveform: np.ndarray) -> np.ndarray:
  return np.clip(np.round(np.asarray(waveform, np.float64) * _PCM16_SCALE),
                 -32768, 32767).astype(np.int16)


def encode_flac(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
  """f32 mono waveform -> FLAC bytes of its 16-bit rounding (soundfile)."""
  buffer = io.BytesIO()
  soundfile.write(buffer, encode_pcm16(waveform), int(sample_rate),
                  format='FLAC', subtype='PCM_16')
  return np.frombuffer(buffer.getvalue(), np.uint8)


def to_storage(record: dict, storage: str, *, jpeg_quality: int = 85,
               h264_crf: int = 25, segment_frames: int = 16,
               audio_codec: str = 'pcm16') -> dict:
  """Rewrites the `frames`/`waveform` of a freshly read clip into `storage`,
  its audio into `audio_codec`."""
  if storage == 'raw':
    return record
  check_audio_codec(audio_codec)
  record = dict(record)
  if storage == 'jpeg':
    record.update(encode_jpeg(record.pop('frames'), jpeg_quality))
  elif storage == 'h264':
    record.update(encode_h264(record.pop('frames'), h264_crf, segment_frames))
  else:
    raise ValueError(f'frame storage {storage!r}; expected one of '
                     f'{FRAME_STORAGES}')
  wave = record.pop('waveform')
  if audio_codec == 'pcm16':
    record['waveform_pcm16'] = encode_pcm16(wave)
  else:
    record['waveform_flac'] = encode_flac(wave, record['sample_rate'])
  return record


def options_of(builder_config) -> dict:
  """The `read_clip` storage arguments from a builder config's fields."""
  c = builder_config
  return dict(storage=c.frame_codec, short_side=int(c.frame_short_side),
              jpeg_quality=int(c.jpeg_quality), h264_crf=int(c.h264_crf),
              segment_frames=int(c.segment_frames),
              audio_codec=str(c.audio_codec))


def read_clip(path, *, fps: float, sample_rate: int, storage: str,
              short_side: int, pinned_times=(), **codec) -> dict:
  """`media.read_clip` of a real video, stored in an encoded layout.

  Frames keep the source's aspect ratio, short side `short_side` (so random
  crops of any aspect around the training size stay possible). `codec`:
  the quality arguments of `to_storage`.
  """
  # The size is chosen from the displayed size, known once the first frame
  # tells its rotation: a portrait phone clip stays portrait.
  def size(width, height):
    return short_side_size(width, height, short_side)
  record = media.read_clip(path, fps=fps, frame_size=size,
                           sample_rate=sample_rate, pinned_times=pinned_times)
  return to_storage(record, storage, **codec)


# ---- reading (pipeline) -----------------------------------------------------


def num_frames(record: Mapping[str, Any]) -> int:
  storage = storage_of(record)
  if storage == 'h264':
    return len(record['frame_times'])
  if storage == 'jpeg':
    return len(record['frame_offsets']) - 1
  return len(record['frames'])


def key_frame_step(record: Mapping[str, Any]) -> int:
  """Frames k * step are where decoding can start without decoding any
  frame before them: 'h264' segment starts; every frame otherwise."""
  if storage_of(record) == 'h264':
    return int(record['segment_frames'])
  return 1


def _decode_h264_segment(record, segment: int, wanted: set[int], convert
                         ) -> dict[int, np.ndarray]:
  """convert(frame) of the frames `wanted` (indices in the clip) of one
  segment, decoded in order from its key frame up to the last one wanted."""
  offsets = record['segment_offsets']
  length = int(record['segment_frames'])
  data = np.asarray(record['frames_h264'])
  lo, hi = int(offsets[segment]), int(offsets[segment + 1])
  first, last = segment * length, max(wanted)
  out = {}
  try:
    if not 0 <= lo < hi <= len(data):
      raise ValueError(f'byte range [{lo}, {hi}) outside the '
                       f'{len(data)} stored bytes')
    decoder = av.CodecContext.create('h264', 'r')
    decoder.thread_count = 1    # grain workers are the parallelism
    index = first
    packets = decoder.parse(data[lo:hi].tobytes()) + decoder.parse(None)
    for packet in packets + [None]:
      for frame in decoder.decode(packet):
        if index in wanted:
          out[index] = convert(frame)
        index += 1
      if index > last:
        break
  except (av.FFmpegError, ValueError) as e:
    raise ValueError(f'record {_name(record)}: frame {min(wanted)} does not '
                     f'decode (H.264 segment {segment}: {e})') from e
  missing = sorted(wanted - set(out))
  if missing:
    raise ValueError(f'record {_name(record)}: frame {missing[0]} does not '
                     f'decode (H.264 segment {segment} yields only '
                     f'{index - first} of its frames)')
  return out


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
  return frame.to_ndarray(format='rgb24')


def _decode_h264(record, indices, convert=_to_rgb) -> dict[int, np.ndarray]:
  length = int(record['segment_frames'])
  by_segment = {}
  for i in indices:
    by_segment.setdefault(i // length, set()).add(i)
  out = {}
  for segment, wanted in sorted(by_segment.items()):
    out.update(_decode_h264_segment(record, segment, wanted, convert))
  return out


def even_box(box, height: int, width: int) -> tuple[int, int, int, int]:
  """A crop box (x0, y0, x1, y1; None = whole frame) on even pixels inside
  the frame: what a crop of 4:2:0 video can take without touching chroma
  (one chroma sample per 2x2 pixels). Each edge moves by at most 1 pixel."""
  if box is None:
    box = (0, 0, width, height)
  def even(v, limit):
    return int(min(max(2 * round(v / 2), 0), limit))
  x0, y0 = even(box[0], width - 2), even(box[1], height - 2)
  x1, y1 = even(box[2], width), even(box[3], height)
  return (x0, y0, max(x1, x0 + 2), max(y1, y0 + 2))


def _plane_rows(plane) -> np.ndarray:
  """A video frame plane as uint8 [rows, line_size] (padding columns included)."""
  return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)


def _box_planes(frame: av.VideoFrame, box) -> list[np.ndarray]:
  """Views of a yuv420p frame's Y, U, V inside an even box (x0, y0, x1, y1)."""
  x0, y0, x1, y1 = box
  return [_plane_rows(src)[y0 // step:y1 // step, x0 // step:x1 // step]
          for src, step in zip(frame.planes, (1, 2, 2))]


class _ScaledYuv:
  """YUV frame -> its crop box scaled to size x size or (width, height)
  (mirrored if asked), as
  a yuv420p av.VideoFrame: no full-size RGB frame and no resize of one.

  `geometry(height, width)` -> (box or None for the whole frame, flip), asked
  once, with the first frame's size; the box is snapped to even pixels
  (`even_box`) so that the crop copies whole chroma samples. Per frame: one
  copy of the box's Y, U, V (mirrored there, where a flip is a byte-wise
  reversal), then swscale's bilinear scaling in YUV. (Scaling straight to
  RGB took ~3x the CPU on this path: its vertical filter for packed RGB
  output is not vectorised; and it was further from PIL's bilinear:
  benchmarks/paper_data_path.py, BENCHMARKS.md.)
  """

  def __init__(self, size: int | tuple[int, int], geometry):
    # size: S (S x S) or (width, height).
    self.width, self.height = ((int(size), int(size)) if np.ndim(size) == 0
                               else (int(size[0]), int(size[1])))
    self.geometry, self.box, self.flip = geometry, None, False
    self.scale = VideoReformatter()
    self.cropped = self.targets = None

  def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
    if frame.format.name != 'yuv420p':
      raise ValueError(f'a {frame.format.name} frame, expected yuv420p')
    if self.box is None:
      box, self.flip = (self.geometry(frame.height, frame.width)
                        if self.geometry else (None, False))
      self.box = even_box(box, frame.height, frame.width)
      x0, y0, x1, y1 = self.box
      # One frame for the crops of the whole clip (swscale reads it and
      # writes a new frame), and numpy views of its planes' box areas.
      self.cropped = av.VideoFrame(x1 - x0, y1 - y0, 'yuv420p')
      self.targets = _box_planes(self.cropped, (0, 0, x1 - x0, y1 - y0))
    for part, out in zip(_box_planes(frame, self.box), self.targets):
      out[...] = part[:, ::-1] if self.flip else part
    return self.scale.reformat(self.cropped, self.width, self.height,
                               interpolation=Interpolation.BILINEAR,
                               threads=1)


class _ScaledRgb(_ScaledYuv):
  """`_ScaledYuv`, then swscale's unscaled YUV->RGB: uint8 RGB [S, S, 3]."""

  def __init__(self, size: int, geometry):
    super().__init__(size, geometry)
    self.to_rgb = VideoReformatter()

  def __call__(self, frame: av.VideoFrame) -> np.ndarray:
    return self.to_rgb.reformat(super().__call__(frame), format='rgb24',
                                threads=1).to_ndarray()


def copy_yuv420_planes(frame: av.VideoFrame, y: np.ndarray,
                       uv: np.ndarray) -> None:
  """A yuv420p frame's planes into Y [H, W] and UV [2, H/2, W/2]."""
  h, w = y.shape
  if (frame.height, frame.width) != (h, w):
    raise ValueError(f'a {frame.height}x{frame.width} frame, expected {h}x{w}')
  for p, out in zip(frame.planes, (y, uv[0], uv[1])):
    out[...] = _plane_rows(p)[:out.shape[0], :out.shape[1]]


class Yuv420(NamedTuple):
  """A clip's frames as 4:2:0 planes (BT.601, limited range: what x264 was
  given and libswscale reads back); `augment.yuv420_to_rgb` converts them."""
  y: np.ndarray    # uint8 [T, S, S]
  uv: np.ndarray   # uint8 [T, 2, S/2, S/2]: U then V


# Limited-range black: what padding slots hold (RGB 0 after conversion).
_BLACK_Y, _BLACK_UV = 16, 128


def rgb_to_yuv420(frames: np.ndarray) -> Yuv420:
  """uint8 RGB [T, H, W, 3] (H, W even) -> Yuv420, by libswscale: the same
  conversion a builder's x264 encoder is fed through (`encode_h264`)."""
  t, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f'4:2:0 frames need an even size, got {h}x{w}')
  out = Yuv420(np.empty((t, h, w), np.uint8),
               np.empty((t, 2, h // 2, w // 2), np.uint8))
  to_yuv = VideoReformatter()
  for i, image in enumerate(frames):
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image),
                                       format='rgb24')
    copy_yuv420_planes(to_yuv.reformat(frame, format='yuv420p', threads=1),
                       out.y[i], out.uv[i])
  return out


def _decode_jpeg(record, index: int) -> np.ndarray:
  offsets = record['frame_offsets']
  data = np.asarray(record['frames_jpeg'])
  lo, hi = int(offsets[index]), int(offsets[index + 1])
  if not 0 <= lo <= hi <= len(data):
    raise ValueError(f'record {_name(record)}: frame {index} has byte range '
                     f'[{lo}, {hi}) outside its {len(data)} stored bytes')
  try:
    with Image.open(io.BytesIO(data[lo:hi].tobytes())) as image:
      if image.format != 'JPEG':
        raise ValueError(f'a {image.format} image, expected a JPEG')
      frame = np.asarray(image.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f'record {_name(record)}: frame {index} does not decode '
                     f'as JPEG ({e})') from e
  return frame


class Yuv420Unscaled(NamedTuple):
  """A clip's crop box at the stored resolution: 4:2:0 planes of a fixed
  window [WH, WW] holding the box (the same for every frame) at its top
  left, neither scaled nor mirrored; `augment.scale_unscaled_frames` does
  both in the train step. A box larger than the window (a portrait clip, a
  larger stored size) is scaled down on the host to fit, aspect kept."""
  y: np.ndarray        # uint8 [T, WH, WW]
  uv: np.ndarray       # uint8 [T, 2, WH/2, WW/2]: U then V
  box_hw: np.ndarray   # int32 [2]: the box's height and width there (even)
  flip: np.ndarray     # bool []: mirror left-right once scaled


# How frames come back: uint8 RGB, 4:2:0 planes scaled to the training size
# (`Yuv420`), or the crop box's 4:2:0 planes unscaled (`Yuv420Unscaled`);
# the values of config.input.frame_format.
FRAME_FORMATS = ('rgb', 'yuv420', 'yuv420_unscaled')


def _fit(height: int, width: int, window: tuple[int, int]) -> tuple[int, int]:
  """(h, w): height x width itself if it fits the window, else scaled down
  to fit, aspect kept, even."""
  scale = min(1.0, window[0] / height, window[1] / width)
  if scale == 1.0:
    return height, width
  return (max(2, int(height * scale) // 2 * 2),
          max(2, int(width * scale) // 2 * 2))


def _unscaled_slots(record, frame_index, decoded: dict, window, geometry
                    ) -> Yuv420Unscaled:
  """Yuv420Unscaled of the clip's slots from {stored index: yuv420p
  av.VideoFrame at the stored size}; padding slots black."""
  wh, ww = (int(v) for v in window)
  t = len(frame_index)
  first = next(iter(decoded.values()))
  box, flip = (geometry(first.height, first.width) if geometry
               else (None, False))
  box = even_box(box, first.height, first.width)
  x0, y0, x1, y1 = box
  h, w = _fit(y1 - y0, x1 - x0, (wh, ww))
  out = Yuv420Unscaled(np.full((t, wh, ww), _BLACK_Y, np.uint8),
                       np.full((t, 2, wh // 2, ww // 2), _BLACK_UV, np.uint8),
                       np.array([h, w], np.int32), np.bool_(flip))
  scale = None
  if (h, w) != (y1 - y0, x1 - x0):   # too large for the window: the host scales
    scale = _ScaledYuv((w, h), lambda *_: (box, False))
  for slot, i in enumerate(frame_index):
    if i < 0:
      continue
    frame = decoded[int(i)]
    if (frame.height, frame.width) != (first.height, first.width):
      raise ValueError(f'record {_name(record)}: frame {int(i)} is '
                       f'{frame.height}x{frame.width}, other frames '
                       f'{first.height}x{first.width}')
    if scale is not None:
      copy_yuv420_planes(scale(frame), out.y[slot, :h, :w],
                         out.uv[slot, :, :h // 2, :w // 2])
      continue
    for part, dst in zip(_box_planes(frame, box),
                         (out.y[slot], out.uv[slot, 0], out.uv[slot, 1])):
      dst[:part.shape[0], :part.shape[1]] = part
  return out


def gather_frames(record: Mapping[str, Any], frame_index: np.ndarray, *,
                  size: int | None = None, geometry=None,
                  frame_format: str = 'rgb', window=None
                  ) -> np.ndarray | Yuv420 | Yuv420Unscaled:
  """uint8 [T, H, W, 3] frames at `frame_index`; black where it is -1.

  In the encoded layouts only these frames are decoded (each once, even if
  listed twice; 'h264' also decodes the frames before them in their segment).

  With `size`: uint8 [T, size, size, 3]. `geometry(height, width)` (called
  once, with the stored frame size; None: whole frame, no flip) returns
  (box, flip): every frame's box (x0, y0, x1, y1; None = whole frame) is
  scaled bilinearly to size x size and mirrored left-right if `flip`. In
  the 'h264' layout this happens inside the YUV->RGB conversion
  (`_ScaledRgb`: the box on even pixels, swscale's bilinear); the other
  layouts decode whole frames and resize them with PIL (`resize_frames`:
  'raw' gives exactly what it gave before this option existed).

  `frame_format='yuv420'` (needs an even `size`): the same frames as
  `Yuv420` planes. 'h264' hands over the decoder's own planes, scaled, with
  no RGB conversion on the host (`_ScaledYuv`); the other layouts convert
  their RGB result (`rgb_to_yuv420`).

  `frame_format='yuv420_unscaled'` (needs `window` (WH, WW), even; `size`
  unused): `Yuv420Unscaled`, the box's planes at the stored resolution for
  the train step to scale and mirror; nothing is scaled on the host unless
  the box is larger than the window. Other layouts than 'h264' convert
  their whole RGB frames to 4:2:0 first.
  """
  if frame_format not in FRAME_FORMATS:
    raise ValueError(f'frame_format={frame_format!r}; expected one of '
                     f'{FRAME_FORMATS}')
  frame_index = np.asarray(frame_index)
  storage = storage_of(record)
  if frame_format == 'yuv420_unscaled':
    return _gather_unscaled(record, frame_index, window, geometry)
  if frame_format == 'yuv420':
    if size is None or int(size) % 2:
      raise ValueError(f'4:2:0 frames are scaled to an even size; got '
                       f'size={size}')
    if storage != 'h264':
      return rgb_to_yuv420(gather_frames(record, frame_index, size=size,
                                         geometry=geometry))
  if size is not None and storage != 'h264':
    frames = gather_frames(record, frame_index)
    box, flip = geometry(*frames.shape[1:3]) if geometry else (None, False)
    frames = resize_frames(frames, size, box)
    return np.ascontiguousarray(frames[:, :, ::-1]) if flip else frames
  if storage == 'raw':
    frames = np.asarray(record['frames'])
    out = frames[np.maximum(frame_index, 0)]
    out[frame_index < 0] = 0
    return out
  wanted = [int(i) for i in np.unique(frame_index[frame_index >= 0])]
  if storage == 'h264':
    if size is None:
      convert = _to_rgb
    elif frame_format == 'yuv420':
      convert = _ScaledYuv(size, geometry)
    else:
      convert = _ScaledRgb(size, geometry)
    decoded = _decode_h264(record, wanted or [0], convert)
  else:
    decoded = {i: _decode_jpeg(record, i) for i in wanted or [0]}
  if frame_format == 'yuv420':
    return _yuv420_slots(record, frame_index, decoded, int(size))
  if not wanted:   # every slot is padding: black frames of the stored size
    decoded = {-1: np.zeros_like(next(iter(decoded.values())))}
  shape = next(iter(decoded.values())).shape
  out = np.zeros((len(frame_index), *shape), np.uint8)
  for slot, i in enumerate(frame_index):
    if i >= 0:
      frame = decoded[int(i)]
      if frame.shape != shape:
        raise ValueError(f'record {_name(record)}: frame {int(i)} is '
                         f'{frame.shape}, other frames {shape}')
      out[slot] = frame
  return out


def _as_yuv420p(frame: av.VideoFrame) -> av.VideoFrame:
  if frame.format.name == 'yuv420p':
    return frame
  return frame.reformat(format='yuv420p', threads=1)


def _gather_unscaled(record, frame_index: np.ndarray, window, geometry
                     ) -> Yuv420Unscaled:
  if window is None or len(window) != 2 or any(int(v) < 2 or int(v) % 2
                                               for v in window):
    raise ValueError(f'unscaled 4:2:0 frames need a window (height, width) '
                     f'of even sizes; got window={window}')
  wanted = [int(i) for i in np.unique(frame_index[frame_index >= 0])] or [0]
  if storage_of(record) == 'h264':
    decoded = _decode_h264(record, wanted, _as_yuv420p)
  else:
    rgb = gather_frames(record, np.asarray(wanted))
    decoded = {i: _as_yuv420p(av.VideoFrame.from_ndarray(
        np.ascontiguousarray(image), format='rgb24'))
               for i, image in zip(wanted, rgb)}
  return _unscaled_slots(record, frame_index, decoded, window, geometry)


def _yuv420_slots(record, frame_index, decoded, size: int) -> Yuv420:
  """Yuv420 of the clip's slots from {stored index: scaled yuv420p frame};
  padding slots black."""
  t = len(frame_index)
  out = Yuv420(np.full((t, size, size), _BLACK_Y, np.uint8),
               np.full((t, 2, size // 2, size // 2), _BLACK_UV, np.uint8))
  for slot, i in enumerate(frame_index):
    if i >= 0:
      copy_yuv420_planes(decoded[int(i)], out.y[slot], out.uv[slot])
  return out


def resize_frames(frames: np.ndarray, size: int,
                  box: tuple[float, float, float, float] | None = None
                  ) -> np.ndarray:
  """Crops `box` (x0, y0, x1, y1; None = whole frame) and resizes to size^2.

  PIL bilinear on uint8, one call per frame with the same box for every
  frame; a no-op when nothing changes. (Measured against jax.image.resize on
  the host in benchmarks/input_pipeline.py: PIL is much faster per clip.)
  """
  t, h, w, _ = frames.shape
  if box is None and h == size and w == size:
    return frames
  out = np.empty((t, size, size, 3), np.uint8)
  for i in range(t):
    out[i] = np.asarray(Image.fromarray(frames[i]).resize(
        (size, size), resample=Image.BILINEAR, box=box))
  return out


def waveform(record: Mapping[str, Any]) -> np.ndarray:
  """The whole f32 waveform, any layout."""
  return waveform_window(record, 0, None)


def waveform_window(record: Mapping[str, Any], start: int,
                    length: int | None) -> np.ndarray:
  """f32 waveform[start : start + length], zeros where that is outside it.

  `length=None`: to the end. Only the window is converted (and, in the FLAC
  layout, decoded).
  """
  if 'waveform' in record:
    wave = np.asarray(record['waveform'], np.float32)
    return _padded(lambda lo, hi: wave[lo:hi], len(wave), start, length)
  if 'waveform_pcm16' in record:
    pcm = np.asarray(record['waveform_pcm16'])
    return _padded(lambda lo, hi: _from_pcm16(pcm[lo:hi]), len(pcm), start,
                   length)
  if 'waveform_flac' not in record:
    raise ValueError(f'record {_name(record)} has none of `waveform`, '
                     '`waveform_pcm16`, `waveform_flac`: not a record of '
                     'this schema')
  try:
    data = np.asarray(record['waveform_flac']).tobytes()
    with soundfile.SoundFile(io.BytesIO(data)) as f:
      def read(lo, hi):
        f.seek(lo)
        pcm = f.read(hi - lo, dtype='int16')
        if len(pcm) != hi - lo:
          raise ValueError(f'{len(pcm)} of {hi - lo} samples from {lo} read')
        return _from_pcm16(pcm)
      return _padded(read, f.frames, start, length)
  except (RuntimeError, ValueError, soundfile.LibsndfileError) as e:
    raise ValueError(f'record {_name(record)}: the audio (FLAC) does not '
                     f'decode ({e})') from e


def _from_pcm16(pcm: np.ndarray) -> np.ndarray:
  return pcm.astype(np.float32) / np.float32(_PCM16_SCALE)


def _padded(read, total: int, start: int, length: int | None) -> np.ndarray:
  """read(lo, hi) for the part of [start, start + length) inside
  [0, total), zero-padded to `length` samples."""
  if length is None:
    length = max(total - start, 0)
  out = np.zeros((length,), np.float32)
  lo, hi = max(start, 0), min(start + length, total)
  if hi > lo:
    out[lo - start:hi - start] = read(lo, hi)
  return out
