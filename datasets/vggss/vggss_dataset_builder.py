"""TFDS builder `vggss`: the VGG-SS localisation test set (Chen et al., CVPR 2021).

Reads a local VGGSound copy and the VGG-SS box file from `manual_dir` (see
README.md) and emits one `schema` record per test clip, its middle frame
annotated with the union of its boxes (`classic.py`). Splits:

  test              every id of `vggss_test.csv` (or of the box file)
  test_heard        ids of `vggss_heard_test.csv`   (when present)
  test_unheard      ids of `vggss_unheard_test.csv` (when present)
  test_plus_silent  `test` + SLAVC's non-sounding pairs of
                    `vggss_test_plus_silent.csv` (when present)
"""

from __future__ import annotations

from etils import epath
import tensorflow_datasets as tfds

from tavlo_datasets import classic
from tavlo_datasets.robustness import RobustBuilderMixin
from tavlo_datasets.vggss import annotations

BOX_FILES = ('vggss.json', 'metadata/vggss.json')
TEST_LISTS = {
    'test': ('vggss_test.csv', 'metadata/vggss_test.csv'),
    'test_heard': ('vggss_heard_test.csv', 'metadata/vggss_heard_test.csv'),
    'test_unheard': ('vggss_unheard_test.csv', 'metadata/vggss_unheard_test.csv'),
}
NEGATIVE_LISTS = ('vggss_test_plus_silent.csv', 'metadata/vggss_test_plus_silent.csv')


class Builder(RobustBuilderMixin, classic.ClassicBuilderMixin,
              tfds.core.GeneratorBasedBuilder):
  """VGG-SS: 5,158 VGGSound test clips with sounding-object boxes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      classic.ClassicConfig(name='default', description='8 fps, 224x224 frames and '
                            'boxes, middle frame scored'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  GT_VOTES = 1
  HOMEPAGE = 'https://www.robots.ox.ac.uk/~vgg/research/lvs/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put in manual_dir (lists and the box file also under manual_dir/metadata/):
    vggss.json                    the box file: [{file, class, bbox: [[x0,y0,x1,y1],..]}]
    **/<id>.mp4                   the VGGSound clips, any sub-folder, or
    frames/<id>.jpg + audio/<id>.wav   the peers' extracted middle frame and audio
    vggss_test.csv                optional: test ids (first column); default all boxes
    vggss_heard_test.csv, vggss_unheard_test.csv   optional subsets
    vggss_test_plus_silent.csv    optional: SLAVC's extended set (image,audio,label)
  """

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    box_file = classic.first_existing(manual_dir, BOX_FILES)
    if box_file is None:
      raise FileNotFoundError(
          f'{manual_dir}: no VGG-SS box file ({" or ".join(BOX_FILES)}). Expected '
          f'layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    boxes = annotations.parse_boxes(box_file)
    categories = tuple(sorted({name for _, name in boxes.values() if name}))
    self.info.metadata['categories'] = list(categories)
    corners = {key: (classic.box_corners_normalized(b, self.builder_config.mask_size), name)
               for key, (b, name) in boxes.items()}
    index = classic.MediaIndex(manual_dir)
    skip_log = self.skip_log()
    splits = {}
    for split, names in TEST_LISTS.items():
      listed = classic.first_existing(manual_dir, names)
      if listed is None and split != 'test':
        continue
      ids = classic.read_id_list(listed) if listed else sorted(boxes)
      splits[split] = classic.positive_samples(ids, corners, index, listed or box_file,
                                               skip_log, categories)
    negatives = classic.first_existing(manual_dir, NEGATIVE_LISTS)
    if negatives is not None:
      splits['test_plus_silent'] = splits['test'] + classic.negative_samples(
          classic.read_negative_pairs(negatives), index, negatives, skip_log)
    return self.split_generators(splits)
