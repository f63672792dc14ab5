"""The `avatar` TFDS builder, built from a fixture release the tests write."""

import json

from matplotlib.path import Path as MplPath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fixtures import avatar_release as fixture
from tavlo_datasets import clip_storage
from tavlo_datasets import media
from tavlo_datasets import robustness
from tavlo_datasets import schema
from tavlo_datasets.avatar import AvatarConfig, Builder
from tavlo_datasets.avatar import annotations as ann_lib
from tavlo_datasets.robustness import BadExample

FPS = 8.0
SHORT_SIDE = 24
FRAME_SIZE = (24, 32)     # the fixture's 64x48 mp4s at short side 24
MASK_SIZE = (36, 64)


def make_builder(data_dir, policy='raise', name='test') -> Builder:
  return Builder(config=AvatarConfig(name=name, fps=FPS,
                                     frame_short_side=SHORT_SIDE,
                                     mask_size=MASK_SIZE,
                                     on_bad_example=policy),
                 data_dir=str(data_dir))


def build(manual_dir, data_dir, policy='raise', **download_kwargs) -> Builder:
  builder = make_builder(data_dir, policy)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual_dir), **download_kwargs),
      file_format='array_record')
  return builder


def records_by_id(builder) -> dict:
  source = builder.as_data_source(split='test')
  return {r['video_id'].decode(): r for r in source}


def assert_same_records(a: dict, b: dict):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], dict):
      assert_same_records(a[key], b[key])
    else:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]),
                                    err_msg=key)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  return fixture.write_release(tmp_path_factory.mktemp('release'))


@pytest.fixture(scope='module')
def built(release, tmp_path_factory):
  return build(release, tmp_path_factory.mktemp('data'))


# ---- every field against what the fixture wrote ---------------------------


def test_one_record_per_video_in_the_test_split(built):
  assert list(built.info.splits) == ['test']
  assert sorted(records_by_id(built)) == ['vid_a', 'vid_b']


def test_categories_are_collected_sorted(built):
  assert built.info.metadata['categories'] == [
      'dog barking', 'man speaking', 'playing drums', 'playing piano']


@pytest.mark.parametrize('video', fixture.default_videos(),
                         ids=lambda v: v.video_id)
def test_clip_fields(built, video):
  record = records_by_id(built)[video.video_id]
  num_out = int(np.ceil(video.duration * FPS - 1e-9))
  frames = clip_storage.gather_frames(record, np.arange(num_out))
  assert clip_storage.num_frames(record) == num_out
  assert frames.shape == (num_out, *FRAME_SIZE, 3)
  # Each stored frame is the source frame nearest to k / FPS, except that
  # the slot nearest to an annotated frame shows that frame (float64 ref).
  source_times = np.arange(video.num_frames) / video.fps
  targets = np.arange(num_out) / FPS
  for frame in sorted(video.annotations):
    targets[int(np.floor(frame / video.fps * FPS + 0.5))] = frame / video.fps
  expected = np.argmin(np.round(np.abs(targets[:, None] - source_times), 9),
                       1)
  levels = np.asarray([fixture.frame_value(i) for i in
                       range(video.num_frames)])
  means = frames.reshape(num_out, -1).mean(1)
  np.testing.assert_array_equal(
      np.abs(means[:, None] - levels).argmin(1), expected)
  np.testing.assert_allclose(record['frame_times'], source_times[expected],
                             atol=1e-5)
  # Audio: 16 kHz mono, trimmed to the stream's length, the written tone.
  assert int(record['sample_rate']) == 16000 and float(record['fps']) == FPS
  wave = clip_storage.waveform(record)
  assert wave.shape == (int(round(video.duration * 16000)),)
  t = np.arange(len(wave)) / 16000
  reference = 0.3 * np.sin(2 * np.pi * video.tone_hz * t)
  assert np.corrcoef(wave[800:-800], reference[800:-800])[0, 1] > 0.98
  # Original size comes from the JSON (vid_a's is 10x its mp4).
  first = next(iter(video.annotations.values()))
  assert int(record['original_width']) == first['original_width']
  assert int(record['original_height']) == first['original_height']


