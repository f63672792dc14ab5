"""Ground truth of the single-frame benchmarks for `evaluate_maps`, as the peers build it.

  VGG-SS           --annotations=vggss.json (a file): boxes normalised to
                   [0, 1], union, at 224x224
  Flickr-SoundNet  --annotations=DIR holding <id>.xml (any depth): every
                   annotator's box in 256-px, weight min(count / 2, 1) at 224x224

Each frame's GT is kept as box counts (uint8, capped at `votes`) with its
`votes`, so the evaluator scores the weights (records.py `gt_votes`), never
a binarised mask. `negatives` (SLAVC's `*_test_plus_silent.csv`) adds the
non-sounding pairs as frames keyed `<image_id>+<audio_id>` with no GT,
tagged off-screen, so AP / max-F1 come out as SLAVC computes them.
The parsing and rasterising are the `vggss` / `flickr_soundnet` builders' own.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath
import numpy as np

from tavlo_datasets import classic
from tavlo_datasets.flickr_soundnet import annotations as flickr_annotations
from tavlo_datasets.vggss import annotations as vggss_annotations

SIZE = (224, 224)   # the peers' GT and scoring size


@dataclasses.dataclass
class ClassicFrame:
  key: str
  counts: np.ndarray      # uint8 [224, 224]: boxes covering each pixel, capped at votes
  votes: int              # weight = counts / votes
  negative: bool = False


def layout(path: str) -> str:
  """'vggss' (a .json file), 'flickr' (a folder with .xml files) or '' (other)."""
  if os.path.isfile(path) and path.lower().endswith('.json'):
    return 'vggss'
  if os.path.isdir(path) and classic.index_by_stem(epath.Path(path), ('.xml',)):
    return 'flickr'
  return ''


def _counts(corners, votes: int) -> np.ndarray:
  counts = np.zeros(SIZE, np.int64)
  for box in corners:
    counts += classic.box_mask(box, SIZE)
  return np.minimum(counts, votes).astype(np.uint8)


def load(path: str, negatives: str | None = None) -> list[ClassicFrame]:
  """The frames of a VGG-SS or Flickr-SoundNet annotation path (see `layout`).

  Raises ValueError (a `BadExample`, naming the file) on a file that does not
  parse, FileNotFoundError on a path of neither layout.
  """
  kind = layout(path)
  frames = []
  if kind == 'vggss':
    for key, (boxes, _) in sorted(vggss_annotations.parse_boxes(epath.Path(path)).items()):
      frames.append(ClassicFrame(key, _counts(classic.box_corners_normalized(boxes, SIZE), 1), 1))
  elif kind == 'flickr':
    found = classic.index_by_stem(epath.Path(path), ('.xml',))
    for key, paths in sorted(found.items()):
      if len(paths) > 1:
        raise ValueError(f'{paths[1]}: id {key!r} is given by {len(paths)} XML files: '
                         + ', '.join(paths))
      boxes = flickr_annotations.parse_xml(epath.Path(paths[0]))
      frames.append(ClassicFrame(key, _counts(classic.box_corners_256(boxes, SIZE), 2), 2))
  else:
    raise FileNotFoundError(f'--annotations: {path!r} is neither a VGG-SS box file (.json) '
                            'nor a folder of Flickr-SoundNet <id>.xml files')
  if negatives:
    votes = frames[0].votes if frames else 1
    for image_id, audio_id in classic.read_negative_pairs(epath.Path(negatives)):
      frames.append(ClassicFrame(f'{image_id}+{audio_id}', np.zeros(SIZE, np.uint8), votes,
                                 negative=True))
  return frames
