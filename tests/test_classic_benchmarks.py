"""VGG-SS and Flickr-SoundNet: builders, weighted ground truth and classic scores.

Fixtures in the public layouts are written by `fixtures/classic_sets.py`;
expected ground truths and scores are computed by hand in the comments.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fixtures import classic_sets
from tavlo_datasets import classic, robustness
from tavlo_datasets.flickr_soundnet import Builder as FlickrBuilder
from tavlo_datasets.flickr_soundnet import annotations as flickr_annotations
from tavlo_datasets.robustness import BadExample
from tavlo_datasets.vggss import Builder as VggssBuilder
from tavlo_jax import config_lib, evaluate_maps, input_data
from tavlo_jax.data import pipeline
from tavlo_jax.evaluation import aggregates, classic_gt, evaluator as evaluator_lib, metrics
from tavlo_jax.evaluation import published, runner

SIZE = (224, 224)


def build(builder_cls, manual_dir, data_dir, policy='raise'):
  builder = builder_cls(data_dir=str(data_dir), config=classic.ClassicConfig(
      name='default', on_bad_example=policy))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
      file_format='array_record')
  return builder


def records(builder, split='test') -> dict:
  return {r['video_id'].decode(): r for r in builder.as_data_source(split=split)}


@pytest.fixture(scope='module')
def flickr(tmp_path_factory):
  manual = classic_sets.write_flickr(tmp_path_factory.mktemp('flickr'))
  return build(FlickrBuilder, manual, tmp_path_factory.mktemp('data')), manual


@pytest.fixture(scope='module')
def vggss(tmp_path_factory):
  manual = classic_sets.write_vggss(tmp_path_factory.mktemp('vggss'))
  return build(VggssBuilder, manual, tmp_path_factory.mktemp('data')), manual


def dominant_hz(wave, rate=16000):
  spectrum = np.abs(np.fft.rfft(wave))
  return np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()]


# ---- ground truth by hand -------------------------------------------------------

def flickr_a_weights() -> np.ndarray:
  """Annotator A covers [0:112, 0:112], B [56:168, 56:168] at 224 (int(224 v / 256))."""
  g = np.zeros(SIZE)
  g[0:112, 0:112] += 0.5
  g[56:168, 56:168] += 0.5
  return g   # 1 on the overlap [56:112, 56:112], 0.5 on the rest of A and B


def test_consensus_weights_by_hand_and_by_the_metric_module():
  boxes = np.asarray(classic_sets.FLICKR_BOXES['flickr_a'], np.float64)
  corners = classic.box_corners_256(boxes, SIZE)
  np.testing.assert_array_equal(corners, [[0, 0, 112, 112], [56, 56, 168, 168]])
  masks = np.stack([classic.box_mask(b, SIZE) for b in corners])
  weights = classic.weighted_gt(masks, 2)
  np.testing.assert_array_equal(weights, flickr_a_weights())
  np.testing.assert_array_equal(   # the evaluator's own formulation (jnp)
      np.asarray(metrics.consensus_map(boxes[None], np.ones((1, 2), bool))[0]), weights)


def test_vggss_corners_truncate_and_clip():
  corners = classic.box_corners_normalized([[0.25, 0.5, 0.75, 1.0], [0.5, 0.5, 1.2, 1.0]], SIZE)
  np.testing.assert_array_equal(corners, [[56, 112, 168, 224], [112, 112, 224, 224]])


def test_xml_positional_and_named_layouts_agree(tmp_path):
  boxes = classic_sets.FLICKR_BOXES['flickr_a']
  for named in (True, False):
    path = tmp_path / f'{named}.xml'
    path.write_text(classic_sets.bbox_xml(boxes, named))
    np.testing.assert_array_equal(flickr_annotations.parse_xml(path), boxes)


# ---- records ----------------------------------------------------------------------

def test_flickr_splits_and_records(flickr):
  builder, _ = flickr
  assert sorted(builder.info.splits) == ['test', 'test_plus_silent']
  test = records(builder)
  assert sorted(test) == sorted(classic_sets.FLICKR_BOXES)
  for i, (key, boxes) in enumerate(classic_sets.FLICKR_BOXES.items()):
    r = test[key]
    assert int(r['gt_votes']) == 2
    # A still clip: 3 s at 8 fps of the same image, the middle frame annotated.
    assert r['frames'].shape == (24, 224, 224, 3)
    assert abs(float(r['frames'].mean()) - classic_sets.grey(i)) < 3
    assert list(r['frames_annotated']['frame_index']) == [12]
    assert list(r['frames_annotated']['tags'][0]) == [True, False, False, False]
    assert r['waveform'].shape == (48000,)
    assert dominant_hz(r['waveform']) == pytest.approx(300 + 200 * i, abs=1)
    inst = r['instances']
    assert len(inst['mask']) == len(boxes) and np.asarray(inst['sounding']).all()
    weights = classic.weighted_gt(inst['mask'], 2)
    if key == 'flickr_a':
      np.testing.assert_array_equal(weights, flickr_a_weights())


def test_flickr_negative_pairs_image_with_another_audio(flickr):
  builder, _ = flickr
  extended = records(builder, 'test_plus_silent')
  assert sorted(extended) == sorted(list(classic_sets.FLICKR_BOXES) + ['flickr_a+flickr_c'])
  neg = extended['flickr_a+flickr_c']
  assert abs(float(neg['frames'].mean()) - classic_sets.grey(0)) < 3     # flickr_a's image
  assert dominant_hz(neg['waveform']) == pytest.approx(700, abs=1)       # flickr_c's audio
  assert list(neg['frames_annotated']['tags'][0]) == [False, False, False, True]
  assert len(neg['instances']['mask']) == 0


def test_vggss_records_score_the_middle_frame(vggss):
  builder, _ = vggss
  assert sorted(builder.info.splits) == ['test', 'test_heard', 'test_plus_silent']
  assert sorted(records(builder, 'test_heard')) == ['vid_a']
  assert builder.info.metadata['categories'] == ['dog barking', 'playing drums']
  r = records(builder)['vid_a']
  assert int(r['gt_votes']) == 1
  # 20 frames at 10 fps: duration 2 s, the middle (1.0 s) is source frame 10,
  # stored at 8 fps as frame 8 (t = 1.0 s).
  k = int(r['frames_annotated']['frame_index'][0])
  assert k == 8 and r['frame_times'][k] == pytest.approx(1.0)
  level = float(r['frames'][k].mean())
  assert abs(level - classic_sets.fixture.frame_value(10)) < 4
  expected = np.zeros(SIZE, np.uint8)
  expected[112:224, 56:168] = 1
  np.testing.assert_array_equal(r['instances']['mask'][0], expected)
  np.testing.assert_array_equal(r['instances']['box'][0], [56, 112, 112, 112])
  assert int(r['instances']['category'][0]) == 0


# ---- scores -----------------------------------------------------------------------

def left_half_map():
  """Top 50% of this map (>= rule) is exactly the left half, columns 0..111."""
  m = np.zeros(SIZE, np.float32)
  m[:, :112] = 1.0
  return m


# Flickr flickr_a, left half predicted: weighted intersection = A (7840: the
# overlap 3136 x 1 + the rest of A 9408 x 0.5) + B's left part below A (3136 x
# 0.5) = 9408; sum(g) = 12544; predicted pixels with g == 0: 25088 - 15680 =
# 9408 -> cIoU = 9408 / 21952 = 3/7. Binarised (g > 0): 15680 / 31360 = 0.5.
FLICKR_A_CIOU, FLICKR_A_BINARY_CIOU = 3 / 7, 0.5
# VGG-SS vid_a, GT rows 112:224 x cols 56:168: intersection 112 x 56 = 6272,
# |GT| = 12544, predicted outside 25088 - 6272 = 18816 -> 6272 / 31360 = 0.2.
VID_A_CIOU = 0.2


def eval_config():
  c = config_lib.base_config()
  c.input.num_frames = 8
  c.input.image_size = 32
  c.input.eval_batch_size = 4
  c.evals = {'all': {'split': 'test', 'frames': 'all', 'prefix': 'eval/x/'}}
  return c


def score_through_pipeline(builder, split):
  """Records -> eval batches -> Evaluator(classic) with left-half maps."""
  config = eval_config()
  src = builder.as_data_source(split=split)
  batches = pipeline.make_eval_batches(config, src)
  ev = evaluator_lib.Evaluator(config, protocol='classic', with_oracle=False)
  names = [src[i]['video_id'].decode() for i in range(len(src))]
  for batch in batches:
    b, t = batch['ann_valid'].shape
    heat = np.broadcast_to(left_half_map(), (b, t) + SIZE).copy()
    # Negatives get a flat map: a low SLAVC confidence.
    for row in range(b):
      if batch['valid'][row] and '+' in names[batch['clip_index'][row]]:
        heat[row] = -0.5
    ev.add(batch, heat)
  table = ev.records()
  return {names[c]: i for i, c in enumerate(table['clip_index'])}, table, ev.finalize()


def test_flickr_weights_survive_the_pipeline_and_evaluator(flickr):
  builder, _ = flickr
  row, table, results = score_through_pipeline(builder, 'test')
  ciou = table['ciou_top50_ge'][row['flickr_a']]
  assert ciou == pytest.approx(FLICKR_A_CIOU, abs=1e-6)
  assert ciou != pytest.approx(FLICKR_A_BINARY_CIOU)
  # The batches carry counts and votes (not a binarised mask).
  batch = next(iter(pipeline.make_eval_batches(eval_config(),
                                               builder.as_data_source(split='test'))))
  assert set(np.unique(batch['gt_mask'])) == {0, 1, 2}
  assert (batch['gt_votes'][batch['ann_valid']] == 2).all()
  pool = results['scenarios']['all']
  expected = [table['ciou_top50_ge'][row[k]] for k in classic_sets.FLICKR_BOXES]
  assert pool['success'] == pytest.approx(100 * np.mean(np.asarray(expected) >= 0.5))
  assert results['settings']['protocol'] == 'classic'


def test_vggss_score_and_extended_ap(vggss):
  builder, _ = vggss
  row, table, _ = score_through_pipeline(builder, 'test')
  assert table['ciou_top50_ge'][row['vid_a']] == pytest.approx(VID_A_CIOU, abs=1e-6)
  row, table, results = score_through_pipeline(builder, 'test_plus_silent')
  pool = results['scenarios']['all']
  assert (pool['num_onscreen'], pool['num_offscreen']) == (2, 1)
  positive = table['tags'][:, 0]
  expected_ap = 100 * aggregates.slavc_ap(positive, table['ciou_top50_ge'],
                                          table['confidence'])
  assert pool['ap'] == pytest.approx(expected_ap)
  # The negative's flat -0.5 map has confidence (cos + 1) / 2 = 0.25, below both positives.
  assert table['confidence'][row['vid_a+vid_b']] == pytest.approx(0.25)


def test_evaluate_maps_keeps_flickr_weights(flickr, tmp_path):
  _, manual = flickr
  frames = [evaluate_maps.from_classic(f) for f in classic_gt.load(
      str(manual / 'Annotations'), str(manual / 'flickr_test_plus_silent.csv'))]
  assert [f.frame_id for f in frames][-1] == 'flickr_a+flickr_c'
  maps = {f.frame_id: left_half_map() for f in frames}
  config = evaluate_maps.make_config((0.1,), 0.1, 'bilinear', 'no_pixel_above', classic_gt.SIZE)
  results, table, name = evaluate_maps.evaluate(frames, maps, config, protocol='classic',
                                                batch_frames=2)
  by_name = {name(c, f): i for i, (c, f) in enumerate(zip(table['clip_index'],
                                                           table['frame_index']))}
  assert table['ciou_top50_ge'][by_name['flickr_a/0']] == pytest.approx(FLICKR_A_CIOU, abs=1e-6)
  assert results['scenarios']['total']['num_offscreen'] == 1


@pytest.mark.slow
def test_evaluate_maps_cli_on_vggss_json(vggss, tmp_path):
  _, manual = vggss
  np.savez(tmp_path / 'maps.npz', **{k: left_half_map() for k in classic_sets.VGGSS_BOXES})
  out = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.evaluate_maps', f'--heatmaps={tmp_path / "maps.npz"}',
       f'--annotations={manual / "metadata" / "vggss.json"}', '--protocol=classic',
       f'--out={tmp_path / "out"}'], capture_output=True, text=True, check=True)
  assert 'cIoU top50>=0.5' in out.stdout
  frames = (tmp_path / 'out' / 'eval_frames.csv').read_text().splitlines()
  header = frames[0].split(',')
  row = next(r.split(',') for r in frames[1:] if r.startswith('vid_a/'))
  assert float(row[header.index('ciou_top50_ge')]) == pytest.approx(VID_A_CIOU, abs=1e-5)


# ---- bad input --------------------------------------------------------------------

def test_unparseable_xml_raises_naming_the_file(tmp_path):
  manual = classic_sets.write_flickr(tmp_path / 'raw', with_negatives=False)
  bad = manual / 'Annotations' / 'flickr_b.xml'
  bad.write_text('<annotation><bbox>')
  with pytest.raises(BadExample, match=r'flickr_b\.xml: bad_xml'):
    build(FlickrBuilder, manual, tmp_path / 'data')
  assert not (tmp_path / 'data' / 'flickr_soundnet' / 'default' / '1.0.0').exists()


def test_bad_files_are_skipped_and_counted(tmp_path):
  manual = classic_sets.write_flickr(tmp_path / 'raw', with_negatives=False)
  (manual / 'Annotations' / 'flickr_b.xml').write_text('<annotation><bbox>')
  (manual / 'audio' / 'flickr_c.wav').unlink()
  builder = build(FlickrBuilder, manual, tmp_path / 'data', policy='skip')
  assert sorted(records(builder)) == ['flickr_a']
  summary = robustness.read_summary(builder.data_dir)
  # flickr_b: its XML does not parse, so the listed id has no boxes either.
  assert summary['by_kind'] == {'bad_xml': 1, 'missing_field': 1, 'no_audio': 1}


def test_vggss_box_file_with_a_bad_entry_names_it(tmp_path):
  manual = classic_sets.write_vggss(tmp_path / 'raw')
  (manual / 'metadata' / 'vggss.json').write_text(json.dumps([{'file': 'vid_a', 'bbox': 'x'}]))
  with pytest.raises(BadExample, match=r'vggss\.json: missing_field: entry 0'):
    build(VggssBuilder, manual, tmp_path / 'data')


# ---- configs ----------------------------------------------------------------------

def test_paper_real_scores_each_benchmark_on_its_own_dataset():
  config = config_lib.load_config_file('configs/paper.py:real')
  groups = runner.eval_groups(config)
  assert groups[('vggss/default', 'test', 'classic', 'bicubic_torch')] == ['vggss']
  assert groups[('vggss/default', 'test_plus_silent', 'classic', 'bicubic_torch')] == ['vggss_extended']
  assert groups[('flickr_soundnet/default', 'test', 'classic', 'bicubic_torch')] == ['flickr']
  assert groups[('flickr_soundnet/default', 'test_plus_silent', 'classic', 'bicubic_torch')] == ['flickr_extended']
  assert 'total' in groups[('', '', 'avatar', 'bilinear')]
  assert config_lib.load_config_file('configs/paper.py:real+train144k').dataset.builder_config == '144k'
  assert config_lib.load_config_file('configs/paper.py:real+runlocal').dataset.builder_config == '10k'


def test_published_numbers_sit_beside_ours():
  lines = published.comparison_lines('vggss/default', 'test', {'success': 12.5, 'auc': 20.0})
  assert '| this run | 12.50 | 20.00 |' in lines
  assert '| EZ-VSL + OGL [VGGSound-144k] | 38.85 | 39.54 |' in lines
  lines = published.comparison_lines('flickr_soundnet/default', 'test_plus_silent',
                                     {'ap': 1.0, 'max_f1': 2.0})
  assert '| SLAVC [VGGSound-144k] | 51.63 | 59.10 |' in lines
  assert published.comparison_lines('avatar/default', 'test', {}) == []


def test_an_unbuilt_benchmark_is_skipped_with_its_build_command(tmp_path):
  config = config_lib.load_config_file('configs/paper.py:real')
  with config.unlocked():
    config.dataset.data_dir = str(tmp_path)
  data, why = input_data.eval_only_data(config, 'vggss/default')
  assert data is None
  assert 'not built' in why and 'python -m tavlo_datasets.build vggss --config=default' in why


def test_an_unbuilt_benchmark_is_logged_once_per_run(tmp_path, caplog, capsys):
  """Skipping an unbuilt test set is logged at the first evaluation of a run,
  not at every intermediate one; the final evaluation says it again."""
  config = config_lib.load_config_file('configs/paper.py:real')
  with config.unlocked():
    config.dataset.data_dir = str(tmp_path / 'tfds')
    config.evals = {'vggss': config.evals.vggss}
  def evaluate(final):
    return runner.evaluate(config, tmp_path / 'run', None, None, None, None, None,
                           step=1, final=final)
  with caplog.at_level('WARNING'):
    assert evaluate(False) is None and evaluate(False) is None and evaluate(True) is None
  skips = [r for r in caplog.records if 'Skipping config.evals vggss' in r.getMessage()]
  assert len(skips) == 1 and 'not built' in skips[0].getMessage()
  assert capsys.readouterr().out.count('Skipped config.evals vggss') == 1


@pytest.mark.slow
def test_paper_real_runlocal_prints_the_three_tables(tmp_path):
  """Builds all four datasets from fixtures, trains 4 steps, evaluates."""
  import fixtures.avatar_release as avatar_fixture  # pylint: disable=import-outside-toplevel
  from tavlo_datasets.avatar import Builder as AvatarBuilder  # pylint: disable=import-outside-toplevel
  from tavlo_datasets.vggsound import Builder as VggsoundBuilder  # pylint: disable=import-outside-toplevel
  raw, data = tmp_path / 'raw', tmp_path / 'tfds'
  avatar_fixture.write_release(raw / 'avatar')
  clips = [avatar_fixture.FixtureVideo(f'train_{i}', num_frames=24, tone_hz=300 + 50 * i)
           for i in range(4)]
  for clip in clips:
    avatar_fixture.write_video(raw / 'vggsound' / f'{clip.video_id}.mp4', clip)
  (raw / 'vggsound' / 'vggsound_10k.txt').write_text('\n'.join(c.video_id for c in clips))
  classic_sets.write_vggss(raw / 'vggss')
  classic_sets.write_flickr(raw / 'flickr')
  for cls, folder, name in ((AvatarBuilder, 'avatar', 'default'),
                            (VggsoundBuilder, 'vggsound', '10k'),
                            (VggssBuilder, 'vggss', 'default'),
                            (FlickrBuilder, 'flickr', 'default')):
    cls(config=name, data_dir=str(data)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(raw / folder)),
        file_format='array_record')
  out = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.main', '--config=configs/paper.py:real+runlocal',
       f'--workdir={tmp_path / "run"}', f'--config.dataset.data_dir={data}'],
      # One CPU device, as a user's laptop has (conftest sets 8 for this process).
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
      capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  print(out.stdout)   # the tables, with `pytest -s`
  for heading in ('flickr_soundnet/default test,', 'flickr_soundnet/default test_plus_silent,',
                  'vggss/default test,', 'vggss/default test_plus_silent,'):
    assert heading in out.stdout
  assert out.stdout.count('protocol=classic') == 4 and 'protocol=avatar' in out.stdout
  assert '| EZ-VSL + OGL [VGGSound-144k] | 83.94 | 63.60 |' in out.stdout
  assert '| SLAVC [VGGSound-144k] | 32.95 | 40.00 |' in out.stdout
  results = json.loads((tmp_path / 'run' / 'eval' / 'step_4' / 'vggss_test_plus_silent' /
                        'eval.json').read_text())
  pool = results['scenarios']['vggss_extended']
  assert (pool['num_onscreen'], pool['num_offscreen']) == (2, 1)


def torch_bicubic_reference(x: np.ndarray, size) -> np.ndarray:
  """torch's bicubic, align_corners=True, one output pixel at a time (float64)."""
  a = -0.75
  def kernel(d):
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0
  (h, w), (oh, ow) = x.shape, size
  out = np.zeros(size)
  for i in range(oh):
    for j in range(ow):
      ry, rx = i * (h - 1) / (oh - 1), j * (w - 1) / (ow - 1)
      y0, x0 = int(np.floor(ry)), int(np.floor(rx))
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          yy, xx = min(max(y0 + dy, 0), h - 1), min(max(x0 + dx, 0), w - 1)
          out[i, j] += kernel(ry - (y0 + dy)) * kernel(rx - (x0 + dx)) * x[yy, xx]
  return out


def test_bicubic_torch_upsampling_matches_the_formula():
  x = np.random.default_rng(0).normal(size=(4, 5))
  up = np.asarray(metrics.upsample(x[None], (9, 13), 'bicubic_torch')[0])
  np.testing.assert_allclose(up, torch_bicubic_reference(x, (9, 13)), atol=1e-5)
  # align_corners: the corner pixels are the input's corners; a flat map stays flat.
  np.testing.assert_allclose(up[[0, 0, -1, -1], [0, -1, 0, -1]],
                             x[[0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-6)
  flat = np.asarray(metrics.upsample(np.full((1, 7, 7), 0.3), (224, 224), 'bicubic_torch'))
  np.testing.assert_allclose(flat, 0.3, atol=1e-6)
