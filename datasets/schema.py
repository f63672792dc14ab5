"""The one feature schema shared by every dataset builder (synthetic and real).

`avatar_synth`, `avatar` and `vggsound` all emit exactly these features, so the
input pipeline, the trainer and the evaluator never know which one they read.

Why this shape (see WORKSPACE.md "TFDS without TensorFlow"): without TF, TFDS
can neither encode `tfds.features.Video` nor nest a `Text` inside a nested
`Sequence`, and a `Tensor` with a `None` dimension inside a `Sequence` fails to
decode. So the clip is flat top-level tensors, and the annotations are two flat
top-level sequences of fixed-shape records:

  frames            uint8  [N, H, W, 3]   zlib-compressed, N = clip frames at `fps`
  frame_times       f32    [N]            seconds since the start of the clip
  waveform          f32    [S]            mono, `sample_rate` Hz, starts at t=0
    (or, with `frame_storage='h264'` / `'jpeg'`, encoded frames and
    `waveform_pcm16` or `waveform_flac` (`audio_codec`) instead of `frames`
    and `waveform`: clip_storage.py.
    Readers go through clip_storage, which accepts every layout.)
  sample_rate       i32    []
  fps               f32    []
  video_id          text
  original_width    i32    []             of the source video (AVATAR json)
  original_height   i32    []
  frames_annotated  sequence of one record per annotated frame:
      frame_index   i32    index into `frames`
      time          f32    seconds (== frame_times[frame_index] up to decoding)
      frame_id      text   AVATAR id "<video_id>/<frame>" (frame in source numbering)
      tags          bool   [4]  multi-hot over SCENARIOS
      cross_event   bool   the sounding source changes within this video
  instances         sequence of one record per (annotated frame, instance):
      annotation_index i32  index into `frames_annotated`
      instance_id   i32    stable within the video (-1 unknown)
      box           f32    [4]  [x, y, w, h] in mask pixels
      mask          uint8  [MH, MW] 0/1, at the mask resolution of the builder
      category      i32    index into the builder's category list (-1 unknown)
      category_name text   `audio_visual_category`
      sounding      bool   this instance is a sound source at this frame

Off-screen frames have an entry in `frames_annotated` and usually no sounding
instance. What is heard off screen keeps its category: an instance with
`sounding=False`, an all-zero mask and box [0, 0, 0, 0] (it is in no pixel,
so it changes no ground-truth map); the ground-truth map of a frame is the union of the masks of its
sounding instances.

Weighted ground truth (an extension; `features(weighted_gt=True)` adds it):

  gt_votes          i32    []   a pixel covered by c sounding instances weighs
                                min(c / gt_votes, 1)

Flickr-SoundNet stores each annotator's box as one instance and gt_votes=2
(pixels one annotator marks weigh 0.5, two or more weigh 1). A record
without the field is read as gt_votes=1: the union above.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from tavlo_datasets.clip_storage import check_audio_codec
from tavlo_datasets.clip_storage import FRAME_STORAGES

# Scenario order is part of the schema: `tags` is multi-hot in this order.
SCENARIOS = ('single', 'mixed', 'multi', 'offscreen')
# The names AVATAR's evaluator prints.
SCENARIO_DISPLAY = {
    'single': 'Single-Sound',
    'mixed': 'Mixed-Sound',
    'multi': 'Multi-Entity',
    'offscreen': 'Off-Screen',
}
# Every spelling of a task tag seen in AVATAR json files and its evaluator.
_TAG_ALIASES = {
    'single': 'single', 'single-sound': 'single', 'single_sound': 'single',
    'singlesound': 'single',
    'mixed': 'mixed', 'mixed-sound': 'mixed', 'mixed_sound': 'mixed',
    'mixedsound': 'mixed',
    'multi': 'multi', 'multi-entity': 'multi', 'multi_entity': 'multi',
    'multientity': 'multi',
    'off-screen': 'offscreen', 'offscreen': 'offscreen', 'off_screen': 'offscreen',
    'off screen': 'offscreen',
}


def normalize_tag(tag: str) -> str:
  """Maps an AVATAR `task` string (any seen spelling) to one of SCENARIOS."""
  key = str(tag).strip().lower()
  if key not in _TAG_ALIASES:
    raise ValueError(
        f'unknown scenario tag {tag!r}; expected one of '
        f'{sorted(set(_TAG_ALIASES))}')
  return _TAG_ALIASES[key]


def tags_to_multihot(tags) -> np.ndarray:
  out = np.zeros(len(SCENARIOS), bool)
  for t in tags:
    out[SCENARIOS.index(normalize_tag(t))] = True
  return out


def _clip_features(frame_storage: str, frame_height: int, frame_width: int,
                   audio_codec: str) -> dict:
  """The frame and waveform features of a storage layout (clip_storage.py)."""
  f = tfds.features
  # BYTES/ZLIB: TFDS would otherwise serialise each sample/pixel as one
  # protobuf list element (measured 2x slower builds).
  if frame_storage == 'raw':
    return {
        'frames': f.Tensor(shape=(None, frame_height, frame_width, 3),
                           dtype=np.uint8, encoding=f.Encoding.ZLIB),
        'waveform': f.Tensor(shape=(None,), dtype=np.float32,
                             encoding=f.Encoding.BYTES),
    }
  # Encoded layouts: frame sizes follow the source's aspect ratio and live
  # in the bitstreams.
  check_audio_codec(audio_codec)
  audio = {f'waveform_{audio_codec}': f.Tensor(
      shape=(None,), dtype=np.int16 if audio_codec == 'pcm16' else np.uint8,
      encoding=f.Encoding.BYTES)}
  if frame_storage == 'h264':
    return {
        'frames_h264': f.Tensor(shape=(None,), dtype=np.uint8,
                                encoding=f.Encoding.BYTES),
        'segment_offsets': f.Tensor(shape=(None,), dtype=np.int64),
        'segment_frames': f.Scalar(dtype=np.int32),
        **audio,
    }
  if frame_storage == 'jpeg':
    return {
        'frames_jpeg': f.Tensor(shape=(None,), dtype=np.uint8,
                                encoding=f.Encoding.BYTES),
        'frame_offsets': f.Tensor(shape=(None,), dtype=np.int64),
        **audio,
    }
  raise ValueError(f'frame_storage={frame_storage!r}; expected one of '
                   f'{FRAME_STORAGES}')


def features(*, frame_height: int = 0, frame_width: int = 0, mask_height: int,
             mask_width: int, frame_storage: str = 'raw',
             audio_codec: str = 'pcm16',
             weighted_gt: bool = False) -> tfds.features.FeaturesDict:
  """The FeaturesDict every builder returns from `_info`.

  `frame_storage` 'raw' (frames of a fixed size [H, W]), 'h264' or 'jpeg'
  (frame size free, H and W unused), with audio as `audio_codec` 'pcm16' or
  'flac' (encoded layouts only): see clip_storage.py. `weighted_gt` adds
  `gt_votes` (the weighted ground-truth extension above).
  """
  f = tfds.features
  extension = {'gt_votes': f.Scalar(dtype=np.int32)} if weighted_gt else {}
  clip = _clip_features(frame_storage, frame_height, frame_width, audio_codec)
  audio_keys = [k for k in clip if k.startswith('waveform')]
  # Key order as before the encoded layouts: the 'raw' records stay
  # byte-identical.
  return f.FeaturesDict({
      **extension,
      'video_id': f.Text(),
      **{k: v for k, v in clip.items() if k not in audio_keys},
      'frame_times': f.Tensor(shape=(None,), dtype=np.float32),
      **{k: clip[k] for k in audio_keys},
      'sample_rate': f.Scalar(dtype=np.int32),
      'fps': f.Scalar(dtype=np.float32),
      'original_width': f.Scalar(dtype=np.int32),
      'original_height': f.Scalar(dtype=np.int32),
      'frames_annotated': f.Sequence({
          'frame_index': f.Scalar(dtype=np.int32),
          'time': f.Scalar(dtype=np.float32),
          'frame_id': f.Text(),
          'tags': f.Tensor(shape=(len(SCENARIOS),), dtype=np.bool_),
          'cross_event': f.Scalar(dtype=np.bool_),
      }),
      'instances': f.Sequence({
          'annotation_index': f.Scalar(dtype=np.int32),
          'instance_id': f.Scalar(dtype=np.int32),
          'box': f.Tensor(shape=(4,), dtype=np.float32),
          'mask': f.Tensor(shape=(mask_height, mask_width), dtype=np.uint8,
                           encoding=f.Encoding.ZLIB),
          'category': f.Scalar(dtype=np.int32),
          'category_name': f.Text(),
          'sounding': f.Scalar(dtype=np.bool_),
      }),
  })


def empty_instances(mask_height: int, mask_width: int) -> dict:
  """An `instances` value with zero records (TFDS needs typed empty arrays)."""
  return {
      'annotation_index': np.zeros((0,), np.int32),
      'instance_id': np.zeros((0,), np.int32),
      'box': np.zeros((0, 4), np.float32),
      'mask': np.zeros((0, mask_height, mask_width), np.uint8),
      'category': np.zeros((0,), np.int32),
      'category_name': [],
      'sounding': np.zeros((0,), np.bool_),
  }


def empty_frames_annotated() -> dict:
  """A `frames_annotated` value with zero records (e.g. training-only clips)."""
  return {
      'frame_index': np.zeros((0,), np.int32),
      'time': np.zeros((0,), np.float32),
      'frame_id': [],
      'tags': np.zeros((0, len(SCENARIOS)), np.bool_),
      'cross_event': np.zeros((0,), np.bool_),
  }
