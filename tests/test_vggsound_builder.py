"""The `vggsound` TFDS builder, built from fixture clips the tests write."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fixtures import avatar_release as fixture
from tavlo_datasets import clip_storage
from tavlo_datasets import robustness
from tavlo_datasets.robustness import BadExample
from tavlo_datasets.vggsound import Builder, VggsoundConfig

FPS = 5.0
SHORT_SIDE = 16
MASK_SIZE = (9, 16)

CLIPS = [
    fixture.FixtureVideo('clip_a', fps=10.0, num_frames=12, tone_hz=300.0),
    fixture.FixtureVideo('clip_b', fps=12.5, num_frames=15, size=(32, 48),
                         audio_rate=22050, tone_hz=700.0),
    fixture.FixtureVideo('clip_c', fps=10.0, num_frames=8),   # not listed
]


def make_builder(data_dir, policy='raise', ids_file='ids.txt') -> Builder:
  return Builder(
      config=VggsoundConfig(name='test', ids_file=ids_file, fps=FPS,
                            frame_short_side=SHORT_SIDE, mask_size=MASK_SIZE,
                            on_bad_example=policy),
      data_dir=str(data_dir))


def build(manual_dir, data_dir, **kwargs) -> Builder:
  builder = make_builder(data_dir, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
      file_format='array_record')
  return builder


def records_by_id(builder) -> dict:
  return {r['video_id'].decode(): r
          for r in builder.as_data_source(split='train')}


def write_copy(root, ids=('clip_a', 'clip_b')):
  """mp4s named by id in sub-folders, and an id list (with noise lines)."""
  for i, clip in enumerate(CLIPS):
    fixture.write_video(root / f'part{i % 2}' / f'{clip.video_id}.mp4', clip)
  (root / 'ids.txt').write_text(
      '# training ids\n' + '\n'.join(f'{i}.mp4' if n else i
                                     for n, i in enumerate(ids)) + '\n\n')
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  manual = write_copy(tmp_path_factory.mktemp('vggsound'))
  return build(manual, tmp_path_factory.mktemp('data'))


def test_only_listed_clips_in_the_train_split(built):
  assert list(built.info.splits) == ['train']
  assert sorted(records_by_id(built)) == ['clip_a', 'clip_b']


@pytest.mark.parametrize('clip', CLIPS[:2], ids=lambda c: c.video_id)
def test_clip_fields(built, clip):
  record = records_by_id(built)[clip.video_id]
  num_out = int(np.ceil(clip.duration * FPS - 1e-9))
  frames = clip_storage.gather_frames(record, np.arange(num_out))
  # Short side 16, the aspect of the source kept (rounded to even).
  h, w = clip.size
  assert frames.shape == (num_out, 16, 2 * round(w * 8 / h), 3)
  source_times = np.arange(clip.num_frames) / clip.fps
  grid = np.arange(num_out) / FPS
  expected = np.argmin(np.round(np.abs(grid[:, None] - source_times), 9), 1)
  levels = np.asarray([fixture.frame_value(i)
                       for i in range(clip.num_frames)])
  means = frames.reshape(num_out, -1).mean(1)
  np.testing.assert_array_equal(np.abs(means[:, None] - levels).argmin(1),
                                expected)
  np.testing.assert_allclose(record['frame_times'], source_times[expected],
                             atol=1e-5)
  assert int(record['sample_rate']) == 16000 and float(record['fps']) == FPS
  wave = clip_storage.waveform(record)
  assert wave.shape == (int(round(clip.duration * 16000)),)
  t = np.arange(len(wave)) / 16000
  reference = 0.3 * np.sin(2 * np.pi * clip.tone_hz * t)
  assert np.corrcoef(wave[800:-800], reference[800:-800])[0, 1] > 0.98
  assert (int(record['original_width']), int(record['original_height'])) == (
      w, h)
  # Same schema as avatar, with nothing annotated.
  assert len(record['frames_annotated']['frame_id']) == 0
  assert len(record['instances']['mask']) == 0


def test_csv_of_paths_gives_the_same_records(built, tmp_path):
  manual = tmp_path / 'copy'
  elsewhere = tmp_path / 'elsewhere'
  for clip in CLIPS:
    fixture.write_video(elsewhere / f'{clip.video_id}_x.mp4', clip)
  manual.mkdir()
  rows = ['id,path'] + [f'{c.video_id},{elsewhere}/{c.video_id}_x.mp4'
                        for c in CLIPS]
  (manual / 'videos.csv').write_text('\n'.join(rows) + '\n')
  (manual / 'ids.txt').write_text('clip_a\nclip_b\nclip_a\n')  # dup: one clip
  other = build(manual, tmp_path / 'data')
  a, b = records_by_id(built), records_by_id(other)
  assert sorted(b) == sorted(a)
  for key in a:
    for field in ('frames_h264', 'segment_offsets', 'waveform_pcm16'):
      np.testing.assert_array_equal(a[key][field], b[key][field])


def test_empty_ids_file_means_every_clip(tmp_path):
  manual = write_copy(tmp_path / 'copy')
  builder = build(manual, tmp_path / 'data', ids_file='')
  assert sorted(records_by_id(builder)) == ['clip_a', 'clip_b', 'clip_c']


def test_named_configs():
  names = {c.name: c for c in Builder.BUILDER_CONFIGS}
  assert names['10k'].ids_file == 'vggsound_10k.txt'
  assert names['144k'].ids_file == 'vggsound_144k.txt'


def test_missing_ids_file_is_a_clear_error(tmp_path):
  manual = write_copy(tmp_path / 'copy')
  (manual / 'ids.txt').unlink()
  with pytest.raises(FileNotFoundError, match='ids.txt'):
    build(manual, tmp_path / 'data')


# ---- bad inputs: one per kind that applies to clips, raise and skip ---------


def _corrupt(root):
  (root / 'part1' / 'clip_b.mp4').write_bytes(
      np.random.default_rng(0).bytes(4000))


def _no_audio(root):
  fixture.write_video(root / 'part1' / 'clip_b.mp4', fixture.FixtureVideo(
      'clip_b', audio_rate=None))


def _missing(root):
  (root / 'part1' / 'clip_b.mp4').unlink()


def _duplicate(root):
  fixture.write_video(root / 'part0' / 'clip_b.mp4', CLIPS[1])


BAD_INPUTS = {
    'corrupt_mp4': (_corrupt, 'corrupt_video', 'clip_b.mp4'),
    'no_audio_stream': (_no_audio, 'no_audio', 'clip_b.mp4'),
    'video_missing': (_missing, 'missing_video', 'ids.txt'),
    'duplicate_id': (_duplicate, 'duplicate_id', 'clip_b.mp4'),
}


@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_input_raises_and_leaves_no_dataset(tmp_path, name):
  breaker, kind, file_name = BAD_INPUTS[name]
  manual = write_copy(tmp_path / 'copy')
  breaker(manual)
  builder = make_builder(tmp_path / 'data')
  with pytest.raises(BadExample, match=rf'{file_name}: {kind}: '):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
        file_format='array_record')
  assert not builder.is_prepared()
  assert not make_builder(tmp_path / 'data').is_prepared()
  assert not [p for p in (tmp_path / 'data').rglob('*')
              if 'incomplete' in p.name or p.suffix == '.array_record']


@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_input_is_skipped_and_counted(tmp_path, name):
  breaker, kind, file_name = BAD_INPUTS[name]
  manual = write_copy(tmp_path / 'copy')
  breaker(manual)
  builder = build(manual, tmp_path / 'data', policy='skip')
  assert sorted(records_by_id(builder)) == ['clip_a']
  summary = json.loads((tmp_path / 'data' / 'vggsound' / 'test' / str(Builder.VERSION) /
                        robustness.SUMMARY_FILE).read_text())
  assert summary['num_skipped'] == 1 and summary['by_kind'] == {kind: 1}
  (skipped,) = summary['skipped']
  assert skipped['id'] == 'clip_b' and file_name in skipped['file']