def expected_tags(content: dict) -> np.ndarray:
  return schema.tags_to_multihot([item['task']
                                  for item in content['annotations']])


@pytest.mark.parametrize('video', fixture.default_videos(),
                         ids=lambda v: v.video_id)
def test_annotated_frames(built, video):
  record = records_by_id(built)[video.video_id]
  annotated = record['frames_annotated']
  frames = sorted(video.annotations)
  assert [f.decode() for f in annotated['frame_id']] == [
      f'{video.video_id}/{f}' for f in frames]
  times = np.asarray(frames) / video.fps
  np.testing.assert_allclose(annotated['time'], times, rtol=1e-6)
  # The stored frame at frame_index is the annotated source frame itself, in
  # the slot nearest to its time.
  index = annotated['frame_index']
  np.testing.assert_array_equal(index, np.floor(times * FPS + 0.5))
  np.testing.assert_allclose(record['frame_times'][index], times, atol=1e-5)
  levels = [fixture.frame_value(f) for f in frames]
  np.testing.assert_allclose(
      clip_storage.gather_frames(record, index).mean((1, 2, 3)), levels,
      atol=3)
  for tags, frame in zip(annotated['tags'], frames):
    np.testing.assert_array_equal(tags,
                                  expected_tags(video.annotations[frame]))
  assert not np.any(annotated['cross_event'])


