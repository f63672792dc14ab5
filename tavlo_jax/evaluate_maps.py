r"""Scores ANY model's heat maps against annotations in the AVATAR release layout.

    python -m tavlo_jax.evaluate_maps --heatmaps=maps.npz --annotations=AVATAR_DIR \
        [--protocol=avatar|classic] [--out=DIR] [--heatmap_threshold=0.1]

Heat maps: an .npz whose keys are AVATAR frame ids `<video_id>/<frame_index>`
and whose values are 2-D float arrays of any resolution (e.g. saved from a
PyTorch baseline: `np.savez(path, **{f'{vid}/{frame}': map})`). Annotations:
`DIR/metadata/<video_id>/<frame>.json` (or `DIR/<video_id>/<frame>.json`) with
`original_width`, `original_height` and `annotations`, each instance with
COCO `segmentation` polygons in original pixels and a `task` tag.

Protocol (AVATAR): polygons of the SOUNDING instances (task not Off-Screen,
unless an explicit boolean `sounding` says otherwise) are rasterised at
640x360; maps are resized to 640x360 (--interpolation), min-max normalised
and binarised at --heatmap_threshold. Maps are taken as scores where higher
means "sounding here"; the absolute-map scores (pIA_abs, confidence, AP)
assume cosine maps in [-1, 1]. A video is cross-event when the set of
sounding categories changes between its annotated frames (or when its json
says `"cross_event": true`).

VGG-SS and Flickr-SoundNet (use --protocol=classic): --annotations=vggss.json
or a folder of Flickr <id>.xml files, heat maps keyed by id, GT at 224x224
as the peers build it; Flickr's consensus keeps its 0.5 / 1 weights
(evaluation/classic_gt.py). --negatives=<name>_test_plus_silent.csv adds
SLAVC's non-sounding pairs (keys `<image_id>+<audio_id>`) for AP / max-F1.

Prints the per-scenario table and, with --out, writes JSON, Markdown and a
per-frame CSV (report.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw

from tavlo_datasets import schema
from tavlo_jax import cli, config_lib
from tavlo_jax.evaluation import classic_gt, evaluator as evaluator_lib, metrics, report

AVATAR_SIZE = (360, 640)   # (H, W) of the AVATAR protocol

FLAGS = flags.FLAGS
def _define_flags():
  """CLI flags, defined only when run as a program (so importing this module
  next to other CLIs never clashes on a flag name such as --out)."""
  if 'heatmaps' in FLAGS:
    return
  flags.DEFINE_string('heatmaps', None, '.npz of 2-D maps keyed <video_id>/<frame_index>.')
  flags.DEFINE_string('annotations', None, 'AVATAR release dir (metadata/<video>/<frame>.json).')
  flags.DEFINE_enum('protocol', 'avatar', evaluator_lib.PROTOCOLS,
                    'Headline binarisation: avatar (fixed threshold) or classic (top 50%).')
  flags.DEFINE_string('out', None, 'Directory for JSON / Markdown / CSV (optional).')
  flags.DEFINE_float('heatmap_threshold', 0.1, 'Headline threshold on the normalised map.')
  flags.DEFINE_list('heatmap_thresholds', ['0.1', '0.15', '0.2'], 'All thresholds reported.')
  flags.DEFINE_enum('interpolation', 'bilinear', list(metrics.INTERPOLATIONS),
                    "Resizing of maps to the annotation size (the classic peers': "
                    'bicubic_torch).')
  flags.DEFINE_enum('offscreen_rule', 'no_pixel_above', ['no_pixel_above', 'raw_max'],
                    'TN rule for Off-Screen frames (raw_max needs --raw_threshold).')
  flags.DEFINE_float('raw_threshold', None, "raw_max rule: calibrated raw threshold.")
  flags.DEFINE_list('annotation_size', ['360', '640'],
                    'H,W at which GT is rasterised and maps scored (AVATAR: 360,640).')
  flags.DEFINE_integer('batch_frames', 32, 'Frames scored per device call.')
  flags.DEFINE_string('negatives', None, "VGG-SS/Flickr: SLAVC's *_test_plus_silent.csv "
                      '(non-sounding pairs, keyed <image_id>+<audio_id>).')


@dataclasses.dataclass
class FrameAnnotation:
  frame_id: str                    # '<video_id>/<frame>'
  video_id: str
  frame: int
  tags: np.ndarray                 # bool [4], schema.SCENARIOS order
  polygons: list                   # sounding instances: list of flat [x0, y0, ...] lists
  categories: frozenset            # sounding categories (cross-event detection)
  original_size: tuple[int, int]   # (W, H) of the polygons' pixel grid
  cross_event: bool = False
  gt: np.ndarray | None = None     # VGG-SS/Flickr: box counts at 224x224 (not polygons)
  gt_votes: int = 1                # ... a pixel weighs min(gt / gt_votes, 1)


def from_classic(frame: classic_gt.ClassicFrame) -> FrameAnnotation:
  tags = ['offscreen'] if frame.negative else ['single']
  return FrameAnnotation(
      frame_id=frame.key, video_id=frame.key, frame=0,
      tags=schema.tags_to_multihot(tags), polygons=[], categories=frozenset(),
      original_size=classic_gt.SIZE[::-1], gt=frame.counts, gt_votes=frame.votes)


def _instance_tags(inst, path) -> list[str]:
  task = inst.get('task')
  if task is None:
    raise ValueError(f'{path}: an annotation has no "task" tag')
  tasks = [task] if isinstance(task, str) else list(task)
  try:
    return [schema.normalize_tag(t) for t in tasks]
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def _polygons(inst, path) -> list:
  seg = inst.get('segmentation', [])
  if isinstance(seg, dict):
    raise ValueError(f'{path}: RLE segmentation is not supported (expected polygons)')
  if seg and not isinstance(seg[0], (list, tuple)):
    seg = [seg]   # a single flat polygon
  return [list(map(float, p)) for p in seg if len(p) >= 6]


def parse_frame(path: str, video_id: str, frame: int) -> FrameAnnotation:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}); expected an AVATAR frame '
                     'annotation object') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: a JSON {type(data).__name__}, expected an object '
                     'with original_width, original_height and annotations')
  for key in ('original_width', 'original_height', 'annotations'):
    if key not in data:
      raise ValueError(f'{path}: missing field {key!r}')
  tags, polygons, categories = set(), [], set()
  for inst in data['annotations']:
    inst_tags = _instance_tags(inst, path)
    tags.update(inst_tags)
    sounding = inst.get('sounding', 'offscreen' not in inst_tags)
    if sounding:
      polygons.extend(_polygons(inst, path))
      categories.add(str(inst.get('audio_visual_category', '')))
  return FrameAnnotation(
      frame_id=f'{video_id}/{frame}', video_id=video_id, frame=frame,
      tags=schema.tags_to_multihot(sorted(tags)), polygons=polygons,
      categories=frozenset(categories),
      original_size=(int(data['original_width']), int(data['original_height'])),
      cross_event=bool(data.get('cross_event', False)))


def load_annotations(ann_dir: str) -> list[FrameAnnotation]:
  """Every `<video_id>/<frame>.json` under ann_dir (or ann_dir/metadata)."""
  root = os.path.join(ann_dir, 'metadata') if os.path.isdir(
      os.path.join(ann_dir, 'metadata')) else ann_dir
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--annotations: {ann_dir!r} is not a directory')
  frames = []
  for video_id in sorted(os.listdir(root)):
    vdir = os.path.join(root, video_id)
    if not os.path.isdir(vdir):
      continue
    names = [n for n in os.listdir(vdir) if n.endswith('.json')]
    for name in sorted(names, key=lambda n: int(n[:-5]) if n[:-5].isdigit() else n):
      stem = name[:-5]
      if not stem.isdigit():
        raise ValueError(f'{os.path.join(vdir, name)}: frame file names must be integers')
      frames.append(parse_frame(os.path.join(vdir, name), video_id, int(stem)))
  if not frames:
    raise FileNotFoundError(f'no <video_id>/<frame>.json files under {root!r}')
  # Cross-event: the sounding categories change within the video.
  by_video: dict[str, list[FrameAnnotation]] = {}
  for fa in frames:
    by_video.setdefault(fa.video_id, []).append(fa)
  for vframes in by_video.values():
    onscreen = {fa.categories for fa in vframes if fa.categories}
    if len(onscreen) > 1:
      for fa in vframes:
        fa.cross_event = True
  return frames


def rasterize(fa: FrameAnnotation, size=AVATAR_SIZE) -> np.ndarray:
  """Union of the sounding polygons at size (H, W), uint8 0/1 (VGG-SS/Flickr:
  the stored box counts)."""
  if fa.gt is not None:
    return fa.gt
  h, w = size
  img = Image.new('L', (w, h), 0)
  draw = ImageDraw.Draw(img)
  sx, sy = w / fa.original_size[0], h / fa.original_size[1]
  for poly in fa.polygons:
    xy = [(x * sx, y * sy) for x, y in zip(poly[0::2], poly[1::2])]
    draw.polygon(xy, fill=1, outline=1)
  return np.asarray(img, np.uint8)


MAX_LISTED = 20   # bad keys listed one per line; the rest are counted


def check_heatmaps(frames: list[FrameAnnotation], maps, source: str = '--heatmaps') -> None:
  """Missing keys and bad maps raise `cli.InputError`, one line per key
  (`source: key 'vid/3': what is wrong, what was expected`); extra keys are
  a warning."""
  wanted = [fa.frame_id for fa in frames]
  have = set(maps.keys())
  problems = [f'{source}: key {k!r}: missing (expected a 2-D map for every '
              f'annotated frame; {len(wanted)} frames are annotated)'
              for k in wanted if k not in have]
  extra = sorted(have - set(wanted))
  if extra:
    logging.warning('--heatmaps has %d keys without annotations (ignored), e.g. %s',
                    len(extra), extra[:5])
  for k in wanted:
    if k not in have:
      continue
    try:
      m = np.asarray(maps[k])
    except ValueError as e:   # e.g. an object array, which needs pickle
      problems.append(f'{source}: key {k!r}: unreadable ({e}); expected a numeric 2-D array')
      continue
    if m.ndim != 2 or min(m.shape) < 1:
      problems.append(f'{source}: key {k!r}: shape {m.shape}, expected a 2-D map')
    elif not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating):
      problems.append(f'{source}: key {k!r}: dtype {m.dtype} is not real-valued, '
                      'expected a numeric 2-D map')
    elif not np.isfinite(m).all():
      problems.append(f'{source}: key {k!r}: contains NaN/Inf '
                      f'({int((~np.isfinite(m)).sum())} of {m.size} values), '
                      'expected finite scores')
  if problems:
    more = len(problems) - MAX_LISTED
    raise cli.InputError(*problems[:MAX_LISTED], *(
        [f'{source}: ... and {more} more bad keys'] if more > 0 else []))


def make_config(protocol_thresholds, headline: float, interpolation: str,
                offscreen_rule: str, size=AVATAR_SIZE):
  config = config_lib.base_config()
  config.eval.heatmap_thresholds = tuple(float(t) for t in protocol_thresholds)
  config.eval.heatmap_threshold = float(headline)
  config.eval.interpolation = interpolation
  config.eval.annotation_size = tuple(size)
  config.eval.offscreen_rule = offscreen_rule
  config.evals.total = {'frames': 'all', 'prefix': 'eval/total/'}
  return config


def evaluate(frames: list[FrameAnnotation], maps, config, *, protocol: str = 'avatar',
             calibration: dict | None = None, batch_frames: int = 32):
  """Scores the maps; returns (results, per-frame table, frame_name function)."""
  size = tuple(config.eval.annotation_size)
  ev = evaluator_lib.Evaluator(config, protocol=protocol)
  videos = {v: i for i, v in enumerate(sorted({fa.video_id for fa in frames}))}
  by_shape: dict[tuple, list[FrameAnnotation]] = {}
  for fa in frames:   # one compiled shape per map resolution
    by_shape.setdefault(tuple(maps[fa.frame_id].shape), []).append(fa)
  for shape, group in by_shape.items():
    for start in range(0, len(group), batch_frames):
      chunk = group[start:start + batch_frames]
      n, pad = len(chunk), batch_frames - len(chunk)   # pad: same shape every call
      gt = np.zeros((batch_frames, 1) + size, np.uint8)
      heat = np.zeros((batch_frames, 1) + shape, np.float32)
      for i, fa in enumerate(chunk):
        gt[i, 0] = rasterize(fa, size)
        heat[i, 0] = np.asarray(maps[fa.frame_id], np.float32)
      batch = {
          'valid': np.arange(batch_frames) < n,
          'ann_valid': np.ones((batch_frames, 1), bool),
          'gt_mask': gt,
          'tags': np.stack([fa.tags for fa in chunk] + [np.zeros(4, bool)] * pad)[:, None],
          'cross_event': np.array([fa.cross_event for fa in chunk] + [False] * pad)[:, None],
          'clip_index': np.array([videos[fa.video_id] for fa in chunk] + [-1] * pad, np.int32),
          'frame_index': np.array([fa.frame for fa in chunk] + [-1] * pad, np.int32)[:, None],
          'gt_votes': np.array([fa.gt_votes for fa in chunk] + [1] * pad, np.int32)[:, None],
      }
      ev.add(batch, heat)
  names = {v: k for k, v in videos.items()}
  frame_name = lambda c, f: f'{names[c]}/{f}'
  return ev.finalize(calibration), ev.records(), frame_name


def open_heatmaps(path: str):
  """The .npz of maps, or `cli.InputError` saying what the file is instead."""
  expected = 'an .npz archive of 2-D maps keyed <video_id>/<frame_index> (np.savez)'
  if not os.path.isfile(path):
    raise cli.InputError(f'--heatmaps: {path}: no such file; expected {expected}')
  try:
    maps = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise cli.InputError(f'--heatmaps: {path}: not readable as .npz ({e}); '
                         f'expected {expected}') from None
  if not isinstance(maps, np.lib.npyio.NpzFile):
    raise cli.InputError(
        f'--heatmaps: {path}: holds one {maps.ndim}-D array of shape {maps.shape} '
        f'(a .npy file), expected {expected}')
  return maps


@cli.user_errors(ValueError, FileNotFoundError)
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.heatmaps or not FLAGS.annotations:
    raise app.UsageError('--heatmaps and --annotations are required')
  calibration = None
  if FLAGS.offscreen_rule == 'raw_max':
    if FLAGS.raw_threshold is None:
      raise app.UsageError('--offscreen_rule=raw_max needs --raw_threshold')
    calibration = {'rule': 'raw_max', 'raw_threshold': FLAGS.raw_threshold,
                   'source': '--raw_threshold flag'}
  thresholds = [float(t) for t in FLAGS.heatmap_thresholds]
  if FLAGS.heatmap_threshold not in thresholds:
    thresholds.append(FLAGS.heatmap_threshold)
  if len(FLAGS.annotation_size) != 2:
    raise app.UsageError(f'--annotation_size=H,W, got {FLAGS.annotation_size}')
  size = tuple(int(v) for v in FLAGS.annotation_size)
  if classic_gt.layout(FLAGS.annotations):   # VGG-SS / Flickr: the peers' 224x224
    frames = [from_classic(f) for f in classic_gt.load(FLAGS.annotations, FLAGS.negatives)]
    size = classic_gt.SIZE
  else:
    frames = load_annotations(FLAGS.annotations)
  config = make_config(thresholds, FLAGS.heatmap_threshold, FLAGS.interpolation,
                       FLAGS.offscreen_rule, size)
  maps = open_heatmaps(FLAGS.heatmaps)
  check_heatmaps(frames, maps, f'--heatmaps: {FLAGS.heatmaps}')
  results, table, frame_name = evaluate(frames, maps, config, protocol=FLAGS.protocol,
                                        calibration=calibration,
                                        batch_frames=FLAGS.batch_frames)
  kind = classic_gt.layout(FLAGS.annotations)
  if kind:   # names the benchmark, so the table shows the published numbers beside ours
    results['dataset'] = {'vggss': 'vggss', 'flickr': 'flickr_soundnet'}[kind]
    results['split'] = 'test_plus_silent' if FLAGS.negatives else 'test'
  results['settings']['heatmaps'] = os.path.abspath(FLAGS.heatmaps)
  results['settings']['annotations'] = os.path.abspath(FLAGS.annotations)
  print(report.format_table(results))
  if FLAGS.out:
    paths = report.write(FLAGS.out, results, table, frame_name)
    print('wrote', ', '.join(paths.values()))


def run():
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
