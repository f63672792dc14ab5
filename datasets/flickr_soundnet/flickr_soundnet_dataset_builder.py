"""TFDS builder `flickr_soundnet`: the 250-pair Flickr-SoundNet localisation test set.

Reads images, audio and one box XML per image from `manual_dir` (see
README.md) and emits one `schema` record per pair, a still clip whose middle
frame is annotated with every annotator's box (one instance each) and
`gt_votes=2`: the consensus ground truth of LVS, EZ-VSL and SLAVC (pixels one
box covers weigh 0.5, two or more 1; `classic.py`). Splits:

  test              every id of `flickr_test.csv` (or every XML)
  test_plus_silent  `test` + SLAVC's non-sounding pairs of
                    `flickr_test_plus_silent.csv` (when present)
"""

from __future__ import annotations

from etils import epath
import tensorflow_datasets as tfds

from tavlo_datasets import classic
from tavlo_datasets.flickr_soundnet import annotations
from tavlo_datasets.robustness import BadExample, RobustBuilderMixin

TEST_LISTS = ('flickr_test.csv', 'metadata/flickr_test.csv', 'flickr_test.txt')
NEGATIVE_LISTS = ('flickr_test_plus_silent.csv', 'metadata/flickr_test_plus_silent.csv')


def collect_boxes(manual_dir: epath.Path, mask_size, skip_log) -> dict:
  """{id: (corners at mask_size, '')} of every parseable XML under manual_dir."""
  out = {}
  for key, paths in sorted(classic.index_by_stem(manual_dir, ('.xml',)).items()):
    try:
      if len(paths) > 1:
        raise BadExample(paths[1], 'duplicate_id',
                         f'id {key!r} is given by {len(paths)} files: ' + ', '.join(paths),
                         example_id=key)
      boxes = annotations.parse_xml(paths[0])
    except BadExample as e:
      e.example_id = key
      skip_log.handle(e)
      continue
    out[key] = (classic.box_corners_256(boxes, mask_size), '')
  return out


class Builder(RobustBuilderMixin, classic.ClassicBuilderMixin,
              tfds.core.GeneratorBasedBuilder):
  """Flickr-SoundNet: 250 image/audio pairs with boxes from several annotators."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      classic.ClassicConfig(name='default', description='still clips of 3 s at 8 fps, '
                            '224x224 frames and consensus boxes'),
  ]
  DEFAULT_CONFIG_NAME = 'default'
  GT_VOTES = 2
  HOMEPAGE = 'https://github.com/ardasnck/learning_to_localize_sound_source'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put in manual_dir (lists also under manual_dir/metadata/):
    **/<id>.jpg                   the images (frames/ in the peers' layout)
    **/<id>.wav                   the audio (audio/; .mp3 .flac .m4a too), or **/<id>.mp4
    **/<id>.xml                   one box file per image (Annotations/)
    flickr_test.csv               optional: test ids (first column); default every XML
    flickr_test_plus_silent.csv   optional: SLAVC's extended set (image,audio,label)
  """

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    skip_log = self.skip_log()
    boxes = collect_boxes(manual_dir, self.builder_config.mask_size, skip_log)
    listed = classic.first_existing(manual_dir, TEST_LISTS)
    if listed is None and not boxes:
      raise FileNotFoundError(
          f'{manual_dir}: no <id>.xml box files. Expected layout:\n'
          f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    ids = classic.read_id_list(listed) if listed else sorted(boxes)
    index = classic.MediaIndex(manual_dir)
    splits = {'test': classic.positive_samples(ids, boxes, index, listed or manual_dir,
                                               skip_log)}
    negatives = classic.first_existing(manual_dir, NEGATIVE_LISTS)
    if negatives is not None:
      splits['test_plus_silent'] = splits['test'] + classic.negative_samples(
          classic.read_negative_pairs(negatives), index, negatives, skip_log)
    return self.split_generators(splits)
