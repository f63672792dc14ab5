"""Which frames and which audio samples a clip is made of; eval annotations.

Alignment (WORKSPACE.md "Audio alignment"), for a clip whose frames are the
stored frames f0, f0+s, ..., f0+(T-1)s (s = `input.frame_stride`):

  spf   = sample_rate * s / fps            samples per clip frame
  start = round((f0 - s/2) * sample_rate / fps)
  audio window = waveform[start : start + T*spf], zero-padded outside

so clip frame t (time (f0 + t*s)/fps) sits at the centre of window samples
[t*spf, (t+1)*spf), the samples its audio token is computed from. With s = 1
this is exactly `[(f0 - 0.5) * spf, (f0 + T - 0.5) * spf)`. The start is an
exact integer whenever sample_rate * s / (2 fps) is one (e.g. 16 kHz, 8 fps);
otherwise it is rounded to the nearest sample.

With `config.input.audio.block = 'trailing'` the window starts half a clip
frame earlier, at round((f0 - s) * sample_rate / fps): block t is then the
clip frame interval that ends at frame t's time. Why offer it: a "sounding"
label holds at the frame's instant (plus a hangover after each note), and a
centred block also hears the half frame after that instant, where another
source's note may already have begun (WORKSPACE.md, "Audio alignment").

Records are dicts as decoded by `tfds.data_source` (schema.py); their
`Sequence` features arrive as Python lists.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from tavlo_datasets import clip_storage
from tavlo_datasets import schema
from tavlo_jax.data import audio as audio_lib


AUDIO_BLOCKS = ('centred', 'trailing')


def audio_window_start(first_frame: int, fps: float, sample_rate: int,
                       frame_stride: int, block: str = 'centred') -> int:
  """First waveform sample of the audio window of a clip starting at f0.

  block (`config.input.audio.block`): where frame t's audio block sits
  around the frame's time: 'centred' (half a clip frame either side) or
  'trailing' (the clip frame before it, ending at the frame's time).
  """
  if block not in AUDIO_BLOCKS:
    raise ValueError(f'config.input.audio.block={block!r}; expected one of '
                     f'{AUDIO_BLOCKS}')
  lead = frame_stride / 2 if block == 'centred' else frame_stride
  return int(round((first_frame - lead) * sample_rate / fps))


def slice_padded(x: np.ndarray, start: int, length: int) -> np.ndarray:
  """x[start:start+length] along axis 0, zeros where it falls outside x."""
  out = np.zeros((length,) + x.shape[1:], x.dtype)
  lo, hi = max(start, 0), min(start + length, len(x))
  if hi > lo:
    out[lo - start:hi - start] = x[lo:hi]
  return out


def clip_frame_indices(first_frame: int, num_frames: int, frame_stride: int,
                       num_stored: int) -> np.ndarray:
  """i32 [T] stored-frame indices of the clip; -1 past the end of the video."""
  idx = first_frame + frame_stride * np.arange(num_frames)
  return np.where(idx < num_stored, idx, -1).astype(np.int32)


def record_audio_params(record: Mapping[str, Any], config) -> tuple[float, int]:
  """(fps, sample_rate) of a record, checked against the config."""
  fps = float(np.asarray(record['fps']))
  sr = int(np.asarray(record['sample_rate']))
  if sr != config.input.audio.sample_rate:
    raise ValueError(
        f"record {record.get('video_id')!r} has sample_rate={sr} but "
        f'config.input.audio.sample_rate={config.input.audio.sample_rate}; '
        'the pipeline does not resample: rebuild the dataset or fix the config.')
  if fps <= 0:
    raise ValueError(f"record {record.get('video_id')!r} has fps={fps}")
  return fps, sr


class Clip(NamedTuple):
  frames: Any               # uint8 [T, H, W, 3] (stored or asked size) | Yuv420
  waveform: np.ndarray      # f32 [T*spf] the aligned audio window
  frame_index: np.ndarray   # i32 [T] stored-frame index, -1 = padding
  audio_start: int          # waveform sample where the window starts


def cut_clip(record: Mapping[str, Any], first_frame: int, config, *,
             size: int | None = None, geometry=None,
             frame_format: str = 'rgb', window=None) -> Clip:
  """The T frames from `first_frame` and their audio window (see top).

  `size`, `geometry`, `frame_format`, `window`: frames cropped, scaled (and
  flipped) while decoding (`clip_storage.gather_frames`); size None: at the
  stored size. With 'yuv420', `frames` is a `clip_storage.Yuv420`; with
  'yuv420_unscaled', a `clip_storage.Yuv420Unscaled` of `window`.
  """
  fps, sr = record_audio_params(record, config)
  t, s = config.input.num_frames, config.input.frame_stride
  spf = audio_lib.samples_per_frame(sr, fps, s)
  audio_lib.hop_length(sr, fps, s, config.input.audio.columns_per_frame)
  frame_index = clip_frame_indices(first_frame, t, s,
                                   clip_storage.num_frames(record))
  start = audio_window_start(first_frame, fps, sr, s, config.input.audio.block)
  waveform = clip_storage.waveform_window(record, start, t * spf)
  # Decodes only the T frames of the clip (clip_storage.py).
  frames = clip_storage.gather_frames(record, frame_index, size=size,
                                      geometry=geometry,
                                      frame_format=frame_format,
                                      window=window)
  return Clip(frames, waveform, frame_index, start)


def random_first_frame(num_stored: int, config,
                       rng: np.random.Generator) -> int:
  """Uniform start so that all T frames (at the stride) are inside the video.

  Videos shorter than the clip start at 0 and are padded at the end.
  """
  span = (config.input.num_frames - 1) * config.input.frame_stride + 1
  return int(rng.integers(0, max(num_stored - span, 0) + 1))


# ---- evaluation windows -----------------------------------------------------


class EvalWindow(NamedTuple):
  record: int               # index of the record in the split
  first_frame: int
  owned: tuple[int, ...]    # stored-frame indices this window scores


def annotated_frames(record: Mapping[str, Any]) -> np.ndarray:
  return np.asarray(record['frames_annotated']['frame_index'], np.int64)


def eval_windows(record_index: int, num_stored: int, annotated,
                 num_frames: int, frame_stride: int) -> list[EvalWindow]:
  """Deterministic windows that score every annotated frame exactly once.

  With stride s, a frame is only ever seen with frames of its own phase
  (f mod s), so each phase is tiled separately: windows of T frames placed
  back to back from the first frame of the phase, the last one shifted back
  to end at the video's end (so it shows real frames; the frames it
  shares with its predecessor are owned by the predecessor). A video shorter
  than a window gets one window, padded at the end. Windows without an
  annotated frame of their own are dropped.
  """
  annotated = sorted(set(int(f) for f in annotated))
  bad = [f for f in annotated if not 0 <= f < num_stored]
  if bad:
    raise ValueError(f'record {record_index}: annotated frame indices {bad} '
                     f'outside its {num_stored} frames')
  windows = []
  for phase in range(frame_stride):
    todo = [f for f in annotated if f % frame_stride == phase]
    if not todo:
      continue
    grid_len = len(range(phase, num_stored, frame_stride))
    for k0 in range(0, grid_len, num_frames):
      k0 = max(min(k0, grid_len - num_frames), 0)
      first = phase + k0 * frame_stride
      last = first + (num_frames - 1) * frame_stride
      owned = tuple(f for f in todo if first <= f <= last)
      if owned:
        windows.append(EvalWindow(record_index, first, owned))
        todo = [f for f in todo if f not in owned]
  return windows


def window_annotations(record: Mapping[str, Any], frame_index: np.ndarray,
                       owned, mask_shape: tuple[int, int],
                       max_instances: int) -> dict[str, np.ndarray]:
  """Per-frame eval arrays (WORKSPACE.md "Batches") of one window.

  gt_mask / gt_boxes come from the SOUNDING instances of each frame, any_mask
  from all of them. gt_mask is their union (0/1), or with a record's
  `gt_votes` > 1 the number of them covering each pixel, capped at gt_votes
  (the GT weight is gt_mask / gt_votes). Frames beyond `max_instances` sounding boxes keep the
  first ones (masks are always complete; boxes only feed box-based scores).
  `category` is the category the frame's sounding (in-view) instances share;
  -1 when none sounds in view, when they differ, when it is unknown (-1 in
  the record) and on frames without annotation.
  """
  t = len(frame_index)
  mh, mw = mask_shape
  out = {
      'ann_valid': np.zeros((t,), bool),
      'gt_mask': np.zeros((t, mh, mw), np.uint8),
      'any_mask': np.zeros((t, mh, mw), np.uint8),
      'gt_boxes': np.zeros((t, max_instances, 4), np.float32),
      'gt_box_valid': np.zeros((t, max_instances), bool),
      'tags': np.zeros((t, len(schema.SCENARIOS)), bool),
      'cross_event': np.zeros((t,), bool),
      'category': np.full((t,), -1, np.int32),
      # Sounding instances covering a pixel for full GT weight (schema.py).
      'gt_votes': np.full((t,), int(np.asarray(record.get('gt_votes', 1))), np.int32),
  }
  votes = int(out['gt_votes'][0]) if t else 1
  fa, inst = record['frames_annotated'], record['instances']
  ann_of_frame = {int(f): k for k, f in enumerate(fa['frame_index'])}
  owned = set(int(f) for f in owned)
  slot = {int(f): i for i, f in enumerate(frame_index) if f >= 0}
  # Slot of each annotation in this window (-1: not in the window).
  ann_slot = {k: slot.get(f, -1) for f, k in ann_of_frame.items()}
  for f, i in slot.items():
    k = ann_of_frame.get(f)
    if k is None:
      continue
    out['ann_valid'][i] = f in owned
    out['tags'][i] = np.asarray(fa['tags'][k], bool)
    out['cross_event'][i] = bool(fa['cross_event'][k])
  num_boxes = np.zeros((t,), np.int64)
  sounding_categories = [set() for _ in range(t)]
  for j, k in enumerate(inst['annotation_index']):
    i = ann_slot.get(int(k), -1)
    if i < 0:
      continue
    mask = np.asarray(inst['mask'][j], np.uint8)
    if mask.shape != (mh, mw):
      raise ValueError(f"record {record.get('video_id')!r}: instance mask of "
                       f'shape {mask.shape}, expected {(mh, mw)}')
    out['any_mask'][i] |= mask
    if bool(inst['sounding'][j]):
      sounding_categories[i].add(int(inst['category'][j]))
      if votes > 1:   # weighted GT: gt_mask counts covering instances, up to votes
        out['gt_mask'][i] = np.minimum(out['gt_mask'][i] + mask, votes)
      else:
        out['gt_mask'][i] |= mask
      if num_boxes[i] < max_instances:
        out['gt_boxes'][i, num_boxes[i]] = np.asarray(inst['box'][j])
        out['gt_box_valid'][i, num_boxes[i]] = True
        num_boxes[i] += 1
  for i, cats in enumerate(sounding_categories):
    if len(cats) == 1:
      out['category'][i] = cats.pop()   # stays -1 when that one is unknown
  return out
