"""What the two single-frame benchmarks (`vggss`, `flickr_soundnet`) share.

Both score ONE frame per sample against boxes, at 224x224, as LVS, EZ-VSL,
SLAVC and FNAC do. Here a sample becomes one `schema` record:

- a video source (a VGGSound mp4) is packed like `avatar` (frames at `fps`,
  the whole audio) and its MIDDLE frame (the stored frame showing the source
  frame nearest to duration / 2) is the one annotated;
- a still source (a `.jpg` and an audio file, the peers' `frames/` and
  `audio/` folders) becomes a still clip: the image repeated for
  `clip_seconds` at `fps`, with the audio window of that length centred on
  the middle of the audio file, and the middle stored frame annotated. A
  video model thus sees a static scene while the sound goes on.

Each box is one instance (sounding, mask = the box rasterised at `mask_size`
by the peers' rule). Ground truth of a frame: a pixel covered by c boxes
weighs min(c / gt_votes, 1), with the record's `gt_votes` (schema.py): 1 for
VGG-SS (the union), 2 for Flickr-SoundNet (the annotators' consensus).

Negatives (SLAVC's `*_plus_silent` lists): an image paired with another
sample's audio; its frame is tagged 'offscreen' and has no instance, like an
AVATAR Off-screen frame, so AP / max-F1 are computed over positives and
negatives as SLAVC does. Positives are tagged 'single'.
"""

from __future__ import annotations

import csv
import functools
import dataclasses
import io
from typing import Iterable, Sequence

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tavlo_datasets import media
from tavlo_datasets import schema
from tavlo_datasets.robustness import BadExample, check_policy

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.m4a', '.ogg')
VIDEO_SUFFIXES = ('.mp4', '.mkv', '.webm', '.avi')
POSITIVE_TAGS = ('single',)
NEGATIVE_TAGS = ('offscreen',)


@dataclasses.dataclass(eq=False)
class ClassicConfig(tfds.core.BuilderConfig):
  """How samples are packed. Sizes are (height, width)."""
  fps: float = 8.0
  frame_size: tuple[int, int] = (224, 224)
  mask_size: tuple[int, int] = (224, 224)   # the peers score at 224x224
  sample_rate: int = 16000
  clip_seconds: float = 3.0                 # still clips: EZ-VSL's 3 s of audio
  on_bad_example: str = 'raise'             # 'raise' | 'skip' (robustness.py)

  def __post_init__(self):
    self.frame_size = tuple(int(v) for v in self.frame_size)
    self.mask_size = tuple(int(v) for v in self.mask_size)
    check_policy(self.on_bad_example)
    if self.clip_seconds <= 0 or self.fps <= 0:
      raise ValueError(f'clip_seconds={self.clip_seconds} and fps={self.fps} '
                       'must be positive')


@dataclasses.dataclass(frozen=True)
class Sample:
  """One record to pack: plain data, so it pickles to Beam workers."""
  key: str                       # record key and video_id
  image: str                     # mp4 or image file
  audio: str                     # mp4 or audio file (another sample's for a negative)
  boxes: tuple                   # ((x0, y0, x1, y1), ...) in the GT's own units
  category_name: str = ''
  category: int = -1
  negative: bool = False


# ---- ground truth ------------------------------------------------------------

def box_corners_normalized(boxes, size: tuple[int, int]) -> np.ndarray:
  """VGG-SS: [x0, y0, x1, y1] in [0, 1] -> int pixel corners at size (H, W):
  clipped to [0, 1], scaled (float32, as the peers' torch/numpy code), truncated."""
  h, w = size
  b = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0, 1)
  return (b * np.array([w, h, w, h], np.float32)).astype(np.int32)


def box_corners_256(boxes, size: tuple[int, int], source_size: int = 256) -> np.ndarray:
  """Flickr-SoundNet: [x0, y0, x1, y1] in 256-px -> int(size * v / 256),
  clipped to the map (the peers' slices clip the same way)."""
  h, w = size
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  scale = np.array([w, h, w, h], np.float64)
  corners = (scale * b / source_size).astype(np.int64)
  return np.clip(corners, 0, np.array([w, h, w, h])).astype(np.int32)


def box_mask(corners, size: tuple[int, int]) -> np.ndarray:
  """One box's half-open slice [y0:y1, x0:x1] as a 0/1 uint8 mask."""
  x0, y0, x1, y1 = (int(v) for v in corners)
  mask = np.zeros(size, np.uint8)
  mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
  return mask


def weighted_gt(masks, gt_votes: int) -> np.ndarray:
  """[I, H, W] 0/1 box masks -> float weights min(count / gt_votes, 1)."""
  count = np.asarray(masks, np.float64).sum(axis=0)
  return np.minimum(count / gt_votes, 1.0)


# ---- listing files ---------------------------------------------------------------

