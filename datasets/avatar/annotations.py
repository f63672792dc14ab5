"""AVATAR annotation JSON -> validated Python records -> masks and boxes.

One file per annotated frame, `metadata/<video_id>/<frame>.json`:

  {"original_width": 1280, "original_height": 720,
   "annotations": [
     {"segmentation": [[x0, y0, x1, y1, ...], ...],   # COCO polygons, original px
      "bbox": [x, y, w, h],                             # original px
      "audio_visual_category": "playing drums",
      "task": "single"},                                # scenario tag
     ...]}

Every annotated instance in AVATAR is a sound source. An instance whose `task`
is Off-Screen contributes the tag; its source is not in view, so it needs no
`segmentation`. Without one it yields a non-sounding instance with no
polygons (an empty mask, box [0, 0, 0, 0]) that keeps its
`audio_visual_category`, if it names one; with one it is kept as a visible,
non-sounding instance. Either way an Off-Screen frame has no sounding
instance. A top-level `task` (string or list) is accepted too. A frame may
carry several tags. `<frame>` is the frame number in
the source mp4 (counted from 0); its time is frame / (mp4's frame rate).

Validation happens here, in the builder's main process, before any video is
decoded, so a bad JSON is reported without paying for decoding.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from PIL import Image, ImageDraw

from tavlo_datasets import schema
from tavlo_datasets.robustness import BadExample


@dataclasses.dataclass(frozen=True)
class Instance:
  polygons: tuple[tuple[float, ...], ...]   # flat [x0, y0, x1, y1, ...] lists
  box: tuple[float, float, float, float]    # [x, y, w, h], orig px
  category_name: str
  instance_id: int                          # -1 when the JSON has none
  sounding: bool                            # False only for Off-Screen items


@dataclasses.dataclass(frozen=True)
class FrameAnnotation:
  video_id: str
  frame: int                  # source frame number (file name)
  path: str                   # the JSON file, for error messages
  original_width: int
  original_height: int
  tags: tuple[str, ...]       # normalised scenario names, sorted
  instances: tuple[Instance, ...]

  @property
  def frame_id(self) -> str:
    return f'{self.video_id}/{self.frame}'


def _field(record: dict, key: str, path, where: str):
  if not isinstance(record, dict) or key not in record:
    raise BadExample(path, 'missing_field', f'{where} lacks the field {key!r}')
  return record[key]


def _number_list(value, path, where: str, length=None) -> tuple[float, ...]:
  ok = isinstance(value, (list, tuple)) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
      for v in value)
  if not ok or (length is not None and len(value) != length):
    expected = f'{length} numbers' if length else 'a list of numbers'
    raise BadExample(path, 'missing_field',
                     f'{where} should be {expected}, got {value!r:.80}')
  return tuple(float(v) for v in value)


def _tags(value, path, where: str) -> list[str]:
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, (list, tuple)) or not all(
      isinstance(v, str) for v in values):
    raise BadExample(path, 'missing_field',
                     f'{where} should be a string or a list of strings, got '
                     f'{value!r:.80}')
  try:
    return [schema.normalize_tag(v) for v in values]
  except ValueError as e:
    raise BadExample(path, 'missing_field', f'{where}: {e}') from e


def _check_polygon(polygon, path, where: str, width: int, height: int):
  coords = _number_list(polygon, path, where)
  if len(coords) < 6 or len(coords) % 2:
    raise BadExample(path, 'missing_field',
                     f'{where} should be a flat [x0, y0, x1, y1, ...] list of '
                     f'at least 3 points, got {len(coords)} numbers')
  xs, ys = np.asarray(coords[0::2]), np.asarray(coords[1::2])
  # A polygon whose bounding box misses the frame entirely is a coordinate bug
  # (wrong frame size, swapped axes, ...); one that overhangs is just clipped
  # by the rasteriser.
  if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= width or ys.min() >= height:
    raise BadExample(
        path, 'polygon_outside',
        f'{where} lies entirely outside the {width}x{height} frame '
        f'(x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, '
        f'{ys.max():g}])')
  return coords


def _instance_id(item: dict) -> int:
  instance_id = item.get('instance_id', -1)
  if isinstance(instance_id, bool) or not isinstance(instance_id, int):
    return -1
  return instance_id


def parse_frame_json(path, text: str | bytes, video_id: str) -> FrameAnnotation:
  """Parses and validates one `metadata/<video_id>/<frame>.json`."""
  stem = str(path).rsplit('/', 1)[-1].rsplit('.', 1)[0]
  if not stem.isdigit():
    raise BadExample(path, 'missing_field',
                     f'file name should be <frame number>.json, got {stem!r}')
  try:
    record = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExample(path, 'bad_json', f'does not parse as JSON ({e})') from e
  if not isinstance(record, dict):
    raise BadExample(path, 'bad_json', 'top level should be a JSON object')
  size = []
  for key in ('original_width', 'original_height'):
    value = _field(record, key, path, 'the file')
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise BadExample(path, 'missing_field',
                       f'{key} should be a positive integer, got {value!r}')
    size.append(value)
  width, height = size
  items = _field(record, 'annotations', path, 'the file')
  if not isinstance(items, list):
    raise BadExample(path, 'missing_field', 'annotations should be a list')

  tags = _tags(record['task'], path, 'task') if 'task' in record else []
  instances = []
  for i, item in enumerate(items):
    where = f'annotations[{i}]'
    item_tags = _tags(_field(item, 'task', path, where), path, f'{where}.task')
    tags += item_tags
    offscreen = item_tags == ['offscreen']
    if offscreen and not item.get('segmentation'):
      # Heard, not in view: no pixels, but what is heard is kept.
      category = item.get('audio_visual_category')
      if isinstance(category, str) and category.strip():
        instances.append(Instance(
            polygons=(), box=(0.0, 0.0, 0.0, 0.0),
            category_name=category.strip(),
            instance_id=_instance_id(item), sounding=False))
      continue
    polygons = _field(item, 'segmentation', path, where)
    if not isinstance(polygons, list) or not polygons:
      raise BadExample(path, 'missing_field',
                       f'{where}.segmentation should be a non-empty list of '
                       'polygons')
    polygons = tuple(
        _check_polygon(p, path, f'{where}.segmentation[{j}]', width, height)
        for j, p in enumerate(polygons))
    box = _number_list(_field(item, 'bbox', path, where), path,
                       f'{where}.bbox', length=4)
    if box[2] < 0 or box[3] < 0:
      raise BadExample(path, 'missing_field',
                       f'{where}.bbox width and height should be >= 0, got '
                       f'{list(box)}')
    category = _field(item, 'audio_visual_category', path, where)
    if not isinstance(category, str) or not category.strip():
      raise BadExample(path, 'missing_field',
                       f'{where}.audio_visual_category should be a non-empty '
                       f'string, got {category!r}')
    instances.append(Instance(polygons=polygons, box=box,
                              category_name=category.strip(),
                              instance_id=_instance_id(item),
                              sounding=not offscreen))
  if not tags:
    raise BadExample(path, 'missing_field',
                     'no scenario tag: neither a top-level task nor any '
                     'annotation task')
  return FrameAnnotation(
      video_id=video_id, frame=int(stem), path=str(path),
      original_width=width, original_height=height,
      tags=tuple(sorted(set(tags), key=schema.SCENARIOS.index)),
      instances=tuple(instances))


def rasterize(polygons, original_size: tuple[int, int],
              mask_size: tuple[int, int]) -> np.ndarray:
  """Union of COCO polygons as a uint8 0/1 mask [MH, MW].

  original_size is (width, height) of the pixel space the polygons are in.
  Convention (that of cv2.findContours / cv2.fillPoly and PIL, which most
  COCO-style tools use to go between masks and polygons): integer coordinates
  are pixel centres, and a filled polygon includes the pixels on its outline.
  So a polygon traced through the centres of a mask's boundary pixels fills
  back to exactly that mask at the same resolution (AVATAR's 640x360 masks of
  640x360 videos). At another resolution the centres are mapped,
  x' = (x + 0.5) * scale - 0.5, and PIL fills pixels floor(x0')..floor(x1')
  of each scanline span (at most one pixel more than the pixel-centre test,
  on the low side). Parts outside the frame are clipped by the canvas.
  """
  mask_h, mask_w = mask_size
  scale = np.asarray([mask_w / original_size[0], mask_h / original_size[1]])
  image = Image.new('L', (mask_w, mask_h), 0)
  draw = ImageDraw.Draw(image)
  for polygon in polygons:
    xy = (np.asarray(polygon, np.float64).reshape(-1, 2) + 0.5) * scale - 0.5
    draw.polygon([tuple(p) for p in xy], fill=1)
  return np.asarray(image, np.uint8)


def scale_box(box, original_size: tuple[int, int],
              mask_size: tuple[int, int]) -> np.ndarray:
  """[x, y, w, h] in original pixels -> mask pixels, clipped to the frame."""
  mask_h, mask_w = mask_size
  sx, sy = mask_w / original_size[0], mask_h / original_size[1]
  x, y, w, h = box
  x0, x1 = np.clip([x * sx, (x + w) * sx], 0, mask_w)
  y0, y1 = np.clip([y * sy, (y + h) * sy], 0, mask_h)
  return np.asarray([x0, y0, x1 - x0, y1 - y0], np.float32)