def distance_to_edges(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
  """float64 distance from each point to the polygon's outline."""
  a = polygon
  b = np.roll(polygon, -1, axis=0)
  ab = b - a
  ap = points[:, None, :] - a[None]
  t = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
  closest = a[None] + t[..., None] * ab[None]
  return np.linalg.norm(points[:, None] - closest, axis=-1).min(1)


def reference_mask(polygons, original_wh):
  """float64 point-in-polygon at pixel centres + the 1-pixel outline band.

  Mask pixel c has its centre at (c + 0.5) / scale - 0.5 in the polygons'
  coordinates (integer coordinates are pixel centres, as in cv2 and PIL).
  """
  mh, mw = MASK_SIZE
  scale = np.asarray([mw / original_wh[0], mh / original_wh[1]])
  rows, cols = np.mgrid[0:mh, 0:mw]
  centres = np.stack([cols.ravel(), rows.ravel()], -1).astype(np.float64)
  inside = np.zeros(mh * mw, bool)
  near_edge = np.zeros(mh * mw, bool)
  for polygon in polygons:
    xy = (np.reshape(polygon, (-1, 2)) + 0.5) * scale - 0.5
    inside |= MplPath(xy).contains_points(centres)
    near_edge |= distance_to_edges(centres, xy) <= 1.0
  return inside.reshape(mh, mw), near_edge.reshape(mh, mw)


@pytest.mark.parametrize('video', fixture.default_videos(),
                         ids=lambda v: v.video_id)
def test_instances_masks_boxes_categories(built, video):
  record = records_by_id(built)[video.video_id]
  instances = record['instances']
  categories = built.info.metadata['categories']
  expected = []   # (annotation index, json instance) of every visible one
  for index, frame in enumerate(sorted(video.annotations)):
    content = video.annotations[frame]
    for item in content['annotations']:
      if 'segmentation' in item:
        expected.append((index, item, content))
  visible = np.asarray(instances['mask']).reshape(
      len(instances['mask']), -1).any(1)
  instances = {k: [v for v, keep in zip(values, visible) if keep]
               for k, values in instances.items()}
  assert len(instances['mask']) == len(expected)
  mh, mw = MASK_SIZE
  for i, (index, item, content) in enumerate(expected):
    original = (content['original_width'], content['original_height'])
    assert instances['annotation_index'][i] == index
    assert instances['category_name'][i].decode() == item[
        'audio_visual_category']
    assert instances['category'][i] == categories.index(
        item['audio_visual_category'])
    assert instances['sounding'][i]
    assert instances['instance_id'][i] == -1
    mask = instances['mask'][i]
    assert mask.shape == MASK_SIZE and set(np.unique(mask)) <= {0, 1}
    inside, near_edge = reference_mask(item['segmentation'], original)
    assert mask.sum() > 0
    assert not np.any(((mask == 1) != inside) & ~near_edge), (
        'mask differs from the polygons away from their outline')
    # Box: scaled to mask pixels and clipped to the frame (float64 ref).
    x, y, w, h = item['bbox']
    sx, sy = mw / original[0], mh / original[1]
    x0, x1 = np.clip([x * sx, (x + w) * sx], 0, mw)
    y0, y1 = np.clip([y * sy, (y + h) * sy], 0, mh)
    np.testing.assert_allclose(instances['box'][i],
                               [x0, y0, x1 - x0, y1 - y0], atol=1e-4)


def test_partly_outside_polygon_is_clipped(built):
  record = records_by_id(built)['vid_a']
  piano = [i for i, name in enumerate(record['instances']['category_name'])
           if name == b'playing piano']
  (i,) = piano
  mask = record['instances']['mask'][i]
  # x from 500 of 640 -> 500.5 * 0.1 - 0.5 = 49.55 -> from column 49 (PIL
  # fills floor(x0')..floor(x1')), to the frame's edge; y from 300 of 480 ->
  # 300.5 * 0.075 - 0.5 = 22.04 -> from row 22.
  cols = np.nonzero(mask.any(0))[0]
  rows = np.nonzero(mask.any(1))[0]
  assert cols.min() == 49 and cols.max() == MASK_SIZE[1] - 1
  assert rows.min() == 22 and rows.max() == MASK_SIZE[0] - 1
  box = record['instances']['box'][i]
  np.testing.assert_allclose(box, [50, 22.5, 14, 13.5])


def test_polygon_through_boundary_pixel_centres_fills_back_to_the_mask():
  # A mask, and its outline traced through its boundary pixels' centres (as
  # cv2.findContours gives it), at the mask's own resolution.
  mask = np.zeros(MASK_SIZE, np.uint8)
  mask[5:12, 3:20] = 1                    # rows 5..11, cols 3..19
  mask[12:20, 3:9] = 1                    # an L shape: rows 12..19, cols 3..8
  outline = [3, 5, 19, 5, 19, 11, 8, 11, 8, 19, 3, 19]
  size = (MASK_SIZE[1], MASK_SIZE[0])
  np.testing.assert_array_equal(
      ann_lib.rasterize([outline], size, MASK_SIZE), mask)
  # Twice the resolution in the JSON: the same pixels come back.
  doubled = list(np.asarray(outline, float) * 2 + 0.5)
  np.testing.assert_array_equal(
      ann_lib.rasterize([doubled], (size[0] * 2, size[1] * 2), MASK_SIZE),
      mask)


def test_offscreen_frame_has_the_tag_and_keeps_what_is_heard(built):
  record = records_by_id(built)['vid_b']
  annotated = record['frames_annotated']
  (offscreen,) = [i for i, f in enumerate(annotated['frame_id'])
                  if f == b'vid_b/20']
  np.testing.assert_array_equal(annotated['tags'][offscreen],
                                [False, False, False, True])
  instances = record['instances']
  # One instance for the named off-screen source, none for the unnamed one.
  (i,) = np.flatnonzero(np.asarray(instances['annotation_index']) == offscreen)
  assert instances['category_name'][i] == b'man speaking'
  assert instances['category'][i] == built.info.metadata['categories'].index(
      'man speaking')
  assert not instances['sounding'][i]
  assert not instances['mask'][i].any()
  np.testing.assert_array_equal(instances['box'][i], [0, 0, 0, 0])


def test_offscreen_instance_changes_no_ground_truth(built):
  # The kept category is in no pixel and sounds nowhere in view.
  from tavlo_jax.data import sampling  # pylint: disable=g-import-not-at-top
  record = records_by_id(built)['vid_b']
  (frame,) = [int(f) for f, i in zip(record['frames_annotated']['frame_index'],
                                     record['frames_annotated']['frame_id'])
              if i == b'vid_b/20']
  out = sampling.window_annotations(record, np.asarray([frame]), [frame],
                                    MASK_SIZE, 4)
  assert out['ann_valid'][0] and not out['gt_mask'].any()
  assert not out['any_mask'].any() and out['category'][0] == -1


def test_zipped_release_gives_the_same_records(built, tmp_path):
  zipped = fixture.write_release(tmp_path / 'release', zipped=True)
  assert not (zipped / 'video').exists()
  other = build(zipped, tmp_path / 'data')
  a, b = records_by_id(built), records_by_id(other)
  assert a.keys() == b.keys()
  for key in a:
    assert_same_records(a[key], b[key])


def test_clean_build_writes_an_empty_summary(built):
  summary = robustness.read_summary(built.data_dir)
  assert summary['num_skipped'] == 0 and summary['skipped'] == []


def test_named_configs():
  names = {c.name: c for c in Builder.BUILDER_CONFIGS}
  assert names['default'].mask_size == (360, 640)
  assert names['default'].on_bad_example == 'raise'
  with pytest.raises(ValueError, match='on_bad_example'):
    AvatarConfig(name='x', on_bad_example='ignore')


def test_a_named_config_can_switch_only_the_policy(tmp_path):
  # What `--config '{"name": "default", "on_bad_example": "skip"}'` makes.
  builder = Builder(config=AvatarConfig(name='default', on_bad_example='skip'),
                    data_dir=str(tmp_path))
  assert builder.builder_config.on_bad_example == 'skip'
  assert builder.builder_config.frame_short_side == 256
  assert builder.builder_config.frame_codec == 'h264'
  assert builder.data_path.parent.name == 'default'
  with pytest.raises(ValueError, match='Cannot name a custom BuilderConfig'):
    Builder(config=AvatarConfig(name='default', frame_short_side=32),
            data_dir=str(tmp_path))


# ---- bad inputs: one per kind, raise and skip ------------------------------


def _good_video():
  video = fixture.FixtureVideo('good', fps=10.0, num_frames=10)
  video.annotations = {2: fixture.frame_json(64, 48, [fixture.instance(
      [fixture.rect(4, 4, 30, 30)], 'dog barking', 'single')])}
  return video


def _bad_video(**kwargs):
  video = fixture.FixtureVideo('bad', fps=10.0, num_frames=10, **kwargs)
  video.annotations = {3: fixture.frame_json(64, 48, [fixture.instance(
      [fixture.rect(10, 10, 40, 40)], 'playing piano', 'single')])}
  return video


def _corrupt(root):
  (root / 'video' / 'bad.mp4').write_bytes(
      np.random.default_rng(0).bytes(4000))


def _truncate(root):
  path = root / 'video' / 'bad.mp4'
  frames = np.random.default_rng(0).integers(0, 255, (10, 48, 64, 3),
                                             dtype=np.uint8)
  media.write_mp4(path, frames, 10.0, _bad_video().waveform(),
                          faststart=True)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) * 2 // 3])