def index_by_stem(root: epath.Path, suffixes: Sequence[str]) -> dict[str, list[str]]:
  """{file stem: [paths]} of every file under root with one of the suffixes
  (any case, any depth)."""
  found: dict[str, list[str]] = {}
  for directory, _, files in epath.Path(root).walk():
    for name in sorted(files):
      stem, dot, ext = name.rpartition('.')
      if dot and f'.{ext.lower()}' in suffixes:
        found.setdefault(stem, []).append(str(directory / name))
  return found


def read_id_list(path: epath.Path) -> list[str]:
  """Ids from a peers' list: `.txt` one per line or `.csv` first column; a
  trailing file suffix is dropped, blanks and `#` lines ignored."""
  ids = []
  for row in csv.reader(io.StringIO(epath.Path(path).read_text())):
    if not row or not row[0].strip() or row[0].lstrip().startswith('#'):
      continue
    ids.append(_strip_suffix(row[0].strip()))
  return list(dict.fromkeys(ids))


def read_negative_pairs(path: epath.Path) -> list[tuple[str, str]]:
  """SLAVC's `<name>_test_plus_silent.csv`: rows `image_id,audio_id,label`;
  the rows labelled `non-sounding` are the negatives (image, other audio)."""
  pairs = []
  for n, row in enumerate(csv.reader(io.StringIO(epath.Path(path).read_text()))):
    if not row or not ''.join(row).strip():
      continue
    if len(row) < 3:
      raise BadExample(path, 'missing_field',
                       f'row {n + 1} has {len(row)} columns; expected '
                       'image_id,audio_id,label')
    if row[2].strip().lower() == 'non-sounding':
      pairs.append((_strip_suffix(row[0].strip()), _strip_suffix(row[1].strip())))
  return pairs


def _strip_suffix(name: str) -> str:
  stem, dot, ext = name.rpartition('.')
  known = IMAGE_SUFFIXES + AUDIO_SUFFIXES + VIDEO_SUFFIXES
  return stem if dot and f'.{ext.lower()}' in known else name


def first_existing(manual_dir: epath.Path, names: Iterable[str]) -> epath.Path | None:
  """The first of `names` (relative paths) that exists under manual_dir."""
  for name in names:
    if (manual_dir / name).exists():
      return manual_dir / name
  return None


# ---- records -------------------------------------------------------------------

def _read_image(path: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as image:
      original = image.size
      rgb = image.convert('RGB').resize((size[1], size[0]), Image.BICUBIC)
      return np.asarray(rgb, np.uint8), original
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadExample(path, 'corrupt_video', f'cannot read as an image ({e})') from e


def _is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_SUFFIXES)


