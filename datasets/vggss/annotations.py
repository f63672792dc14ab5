"""The VGG-SS box file: a JSON list of `{file, class, bbox: [[x0, y0, x1, y1], ...]}`.

Coordinates are normalised to [0, 1] over the frame. Spellings seen in the
public copies: the id under `file` (sometimes with a `.mp4`/`.jpg`/`.wav`
suffix, dropped here) or `video_id`; boxes under `bbox` or `bboxes`; the
class under `class` or `label` (optional).
"""

from __future__ import annotations

import json

from etils import epath
import numpy as np

from tavlo_datasets import classic
from tavlo_datasets.robustness import BadExample

ID_KEYS = ('file', 'video_id')
BOX_KEYS = ('bbox', 'bboxes')
CLASS_KEYS = ('class', 'label')


def _first(entry: dict, keys):
  return next((entry[k] for k in keys if k in entry), None)


def parse_boxes(path: epath.Path, text: str | None = None) -> dict[str, tuple[np.ndarray, str]]:
  """{id: (boxes [I, 4] float64 normalised, class)}; raises BadExample naming
  the file and the entry on anything else."""
  path = epath.Path(path)
  try:
    entries = json.loads(path.read_text() if text is None else text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadExample(path, 'bad_json', f'does not parse as JSON ({e})') from e
  if not isinstance(entries, list):
    raise BadExample(path, 'missing_field',
                     f'expected a JSON list of {{file, class, bbox}}, got {type(entries).__name__}')
  out = {}
  for n, entry in enumerate(entries):
    where = f'entry {n}'
    key = _first(entry, ID_KEYS) if isinstance(entry, dict) else None
    boxes = _first(entry, BOX_KEYS) if isinstance(entry, dict) else None
    if not isinstance(key, str) or boxes is None:
      raise BadExample(path, 'missing_field',
                       f'{where}: expected an object with {"/".join(ID_KEYS)} (a string) '
                       f'and {"/".join(BOX_KEYS)} (a list of [x0, y0, x1, y1])')
    key = classic._strip_suffix(key)  # pylint: disable=protected-access
    try:
      array = np.asarray(boxes, np.float64).reshape(-1, 4)
      if np.asarray(boxes, np.float64).ndim != 2 or not np.isfinite(array).all():
        raise ValueError
    except (TypeError, ValueError):
      raise BadExample(path, 'missing_field',
                       f'{where} ({key}): bbox must be a list of [x0, y0, x1, y1] numbers, '
                       f'got {boxes!r}', example_id=key) from None
    name = _first(entry, CLASS_KEYS)
    out[key] = (array, '' if name is None else str(name))
  return out
