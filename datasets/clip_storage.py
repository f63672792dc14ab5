"""How a record stores its frames and waveform, and how a reader gets them back.

Two layouts share the schema (schema.py):

  'raw'   frames   uint8 [N, H, W, 3] zlib'd as one tensor, waveform f32 [S].
          Lossless; `avatar_synth` uses it (its results depend on exact
          pixels), and a reader decompresses every frame of the clip.
  'jpeg'  frames_jpeg    uint8 [total bytes]  the N JPEG files, back to back
          frame_offsets  i64 [N + 1]          frame k = bytes [o[k], o[k+1])
          waveform_pcm16 i16 [S]              the waveform * 32767, rounded
          Real videos (`avatar`, `vggsound`): each frame is its own JPEG, so a
          training example decodes only the T frames it uses (TFDS's
          `Sequence(Image)` would decode all N on every read), and the bytes
          arrive as one flat tensor that TFDS hands over without a copy or TF.
          16-bit audio: the source is AAC, whose own error is far above
          16-bit rounding (1/32767), and it halves the bytes of float32.

Readers call `num_frames`, `gather_frames` and `waveform`, which accept
either layout, and never look at the keys themselves.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np
from PIL import Image

from tavlo_datasets import media

FRAME_STORAGES = ('raw', 'jpeg')
_PCM16_SCALE = 32767.0


def storage_of(record: Mapping[str, Any]) -> str:
  if 'frames_jpeg' in record:
    return 'jpeg'
  if 'frames' in record:
    return 'raw'
  raise ValueError(f'record {_name(record)} has neither `frames` nor '
                   f'`frames_jpeg`: not a record of this schema')


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


def encode_pcm16(waveform: np.ndarray) -> np.ndarray:
  return np.clip(np.round(np.asarray(waveform, np.float64) * _PCM16_SCALE),
                 -32768, 32767).astype(np.int16)


def to_storage(record: dict, storage: str, jpeg_quality: int) -> dict:
  """Rewrites the `frames`/`waveform` of a freshly read clip into `storage`."""
  if storage == 'raw':
    return record
  if storage != 'jpeg':
    raise ValueError(f'frame storage {storage!r}; expected one of '
                     f'{FRAME_STORAGES}')
  record = dict(record)
  record.update(encode_jpeg(record.pop('frames'), jpeg_quality))
  record['waveform_pcm16'] = encode_pcm16(record.pop('waveform'))
  return record


def read_clip(path, *, fps: float, short_side: int, jpeg_quality: int,
              sample_rate: int, pinned_times=()) -> dict:
  """`media.read_clip` of a real video, stored in the 'jpeg' layout.

  Frames keep the source's aspect ratio, short side `short_side` (so random
  crops of any aspect around the training size stay possible).
  """
  info = media.video_info(path)
  size = short_side_size(info.width, info.height, short_side)
  record = media.read_clip(path, fps=fps, frame_size=size,
                           sample_rate=sample_rate, pinned_times=pinned_times)
  return to_storage(record, 'jpeg', jpeg_quality)


# ---- reading (pipeline) -----------------------------------------------------


def num_frames(record: Mapping[str, Any]) -> int:
  if storage_of(record) == 'jpeg':
    return len(record['frame_offsets']) - 1
  return len(record['frames'])


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


def gather_frames(record: Mapping[str, Any],
                  frame_index: np.ndarray) -> np.ndarray:
  """uint8 [T, H, W, 3] frames at `frame_index`; black where it is -1.

  In the 'jpeg' layout only these frames are decoded (each once, even if
  listed twice).
  """
  frame_index = np.asarray(frame_index)
  if storage_of(record) == 'raw':
    frames = np.asarray(record['frames'])
    out = frames[np.maximum(frame_index, 0)]
    out[frame_index < 0] = 0
    return out
  decoded = {int(i): _decode_jpeg(record, int(i))
             for i in np.unique(frame_index[frame_index >= 0])}
  if not decoded:   # every slot is padding: black frames of the stored size
    decoded[-1] = np.zeros_like(_decode_jpeg(record, 0))
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


def waveform(record: Mapping[str, Any]) -> np.ndarray:
  """The f32 waveform of either layout."""
  if storage_of(record) == 'jpeg':
    return np.asarray(record['waveform_pcm16']).astype(np.float32) / _PCM16_SCALE
  return np.asarray(record['waveform'], np.float32)