def _no_audio(root):
  fixture.write_video(root / 'video' / 'bad.mp4', _bad_video(audio_rate=None))


def _unparseable(root):
  (root / 'metadata' / 'bad' / '3.json').write_text('{"original_width": 64,')


def _lacks_field(root):
  path = root / 'metadata' / 'bad' / '3.json'
  content = json.loads(path.read_text())
  del content['original_height']
  path.write_text(json.dumps(content))


def _polygon_outside(root):
  path = root / 'metadata' / 'bad' / '3.json'
  content = json.loads(path.read_text())
  content['annotations'][0]['segmentation'] = [fixture.rect(70, 10, 90, 30)]
  path.write_text(json.dumps(content))


def _frame_outside(root):
  (root / 'metadata' / 'bad' / '3.json').rename(
      root / 'metadata' / 'bad' / '10.json')   # 10 frames: 0..9


def _video_missing(root):
  (root / 'video' / 'bad.mp4').unlink()


def _duplicate(root):
  (root / 'video' / 'copy').mkdir()
  fixture.write_video(root / 'video' / 'copy' / 'bad.mp4', _bad_video())


BAD_INPUTS = {
    # name: (how to break the release, kind, the file the error names)
    'corrupt_mp4': (_corrupt, 'corrupt_video', 'bad.mp4'),
    'truncated_mp4': (_truncate, 'corrupt_video', 'bad.mp4'),
    'no_audio_stream': (_no_audio, 'no_audio', 'bad.mp4'),
    'json_does_not_parse': (_unparseable, 'bad_json', '3.json'),
    'json_lacks_a_field': (_lacks_field, 'missing_field', '3.json'),
    'polygon_outside': (_polygon_outside, 'polygon_outside', '3.json'),
    'frame_past_the_end': (_frame_outside, 'frame_outside', '10.json'),
    'video_missing': (_video_missing, 'missing_video', 'bad'),
    'duplicate_id': (_duplicate, 'duplicate_id', 'bad.mp4'),
}


