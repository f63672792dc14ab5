"""TFDS builder `avatar`: the AVATAR benchmark release (evaluation only).

Reads the release from `manual_dir` (see README.md for the layout and the
commands) and emits one `schema` record per video in the split `test`.

Where the work happens: listing the files and parsing/validating every
annotation JSON is cheap and runs in the builder's process
(`collect_videos`); decoding an mp4 and rasterising its masks is the expensive
part and runs per video in `process_video`, which is what Apache Beam spreads
over workers (`robustness.RobustBuilderMixin`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import zipfile

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from tavlo_datasets import clip_storage
from tavlo_datasets import media
from tavlo_datasets import schema
from tavlo_datasets.avatar import annotations as ann_lib
from tavlo_datasets.robustness import BadExample, RobustBuilderMixin, SkipLog
from tavlo_datasets.robustness import check_policy


@dataclasses.dataclass(eq=False)
class AvatarConfig(tfds.core.BuilderConfig):
  """How the release is packed. Sizes are (height, width)."""
  fps: float = 8.0                           # decoded frame rate
  # Stored frames (clip_storage.py): source aspect kept, this short side
  # (640x360 -> 456x256: random crops around 224 px stay possible, as the
  # image-level peers train), encoded as `frame_codec` 'h264' (segments of
  # `segment_frames`, quality `h264_crf`) or 'jpeg' (`jpeg_quality`).
  frame_short_side: int = 256
  frame_codec: str = 'h264'
  h264_crf: int = 25
  segment_frames: int = 16
  jpeg_quality: int = 85
  # 'flac' (lossless, ~2/3 of the 16-bit bytes) or 'pcm16' (no decoding:
  # what the `vggsound` training records use; clip_storage.py). This is
  # the test set: each clip is read once per evaluation.
  audio_codec: str = 'flac'
  mask_size: tuple[int, int] = (360, 640)    # the official 640x360 evaluation
  sample_rate: int = 16000                   # mono waveform rate
  # Category list: empty = every `audio_visual_category` in the metadata,
  # sorted (kept in `info.metadata['categories']`); a fixed list makes indices
  # comparable across releases, and names outside it get category -1.
  categories: tuple[str, ...] = ()
  on_bad_example: str = 'raise'              # 'raise' | 'skip' (robustness.py)

  def __post_init__(self):
    # JSON configs (`tfds build --config '{...}'`) give lists.
    self.frame_short_side = int(self.frame_short_side)
    if self.frame_codec not in ('h264', 'jpeg'):
      raise ValueError(f"frame_codec={self.frame_codec!r}; expected 'h264' "
                       "or 'jpeg'")
    clip_storage.check_audio_codec(self.audio_codec)
    self.mask_size = tuple(int(v) for v in self.mask_size)
    self.categories = tuple(self.categories)
    check_policy(self.on_bad_example)


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One video to pack: plain data, so it pickles to Beam workers."""
  video_id: str
  path: str
  annotations: tuple[ann_lib.FrameAnnotation, ...]   # sorted by frame


def _extract_once(archive: epath.Path, target: epath.Path) -> epath.Path:
  """Extracts a zip into `target` unless an earlier run finished doing so.

  (TFDS's own `dl_manager.extract` needs TensorFlow.) Extracts into a
  temporary sibling and renames it, so an interrupted extraction is never
  mistaken for a complete one.
  """
  if target.exists():
    return target
  partial = target.parent / f'{target.name}.incomplete'
  if partial.exists():
    partial.rmtree()
  partial.mkdir(parents=True)
  logging.info('Extracting %s to %s', archive, target)
  with archive.open('rb') as f, zipfile.ZipFile(f) as z:
    z.extractall(partial)   # zipfile drops absolute and '..' member paths
  partial.rename(target)
  return target


def _release_dir(dl_manager, name: str) -> epath.Path:
  """`<manual_dir>/<name>/` if extracted, else `<name>.zip` extracted once."""
  manual_dir = dl_manager.manual_dir
  if (manual_dir / name).is_dir():
    return manual_dir / name
  archive = manual_dir / f'{name}.zip'
  if archive.exists():
    # Keyed by size too, so a re-downloaded, different zip is re-extracted.
    target = f'avatar_{name}_{archive.stat().length}'
    return _extract_once(archive,
                         dl_manager.download_dir / 'extracted' / target)
  raise FileNotFoundError(
      f'{manual_dir}: found neither {name}/ nor {name}.zip. Expected layout:\n'
      f'{Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')


