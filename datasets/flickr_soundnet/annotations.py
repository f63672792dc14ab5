"""Flickr-SoundNet box files: one XML per image, `<bbox>` elements in 256x256 pixels.

Every annotator's box is one `<bbox>` element, anywhere in the tree. Its
coordinates are the children named `xmin, ymin, xmax, ymax` when they are
there; otherwise the peers' positional rule (LVS, EZ-VSL, SLAVC read the
children in order and skip the first one): the four children after the first.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from etils import epath
import numpy as np

from tavlo_datasets.robustness import BadExample

NAMED = ('xmin', 'ymin', 'xmax', 'ymax')


def _coordinates(bbox, path, n: int) -> list[float]:
  named = {child.tag.lower(): child.text for child in bbox}
  if all(k in named for k in NAMED):
    texts = [named[k] for k in NAMED]
  else:
    texts = [child.text for child in list(bbox)[1:5]]
  try:
    values = [float(t) for t in texts]
  except (TypeError, ValueError):
    values = []
  if len(values) != 4:
    raise BadExample(path, 'missing_field',
                     f'<bbox> number {n}: expected xmin, ymin, xmax, ymax numbers '
                     f'(named children, or the four after the first), got {texts!r}')
  return values


def parse_xml(path: epath.Path, text: bytes | None = None) -> np.ndarray:
  """Every `<bbox>` of one image: [I, 4] float64 [xmin, ymin, xmax, ymax]."""
  path = epath.Path(path)
  try:
    root = ET.fromstring(path.read_bytes() if text is None else text)
  except ET.ParseError as e:
    raise BadExample(path, 'bad_xml', f'does not parse as XML ({e})') from e
  boxes = [_coordinates(b, path, n) for n, b in enumerate(root.iter('bbox'))]
  if not boxes:
    raise BadExample(path, 'missing_field', 'no <bbox> element')
  return np.asarray(boxes, np.float64).reshape(-1, 4)