def bad_release(root, name):
  fixture.write_release(root, [_good_video(), _bad_video()])
  BAD_INPUTS[name][0](root)
  return root


@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_input_raises_and_leaves_no_dataset(tmp_path, name):
  _, kind, file_name = BAD_INPUTS[name]
  manual = bad_release(tmp_path / 'release', name)
  builder = make_builder(tmp_path / 'data')
  with pytest.raises(BadExample, match=rf'{file_name}: {kind}: ') as error:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
        file_format='array_record')
  assert error.value.kind == kind
  # TFDS built into a temporary dir and removed it: nothing to pick up.
  assert not builder.is_prepared()
  assert not make_builder(tmp_path / 'data').is_prepared()
  leftovers = [p for p in (tmp_path / 'data').rglob('*')
               if 'incomplete' in p.name or p.name.endswith('.array_record')
               or p.name == 'dataset_info.json']
  assert not leftovers


@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_input_is_skipped_and_counted(tmp_path, name):
  _, kind, file_name = BAD_INPUTS[name]
  manual = bad_release(tmp_path / 'release', name)
  builder = build(manual, tmp_path / 'data', policy='skip')
  records = records_by_id(builder)
  assert sorted(records) == ['good']
  assert len(records['good']['instances']['mask']) == 1
  summary = json.loads(
      (tmp_path / 'data' / 'avatar' / 'test' / str(Builder.VERSION) /
       robustness.SUMMARY_FILE).read_text())
  assert summary['on_bad_example'] == 'skip'
  assert summary['num_skipped'] == 1 and summary['by_kind'] == {kind: 1}
  (skipped,) = summary['skipped']
  assert skipped['id'] == 'bad' and skipped['kind'] == kind
  assert file_name in skipped['file']
  assert not list((tmp_path / 'data').rglob('bad_examples.parts'))


# ---- Apache Beam ------------------------------------------------------------


@pytest.mark.slow   # ~1 min: starts Beam worker processes
def test_beam_build_gives_the_same_records(built, release, tmp_path):
  beam = pytest.importorskip(
      'apache_beam', reason='apache-beam is an optional extra (pip install '
      'apache-beam); CI installs it')
  options = beam.options.pipeline_options.PipelineOptions([
      '--runner=DirectRunner', '--direct_num_workers=2',
      '--direct_running_mode=multi_processing'])
  beam_built = build(release, tmp_path / 'beam', beam_options=options)
  a, b = records_by_id(built), records_by_id(beam_built)
  assert a.keys() == b.keys()
  for key in a:
    assert_same_records(a[key], b[key])
  assert beam_built.info.metadata['categories'] == built.info.metadata[
      'categories']

  # Skips found in the workers reach the summary too.
  manual = bad_release(tmp_path / 'bad', 'corrupt_mp4')
  skipped = build(manual, tmp_path / 'beam_skip', policy='skip',
                  beam_options=options)
  assert sorted(records_by_id(skipped)) == ['good']
  assert robustness.read_summary(skipped.data_dir)['by_kind'] == {
      'corrupt_video': 1}
