"""TFDS builder `vggsound`: self-supervised training clips from local VGGSound.

Reads mp4s from `manual_dir` (see README.md), keeps those whose id is in the
config's id list (e.g. the AVATAR release's `vggsound_10k.txt`), and emits one
`schema` record per clip in the split `train`, with empty annotations: the
same records as `avatar`, so the pipeline never knows which one it reads.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from tavlo_datasets import clip_storage
from tavlo_datasets import media
from tavlo_datasets import schema
from tavlo_datasets.robustness import BadExample, RobustBuilderMixin, SkipLog
from tavlo_datasets.robustness import check_policy

PATHS_CSV = 'videos.csv'


@dataclasses.dataclass(eq=False)
class VggsoundConfig(tfds.core.BuilderConfig):
  """Which clips and how they are packed. Sizes are (height, width)."""
  ids_file: str = 'vggsound_10k.txt'        # in manual_dir; '' = every clip
  fps: float = 8.0
  # Stored frames (clip_storage.py): source aspect kept, this short side
  # (640x360 -> 456x256: random crops around 224 px stay possible, as the
  # image-level peers train), encoded as `frame_codec` 'h264' (segments of
  # `segment_frames`, quality `h264_crf`) or 'jpeg' (`jpeg_quality`).
  frame_short_side: int = 256
  frame_codec: str = 'h264'
  h264_crf: int = 25
  segment_frames: int = 16
  jpeg_quality: int = 85
  # 'pcm16': 16-bit samples, sliced per example; 'flac': ~2/3 of the bytes,
  # but decoding a 2 s window costs ~8% of a paper-scale training example
  # (clip_storage.py). This is the training set: every clip is read many
  # times per run.
  audio_codec: str = 'pcm16'
  mask_size: tuple[int, int] = (360, 640)   # only shapes the (empty) masks
  sample_rate: int = 16000
  on_bad_example: str = 'raise'             # 'raise' | 'skip' (robustness.py)

  def __post_init__(self):
    self.frame_short_side = int(self.frame_short_side)
    if self.frame_codec not in ('h264', 'jpeg'):
      raise ValueError(f"frame_codec={self.frame_codec!r}; expected 'h264' "
                       "or 'jpeg'")
    clip_storage.check_audio_codec(self.audio_codec)
    self.mask_size = tuple(int(v) for v in self.mask_size)
    check_policy(self.on_bad_example)


def read_ids(path: epath.Path) -> list[str]:
  """One id per line (the mp4's stem); blanks, `#` comments, `.mp4` dropped.

  An id listed twice is kept once (with a warning): both lines name the same
  clip, so nothing is ambiguous.
  """
  ids = []
  for line in path.read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if line.endswith('.mp4'):
      line = line[:-len('.mp4')]
    if line:
      ids.append(line)
  unique = list(dict.fromkeys(ids))
  if len(unique) < len(ids):
    logging.warning('%s lists %d ids more than once; each is packed once',
                    path, len(ids) - len(unique))
  return unique


def _paths_from_csv(path: epath.Path) -> dict[str, list[epath.Path]]:
  rows = list(csv.DictReader(io.StringIO(path.read_text())))
  if rows and not {'id', 'path'} <= set(rows[0]):
    raise ValueError(f'{path}: expected a header with columns id,path; got '
                     f'{sorted(rows[0])}')
  found = {}
  for row in rows:
    # Relative paths are relative to the CSV's folder (manual_dir).
    video = epath.Path(row['path'].strip())
    video = video if video.is_absolute() else path.parent / video
    paths = found.setdefault(row['id'].strip(), [])
    if video not in paths:
      paths.append(video)
  return found


def collect_clips(manual_dir: epath.Path, ids_file: str,
                  skip_log: SkipLog) -> list[tuple[str, str]]:
  """(id, mp4 path) of every clip to pack, in id order."""
  csv_path = manual_dir / PATHS_CSV
  if csv_path.exists():
    found = _paths_from_csv(csv_path)
    source = str(csv_path)
  else:
    found = {}
    for path in media.find_files(manual_dir, '.mp4'):
      found.setdefault(path.stem, []).append(path)
    source = f'{manual_dir}/**/*.mp4'
  ids = read_ids(manual_dir / ids_file) if ids_file else sorted(found)
  clips = []
  for clip_id in sorted(ids):
    paths = found.get(clip_id, [])
    try:
      if not paths:
        raise BadExample(manual_dir / ids_file, 'missing_video',
                         f'id {clip_id!r} is listed but has no mp4 in '
                         f'{source}', example_id=clip_id)
      if len(paths) > 1:
        raise BadExample(paths[1], 'duplicate_id',
                         f'id {clip_id!r} is given by {len(paths)} files: '
                         + ', '.join(map(str, paths)), example_id=clip_id)
    except BadExample as e:
      skip_log.handle(e)
      continue
    clips.append((clip_id, str(paths[0])))
  return clips


def process_clip(clip: tuple[str, str], *, fps: float, storage: dict,
                 mask_size, sample_rate: int):
  """Decodes one clip: yields (id, record)."""
  clip_id, path = clip
  try:
    record = clip_storage.read_clip(path, fps=fps, sample_rate=sample_rate,
                                    **storage)
  except BadExample as e:
    e.example_id = clip_id
    raise
  record['video_id'] = clip_id
  record['frames_annotated'] = schema.empty_frames_annotated()
  record['instances'] = schema.empty_instances(*mask_size)
  yield clip_id, record


class Builder(RobustBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """VGGSound clips (video + audio, no labels) for self-supervised training."""

  VERSION = tfds.core.Version('2.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Frames stored as H.264 segments or one JPEG each '
               '(`frame_codec`; short side `frame_short_side`, aspect kept) '
               'and the waveform as 16-bit FLAC (clip_storage.py); 1.0.0 '
               'records must be rebuilt.',
      '2.1.0': 'The waveform stored as plain 16-bit PCM by default '
               "(`audio_codec`; 'flac' keeps FLAC): a training example no "
               'longer decodes FLAC (~8% of its CPU). 2.0.0 records must be '
               'rebuilt.',
  }
  BUILDER_CONFIGS = [
      VggsoundConfig(name='10k', ids_file='vggsound_10k.txt',
                     description='The 10k training ids of the AVATAR release'),
      VggsoundConfig(name='144k', ids_file='vggsound_144k.txt',
                     description='The common 144k VGGSound training subset'),
  ]
  DEFAULT_CONFIG_NAME = '10k'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put your local VGGSound copy in manual_dir:
    <manual_dir>/**/<id>.mp4          mp4s named by id, in any sub-folder, or
    <manual_dir>/videos.csv           a CSV with header `id,path` (paths
                                      relative to manual_dir, or absolute)
  and the id list of the config (one id per line):
    <manual_dir>/vggsound_10k.txt     (from the AVATAR release), or
    <manual_dir>/vggsound_144k.txt
  """

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        features=schema.features(
            mask_height=c.mask_size[0], mask_width=c.mask_size[1],
            frame_storage=c.frame_codec, audio_codec=c.audio_codec),
        homepage='https://www.robots.ox.ac.uk/~vgg/data/vggsound/',
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    manual_dir = dl_manager.manual_dir
    if c.ids_file and not (manual_dir / c.ids_file).exists():
      raise FileNotFoundError(
          f'{manual_dir / c.ids_file}: the id list of config {c.name!r} is '
          f'missing. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    clips = collect_clips(manual_dir, c.ids_file, self.skip_log())
    process = functools.partial(
        process_clip, fps=c.fps, storage=clip_storage.options_of(c),
        mask_size=c.mask_size,
        sample_rate=c.sample_rate)
    return {'train': self._generate_examples(clips, process)}

  def _generate_examples(self, clips, process):
    return self.examples(clips, process)