def _find_duplicates(paths_by_id: dict, skip_log: SkipLog, what: str) -> set:
  bad = set()
  for key, paths in paths_by_id.items():
    if len(paths) > 1:
      bad.add(key)
      skip_log.handle(BadExample(
          paths[1], 'duplicate_id',
          f'{what} {key!r} is given by {len(paths)} files: '
          + ', '.join(map(str, paths)), example_id=str(key).split('/')[0]))
  return bad


def collect_videos(video_dir: epath.Path, metadata_dir: epath.Path,
                   skip_log: SkipLog) -> list[VideoItem]:
  """Lists the release and validates every annotation JSON."""
  mp4s = collections.defaultdict(list)
  for path in media.find_files(video_dir, '.mp4'):
    mp4s[path.stem].append(path)
  jsons = collections.defaultdict(list)
  for path in media.find_files(metadata_dir, '.json'):
    jsons[f'{path.parent.name}/{path.stem}'].append(path)

  bad_videos = _find_duplicates(mp4s, skip_log, 'video id')
  bad_videos |= {frame_id.split('/')[0] for frame_id in
                 _find_duplicates(jsons, skip_log, 'frame id')}
  frames_by_video = collections.defaultdict(list)
  for frame_id, (path, *_) in sorted(jsons.items()):
    frames_by_video[frame_id.split('/')[0]].append(path)

  items = []
  for video_id in sorted(set(mp4s) | set(frames_by_video)):
    if video_id in bad_videos:
      continue
    try:
      if video_id not in mp4s:
        raise BadExample(
            frames_by_video[video_id][0].parent, 'missing_video',
            f'annotations for video {video_id!r} but no {video_id}.mp4 under '
            f'{video_dir}', example_id=video_id)
      parsed = []
      for path in frames_by_video.get(video_id, ()):
        try:
          parsed.append(ann_lib.parse_frame_json(
              path, path.read_bytes(), video_id))
        except BadExample as e:
          e.example_id = video_id
          raise
    except BadExample as e:
      skip_log.handle(e)
      continue
    if not parsed:
      logging.warning('%s has no annotation JSON; packed without annotations',
                      mp4s[video_id][0])
    items.append(VideoItem(
        video_id=video_id, path=str(mp4s[video_id][0]),
        annotations=tuple(sorted(parsed, key=lambda a: a.frame))))
  return items


def _stack(rows: dict, empty: dict) -> dict:
  """Column lists -> arrays typed like `empty` (which is used if no rows)."""
  if not rows:
    return empty
  return {key: (np.asarray(rows[key], value.dtype)
                if isinstance(value, np.ndarray) else list(rows[key]))
          for key, value in empty.items()}


def process_video(item: VideoItem, **options):
  """Decodes one video and rasterises its annotations: yields (key, record)."""
  try:
    record = _video_record(item, **options)
  except BadExample as e:
    e.example_id = item.video_id
    raise
  yield item.video_id, record