def _centre_window(wave: np.ndarray, length: int) -> np.ndarray:
  """`length` samples centred on the middle of `wave` (zero-padded if short)."""
  start = max((len(wave) - length) // 2, 0)
  out = wave[start:start + length]
  return np.pad(out, (0, length - len(out))).astype(np.float32)


def clip_record(sample: Sample, c: ClassicConfig) -> tuple[dict, int]:
  """The clip fields of the sample's record and the stored frame it scores."""
  if _is_video(sample.image):
    duration = media.video_info(sample.image).duration
    record = media.read_clip(sample.image, fps=c.fps, frame_size=c.frame_size,
                             sample_rate=c.sample_rate, pinned_times=[duration / 2])
    times = record['frame_times'].astype(np.float64)
    slots = np.arange(len(times)) / c.fps
    shown = np.round(np.abs(times - duration / 2), 4)
    middle = int(np.lexsort((np.abs(slots - duration / 2), shown))[0])
    if sample.audio != sample.image:
      record['waveform'] = media.read_audio(sample.audio, c.sample_rate)
    return record, middle
  frame, (width, height) = _read_image(sample.image, c.frame_size)
  num_frames = max(int(round(c.clip_seconds * c.fps)), 1)
  length = int(round(num_frames / c.fps * c.sample_rate))
  record = {
      'frames': np.broadcast_to(frame, (num_frames,) + frame.shape).copy(),
      'frame_times': (np.arange(num_frames) / c.fps).astype(np.float32),
      'waveform': _centre_window(media.read_audio(sample.audio, c.sample_rate), length),
      'sample_rate': np.int32(c.sample_rate),
      'fps': np.float32(c.fps),
      'original_width': np.int32(width),
      'original_height': np.int32(height),
  }
  return record, num_frames // 2


def make_record(sample: Sample, c: ClassicConfig, corners: np.ndarray,
                gt_votes: int) -> dict:
  """A full `schema` record; `corners` [I, 4] int boxes at c.mask_size."""
  try:
    record, middle = clip_record(sample, c)
  except BadExample as e:
    e.example_id = sample.key
    raise
  record['video_id'] = sample.key
  record['gt_votes'] = np.int32(gt_votes)
  tags = NEGATIVE_TAGS if sample.negative else POSITIVE_TAGS
  record['frames_annotated'] = {
      'frame_index': np.array([middle], np.int32),
      'time': np.array([record['frame_times'][middle]], np.float32),
      'frame_id': [sample.key],
      'tags': schema.tags_to_multihot(tags)[None],
      'cross_event': np.zeros((1,), np.bool_),
  }
  if sample.negative or not len(corners):
    record['instances'] = schema.empty_instances(*c.mask_size)
    return record
  n = len(corners)
  x0, y0, x1, y1 = (corners[:, i].astype(np.float32) for i in range(4))
  record['instances'] = {
      'annotation_index': np.zeros((n,), np.int32),
      'instance_id': np.arange(n, dtype=np.int32),
      'box': np.stack([x0, y0, x1 - x0, y1 - y0], axis=1),
      'mask': np.stack([box_mask(b, c.mask_size) for b in corners]),
      'category': np.full((n,), sample.category, np.int32),
      'category_name': [sample.category_name] * n,
      'sounding': np.ones((n,), np.bool_),
  }
  return record


# ---- collecting samples ------------------------------------------------------------

class MediaIndex:
  """Where each id's pixels and sound are: `<id>.mp4` (any depth) or
  `<id>.jpg` + `<id>.wav` (the peers' `frames/` + `audio/` folders)."""

  def __init__(self, root: epath.Path):
    self.root = root
    self.videos = index_by_stem(root, VIDEO_SUFFIXES)
    self.images = index_by_stem(root, IMAGE_SUFFIXES)
    self.audios = index_by_stem(root, AUDIO_SUFFIXES)

  def _one(self, table: dict, key: str, what: str) -> str | None:
    paths = table.get(key, [])
    if len(paths) > 1:
      raise BadExample(paths[1], 'duplicate_id',
                       f'{what} {key!r} is given by {len(paths)} files: '
                       + ', '.join(paths), example_id=key)
    return paths[0] if paths else None

  def _find(self, key: str, other: dict, listed_in, kind: str, suffixes) -> str:
    found = self._one(self.videos, key, 'id') or self._one(other, key, 'id')
    if found is None:
      raise BadExample(listed_in, kind,
                       f'id {key!r} is listed but {self.root} has no {key}.mp4 and no '
                       f'{key}{suffixes[0]} (or {"/".join(suffixes[1:])})', example_id=key)
    return found

  def image(self, key: str, listed_in) -> str:
    """The id's mp4, else its image."""
    return self._find(key, self.images, listed_in, 'missing_video', IMAGE_SUFFIXES)

  def audio(self, key: str, listed_in) -> str:
    """The id's mp4, else its audio file."""
    return self._find(key, self.audios, listed_in, 'no_audio', AUDIO_SUFFIXES)


def positive_samples(ids, boxes_of: dict, index: MediaIndex, listed_in, skip_log,
                     categories: Sequence[str] = ()) -> list[Sample]:
  """Samples of `ids` (each needs boxes in `boxes_of`: {id: (corners, class)})."""
  samples = []
  for key in ids:
    try:
      if key not in boxes_of:
        raise BadExample(listed_in, 'missing_field',
                         f'id {key!r} is listed but has no boxes in the annotations',
                         example_id=key)
      corners, name = boxes_of[key]
      path = index.image(key, listed_in)
      audio = path if _is_video(path) else index.audio(key, listed_in)
    except BadExample as e:
      skip_log.handle(e)
      continue
    samples.append(Sample(key=key, image=path, audio=audio,
                          boxes=tuple(map(tuple, np.asarray(corners).tolist())),
                          category_name=name,
                          category=categories.index(name) if name in categories else -1))
  return samples


def negative_samples(pairs, index: MediaIndex, listed_in, skip_log) -> list[Sample]:
  """(image id, audio id) pairs -> negative samples keyed `<image>+<audio>`."""
  samples = []
  for image_id, audio_id in pairs:
    key = f'{image_id}+{audio_id}'
    try:
      image = index.image(image_id, listed_in)
      audio = index.audio(audio_id, listed_in)
    except BadExample as e:
      e.example_id = key
      skip_log.handle(e)
      continue
    samples.append(Sample(key=key, image=image, audio=audio, boxes=(), negative=True))
  return samples


def process_sample(sample: Sample, *, config: ClassicConfig, gt_votes: int):
  """Decodes one sample: yields (key, record)."""
  corners = np.asarray(sample.boxes, np.int32).reshape(-1, 4)
  yield sample.key, make_record(sample, config, corners, gt_votes)


class ClassicBuilderMixin:
  """`_info` and `_generate_examples` of the single-frame benchmarks; the
  builder sets GT_VOTES and HOMEPAGE and writes `_split_generators`."""

  GT_VOTES = 1
  HOMEPAGE = ''

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        features=schema.features(
            frame_height=c.frame_size[0], frame_width=c.frame_size[1],
            mask_height=c.mask_size[0], mask_width=c.mask_size[1], weighted_gt=True),
        metadata=tfds.core.MetadataDict(),
        homepage=self.HOMEPAGE,
    )

  def split_generators(self, splits: dict[str, list[Sample]]):
    process = functools.partial(process_sample, config=self.builder_config,
                                gt_votes=self.GT_VOTES)
    return {name: self._generate_examples(samples, process)
            for name, samples in splits.items()}

  def _generate_examples(self, samples, process):
    return self.examples(samples, process)