def _video_record(item: VideoItem, *, fps: float, storage: dict, mask_size,
                  sample_rate: int, categories: tuple[str, ...]) -> dict:
  info = media.video_info(item.path)
  # The JSON's frame number counts source frames from 0.
  times = [annotation.frame / info.fps for annotation in item.annotations]
  for annotation, time in zip(item.annotations, times):
    if time >= info.duration:
      raise BadExample(
          annotation.path, 'frame_outside',
          f'annotated frame {annotation.frame} (t={time:.3f}s at '
          f'{info.fps:g} fps) is past the end of {item.path} '
          f'({info.duration:.3f}s)')
  # Pinned: each annotated source frame is one of the stored frames, so its
  # masks match its pixels exactly.
  record = clip_storage.read_clip(
      item.path, fps=fps, sample_rate=sample_rate, pinned_times=times,
      **storage)
  frame_times = record['frame_times'].astype(np.float64)
  slot_times = np.arange(len(frame_times)) / fps
  frames_annotated = collections.defaultdict(list)
  instances = collections.defaultdict(list)
  for index, (annotation, time) in enumerate(zip(item.annotations, times)):
    # The stored frame showing this source frame (f32 times: round), and of
    # several such, the one whose slot time k / fps is nearest.
    shown = np.round(np.abs(frame_times - time), 4)
    frames_annotated['frame_index'].append(int(np.lexsort(
        (np.abs(slot_times - time), shown))[0]))
    frames_annotated['time'].append(time)
    frames_annotated['frame_id'].append(annotation.frame_id)
    frames_annotated['tags'].append(schema.tags_to_multihot(annotation.tags))
    # Not inferable from AVATAR's per-frame files (see README.md).
    frames_annotated['cross_event'].append(False)
    original = (annotation.original_width, annotation.original_height)
    for instance in annotation.instances:
      instances['annotation_index'].append(index)
      instances['instance_id'].append(instance.instance_id)
      instances['box'].append(ann_lib.scale_box(instance.box, original,
                                                mask_size))
      instances['mask'].append(ann_lib.rasterize(instance.polygons, original,
                                                 mask_size))
      name = instance.category_name
      instances['category'].append(
          categories.index(name) if name in categories else -1)
      instances['category_name'].append(name)
      instances['sounding'].append(instance.sounding)

  if item.annotations:
    record['original_width'] = np.int32(item.annotations[0].original_width)
    record['original_height'] = np.int32(item.annotations[0].original_height)
  record['video_id'] = item.video_id
  record['frames_annotated'] = _stack(frames_annotated,
                                      schema.empty_frames_annotated())
  record['instances'] = _stack(instances, schema.empty_instances(*mask_size))
  return record


class Builder(RobustBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """AVATAR: 5,000 VGGSound videos with per-frame audio-visual annotations."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Frames stored as H.264 segments or one JPEG each '
               '(`frame_codec`; short side `frame_short_side`, aspect kept) '
               'and the waveform as 16-bit FLAC (clip_storage.py); Off-screen '
               'annotations without a polygon kept as non-sounding instances '
               'with their category and an empty mask. 1.0.0 records must be '
               'rebuilt.',
  }
  BUILDER_CONFIGS = [
      AvatarConfig(name='default', description='8 fps, H.264 frames with '
                   'short side 256, 640x360 masks'),
      AvatarConfig(name='small', frame_short_side=128,
                   description='8 fps, H.264 frames with short side 128, '
                   '640x360 masks'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the AVATAR release (Hugging Face dataset `mipal/AVATAR`) into
  manual_dir, either as the zips or already extracted:
    <manual_dir>/video.zip      or  <manual_dir>/video/<video_id>.mp4
    <manual_dir>/metadata.zip   or  <manual_dir>/metadata/<video_id>/<frame>.json
  (mp4s and JSON folders may sit in any sub-folder; an extracted folder is used
  in preference to its zip; a zip is extracted once, to
  <download_dir>/extracted/avatar_<name>_<zip size>/.)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return self.dataset_info_from_configs(
        features=schema.features(
            mask_height=c.mask_size[0], mask_width=c.mask_size[1],
            frame_storage=c.frame_codec, audio_codec=c.audio_codec),
        metadata=tfds.core.MetadataDict(),
        homepage='https://huggingface.co/datasets/mipal/AVATAR',
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    items = collect_videos(_release_dir(dl_manager, 'video'),
                           _release_dir(dl_manager, 'metadata'),
                           self.skip_log())
    categories = c.categories or tuple(sorted({
        instance.category_name for item in items
        for annotation in item.annotations
        for instance in annotation.instances}))
    self.info.metadata['categories'] = list(categories)
    process = functools.partial(
        process_video, fps=c.fps, storage=clip_storage.options_of(c),
        mask_size=c.mask_size, sample_rate=c.sample_rate,
        categories=categories)
    return {'test': self._generate_examples(items, process)}

  def _generate_examples(self, items, process):
    return self.examples(items, process)
