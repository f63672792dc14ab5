"""`localize`: maps on anyone's video (generated mp4s, tiny checkpoints).

Fast tests save an untrained TrainState the way `train.run` does
(`checkpointing.Checkpointer`, config.json next to it); the slow test trains
a tiny model with `tavlo_jax.main`, exports avatar_synth clips in the AVATAR
layout and checks that the maps point at the sounding object more often
than chance.
"""
import json
import os
import pathlib
import subprocess
import sys

import av
import flax.linen as nn
import jax
import numpy as np
import pytest
from fractions import Fraction
from PIL import Image

from tavlo_datasets import media
from tavlo_datasets.robustness import BadExample
from tavlo_jax import (checkpointing, config_lib, evaluate_maps, localize, models, train,
                       trained_run, video_maps)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SR = 16000


def _config(**overrides):
  config = config_lib.load_config_file(str(ROOT / 'configs/avatar_synth.py') + ':runlocal')
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _save_run(workdir, config):
  """An untrained run in exactly the layout `tavlo_jax.main` leaves: a
  TrainState saved by `checkpointing.Checkpointer` and config.json.

  Why not `train.create_state`: compiling the sharded init costs ~30 s on a
  loaded 2-core box; random weights of the right shapes (numpy, from the
  model's abstract init) make the same checkpoint in about a second.
  """
  os.makedirs(workdir, exist_ok=True)
  model = models.build_model(config)
  frames, audio = models.dummy_inputs(config, 1)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), frames, audio, train=False)))
  rng = np.random.default_rng(config.seed)
  variables = jax.tree.map(
      lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  tx, _ = train.make_optimizer(config)
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                                  batch_stats=variables.get('batch_stats', {}))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=1,
                                    async_save=False)
  ckpt.save(0, state, None, force=True)
  ckpt.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return str(workdir)


def _tone(seconds, freq=440.0, amp=0.3):
  t = np.arange(int(round(seconds * SR))) / SR
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _video(path, n=30, fps=12.0, height=36, width=48, audio=True, seed=0):
  frames = (np.random.default_rng(seed).random((n, height, width, 3)) * 255).astype(np.uint8)
  media.write_mp4(path, frames, fps, _tone(n / fps) if audio else None, SR)
  return str(path)


def _count_frames(path):
  with av.open(str(path)) as c:
    return sum(1 for _ in c.decode(video=0))


RAW_THRESHOLD = 0.05


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = _save_run(tmp_path_factory.mktemp('run'), _config())
  # As runner.evaluate leaves it: the Off-screen threshold for these weights.
  report = pathlib.Path(workdir, 'eval', 'step_0', 'eval.json')
  report.parent.mkdir(parents=True)
  report.write_text(json.dumps({'settings': {'calibration': {
      'rule': 'raw_max', 'raw_threshold': RAW_THRESHOLD, 'target_tpr': 0.9}}}))
  return workdir


@pytest.fixture(scope='module')
def trained(run_dir):
  return trained_run.load_run(run_dir)


# ---------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------

def test_in_view_rule_from_eval_json_and_peak_window_scores(tmp_path):
  report = tmp_path / 'eval' / 'step_7' / 'eval.json'
  report.parent.mkdir(parents=True)
  report.write_text(json.dumps({'settings': {
      'offscreen_rule': 'peak_window', 'offscreen_window_half_width': 1,
      'offscreen_window_quantile': 1.0,
      'calibration': {'raw_threshold': 0.4, 'window_threshold': 0.25}}}))
  rule = trained_run.in_view_rule(str(tmp_path), 7)
  assert rule == trained_run.InView('peak_window', 0.25, 1, 1.0)
  # Peaks (max - mean) 0.1, 0.5, 0.2, 0.0; the max over +-1 model frames:
  raw_max = np.array([0.3, 0.9, 0.4, 0.1])
  raw_mean = np.array([0.2, 0.4, 0.2, 0.1])
  np.testing.assert_allclose(rule.scores(raw_max, raw_mean), [0.5, 0.5, 0.5, 0.2])
  np.testing.assert_allclose(trained_run.InView('raw_max', 0.4).scores(raw_max, raw_mean), raw_max)
  assert trained_run.in_view_rule(str(tmp_path), 8) is None         # step never evaluated


@pytest.mark.parametrize('width,height,expected', [
    (64, 64, (0, 0, 32, 32)),       # square: fills the input
    (64, 36, (7, 0, 18, 32)),       # landscape: bars above and below
    (36, 64, (0, 7, 32, 18)),       # portrait: bars left and right
    (8, 6, (4, 0, 24, 32)),         # tiny: scaled up
    (1000, 2, (15, 0, 1, 32)),      # degenerate: at least one row
])
def test_letterbox_geometry(width, height, expected):
  box = video_maps.letterbox_geometry(width, height, 32)
  assert (box.top, box.left, box.height, box.width) == expected
  frames = np.full((2, box.height, box.width, 3), 200, np.uint8)
  canvas = video_maps.letterbox(frames, box)
  assert canvas.shape == (2, 32, 32, 3)
  assert canvas.sum() == frames.sum()           # the picture, on black
  assert (canvas[:, box.top:box.top + box.height, box.left:box.left + box.width] == 200).all()


def _bilinear_reference(grid, factor):
  """float64 half-pixel bilinear upsampling, edges clamped, axis by axis."""
  def along(x, axis):
    n = x.shape[axis]
    pos = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    shape = [1] * x.ndim
    shape[axis] = -1
    return (np.take(x, lo, axis) * (1 - frac).reshape(shape)
            + np.take(x, hi, axis) * frac.reshape(shape))
  return along(along(np.asarray(grid, np.float64), -1), -2)


def _grid(config):
  """The model's map size: H/4 with fine maps, else the token grid."""
  m = config.model
  return config.input.image_size // (m.fine_stride or m.visual.output_stride)


def test_crop_to_picture_keeps_square_maps_and_crops_bars():
  grid = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
  square = video_maps.letterbox_geometry(64, 64, 32)
  assert video_maps.crop_to_picture(grid, square) is grid
  up = video_maps.CROP_UPSAMPLE
  # Portrait 16x32 in a 32 input: the picture is columns 8..24 (of 32), i.e.
  # columns 4..12 of the 16-wide upsampled map; the bars are dropped.
  box = video_maps.letterbox_geometry(16, 32, 32)
  assert (box.left, box.width) == (8, 16)
  out = video_maps.crop_to_picture(grid, box)
  assert out.shape == (3, 4 * up, 2 * up)
  np.testing.assert_allclose(out, _bilinear_reference(grid, up)[:, :, up:3 * up], atol=1e-5)
  # Landscape 32x8: rows 12..20 of 32.
  box = video_maps.letterbox_geometry(32, 8, 32)
  out = video_maps.crop_to_picture(grid, box)
  np.testing.assert_allclose(out, _bilinear_reference(grid, up)[:, 6:10], atol=1e-5)


@pytest.mark.parametrize('n,window,stride', [(1, 8, 4), (8, 8, 4), (9, 8, 4), (20, 8, 4),
                                             (23, 8, 3), (100, 16, 8)])
def test_windows_cover_every_frame_and_end_on_the_last(n, window, stride):
  starts = video_maps.window_starts(n, window, stride)
  covered = np.zeros(max(n, window), int)
  for s in starts:
    covered[s:s + window] += 1
    assert s + window <= max(n, window)
  assert (covered[:n] >= 1).all()
  assert starts[-1] == max(n - window, 0)
  assert starts == sorted(set(starts))


@pytest.mark.parametrize('block', ['centred', 'trailing'])
def test_blending_averages_windows_and_cuts_audio_as_training_does(block):
  """A fake model that reports, per frame, the mean of its window's audio
  block and its own position in the window; checked against a float64
  per-frame reference written from WORKSPACE.md's alignment rule."""
  n, window, fps, spf = 13, 4, 8.0, SR // 8
  rng = np.random.default_rng(1)
  waveform = rng.normal(size=(int(n * spf - 700),)).astype(np.float32)   # a bit short
  frames = np.zeros((n, 8, 8, 3), np.uint8)
  calls = []

  def fake_predict(clip_frames, clip_audio):
    calls.append(len(clip_frames))
    b = len(clip_frames)
    blocks = clip_audio.reshape(b, window, spf).astype(np.float64).mean(-1)   # [B, T]
    maps = np.zeros((b, window, 2, 2))
    maps[:, :, 0, :] = blocks[..., None]
    maps[:, :, 1, :] = np.arange(window)[None, :, None]     # position in the window
    return maps

  out = video_maps.blended_maps(fake_predict, frames, waveform, window=window, stride=3,
                              fps=fps, sample_rate=SR, batch_windows=2, audio_block=block,
                              progress=False)
  assert out.shape == (n, 2, 2)
  assert calls and set(calls) == {2}                  # every call a full batch
  padded = np.concatenate([np.zeros(spf), waveform.astype(np.float64), np.zeros(2 * spf)])
  starts = video_maps.window_starts(n, window, 3)
  for f in range(n):
    # Frame f's audio: the spf samples centred on its time f / fps, or
    # (trailing) the spf samples that end there.
    lo = int(round((f - (0.5 if block == 'centred' else 1.0)) * spf)) + spf
    assert out[f, 0, 0] == pytest.approx(padded[lo:lo + spf].mean(), abs=1e-5)
    positions = [f - s for s in starts if s <= f < s + window]
    assert out[f, 1, 0] == pytest.approx(np.mean(positions), abs=1e-6)


def test_iter_frames_picks_by_timestamp_like_read_video(tmp_path):
  path = _variable_rate_video(tmp_path / 'vfr.mp4')
  for fps in (8.0, 12.0):
    expected, _, _ = media.read_video(path, fps)
    got = np.stack(list(video_maps.iter_frames(path, fps, len(expected))))
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------
# Whole videos
# ---------------------------------------------------------------------------

def _variable_rate_video(path):
  """16 frames at irregular times (50..200 ms apart), frame i has gray i*15."""
  gaps = [0.05, 0.15, 0.1, 0.05, 0.2, 0.1, 0.05, 0.1, 0.15, 0.05, 0.1, 0.1, 0.2, 0.05, 0.1]
  times = np.cumsum([0.0] + gaps)
  with av.open(str(path), 'w') as c:
    v = c.add_stream('libx264', rate=10)
    v.width, v.height, v.pix_fmt = 48, 32, 'yuv420p'
    v.codec_context.time_base = Fraction(1, 1000)
    a = c.add_stream('aac', rate=SR, layout='mono')
    for i, t in enumerate(times):
      frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), i * 15, np.uint8), format='rgb24')
      frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
      c.mux(v.encode(frame))
    c.mux(v.encode())
    wave = _tone(times[-1] + 0.1)[None]
    af = av.AudioFrame.from_ndarray(wave, format='flt', layout='mono')
    af.sample_rate, af.pts = SR, 0
    c.mux(a.encode(af))
    c.mux(a.encode())
  return str(path)


@pytest.mark.slow
def test_outputs_match_the_input_video(trained, tmp_path):
  # 12 fps input, the model sees 8 fps: maps are mapped back to every frame.
  path = _video(tmp_path / 'clip one.mp4', n=30, fps=12.0)
  out = tmp_path / 'out'
  r = video_maps.localize_video(trained, path, str(out), progress=False)
  overlay = out / 'clip one.overlay.mp4'
  assert r.overlay_path == str(overlay) and r.model_fps == 8.0
  src, dst = media.video_info(path), media.video_info(overlay)
  assert _count_frames(overlay) == _count_frames(path) == r.num_frames == 30
  assert dst.fps == pytest.approx(src.fps)
  assert dst.duration == pytest.approx(src.duration, abs=1e-3)
  assert (dst.width, dst.height) == (src.width, src.height)
  # The original audio is kept: same length, same energy, same waveform.
  a, b = media.read_audio(path, SR), media.read_audio(overlay, SR)
  assert len(a) == len(b)
  assert np.mean(b ** 2) == pytest.approx(np.mean(a ** 2), rel=0.05)
  assert np.corrcoef(a, b)[0, 1] > 0.99
  # The heat map is drawn: overlay pixels differ from the source frames.
  first, _, _ = media.read_video(overlay, 12.0)
  orig, _, _ = media.read_video(path, 12.0)
  assert np.abs(first.astype(int) - orig.astype(int)).mean() > 10

  paths = localize.write_outputs(str(out), [r], trained, 'ckpt')
  maps = np.load(paths['maps'])
  assert sorted(maps.files) == sorted(f'clip one/{k}' for k in range(30))
  grid = _grid(trained.config)
  for k in range(30):
    m = maps[f'clip one/{k}']
    assert m.shape != (grid, grid) and m.shape[1] == grid * video_maps.CROP_UPSAMPLE
    assert np.isfinite(m).all() and -1.0 <= m.min() <= m.max() <= 1.0
  # Frame k (time k/12) shows model frame j (time j/8) nearest in time.
  nearest = [int(np.floor(k * 8 / 12 + 0.5)) for k in range(30)]
  for k in range(1, 30):
    same = np.array_equal(maps[f'clip one/{k}'], maps[f'clip one/{k - 1}'])
    assert same == (nearest[k] == nearest[k - 1]), k
  rows = (out / 'scores.csv').read_text().splitlines()
  assert rows[0] == 'video_id,frame_index,time_s,raw_max,in_view_score,in_view'
  assert len(rows) == 31 and rows[3].startswith('clip one,2,0.1667,')
  raw_max = np.array([float(row.split(',')[3]) for row in rows[1:]])
  np.testing.assert_allclose(raw_max, [maps[f'clip one/{k}'].max() for k in range(30)], atol=1e-6)
  # "In view" under the run's rule (raw_max here): raw_max against its
  # calibrated threshold.
  assert trained.in_view == trained_run.InView('raw_max', RAW_THRESHOLD)
  score = np.array([float(row.split(',')[4]) for row in rows[1:]])
  np.testing.assert_allclose(score, raw_max, atol=1e-6)
  in_view = [int(row.split(',')[5]) for row in rows[1:]]
  assert in_view == [int(v >= RAW_THRESHOLD) for v in raw_max]
  summary = json.loads((out / 'localize.json').read_text())
  assert summary['videos'][0]['num_frames'] == 30 and summary['step'] == 0


def test_maps_are_deterministic_and_evaluate_maps_reads_them(trained, tmp_path):
  path = _video(tmp_path / 'v.mp4', n=16, fps=8.0, height=32, width=32)
  one = video_maps.localize_video(trained, path, None, progress=False)
  two = video_maps.localize_video(trained, path, None, progress=False)
  assert one.overlay_path is None
  for a, b in zip(one.frame_maps, two.frame_maps):
    np.testing.assert_array_equal(a, b)
  # Square video: the model's raw grid, one map per frame.
  g = _grid(trained.config)
  assert one.frame_maps[0].shape == (g, g) and len(one.frame_maps) == 16
  paths = localize.write_outputs(str(tmp_path / 'out'), [one], trained, 'ckpt')
  ann = tmp_path / 'release' / 'metadata' / 'v'
  ann.mkdir(parents=True)
  (ann / '5.json').write_text(json.dumps({
      'original_width': 32, 'original_height': 32, 'annotations': [{
          'segmentation': [[4, 4, 20, 4, 20, 20, 4, 20]], 'task': 'single',
          'audio_visual_category': 'x'}]}))
  frames = evaluate_maps.load_annotations(str(tmp_path / 'release'))
  with np.load(paths['maps']) as maps:
    evaluate_maps.check_heatmaps(frames, maps)        # keys and maps accepted


def test_variable_frame_rate_video(trained, tmp_path):
  path = _variable_rate_video(tmp_path / 'vfr.mp4')
  info = media.video_info(path)
  r = video_maps.localize_video(trained, path, str(tmp_path / 'out'), progress=False)
  expected = len(media.output_times(info.duration, info.fps))
  assert r.num_frames == expected == _count_frames(r.overlay_path)
  assert media.video_info(r.overlay_path).fps == pytest.approx(info.fps, rel=1e-3)
  assert all(np.isfinite(m).all() for m in r.frame_maps)


@pytest.mark.parametrize('height,width', [(48, 36), (10, 8)])
def test_portrait_and_tiny_videos_keep_their_size(trained, tmp_path, height, width):
  path = _video(tmp_path / 'v.mp4', n=10, fps=8.0, height=height, width=width)
  r = video_maps.localize_video(trained, path, str(tmp_path / 'out'), overlay='png',
                              progress=False)
  box = r.letterbox
  assert box.height == 32 and box.width == round(32 * width / height)
  h, w = r.frame_maps[0].shape
  assert h > w and h == _grid(trained.config) * video_maps.CROP_UPSAMPLE   # picture's shape, no bars
  strip = np.asarray(Image.open(r.overlay_path))
  assert strip.shape[1] > strip.shape[0]                 # frames side by side


def test_gif_overlay_has_every_frame(trained, tmp_path):
  path = _video(tmp_path / 'v.mp4', n=12, fps=12.0)
  r = video_maps.localize_video(trained, path, str(tmp_path / 'out'), overlay='gif',
                              progress=False)
  with Image.open(r.overlay_path) as gif:
    assert gif.n_frames == 12 and gif.size == (48, 36)


# ---------------------------------------------------------------------------
# Bad inputs: each with a message that names the file and what to do
# ---------------------------------------------------------------------------

def test_no_audio_stream_is_an_error_or_silence_by_flag(trained, tmp_path, caplog):
  path = _video(tmp_path / 'mute.mp4', n=8, fps=8.0, audio=False)
  with pytest.raises(localize.LocalizeError,
                     match=r'mute\.mp4.*no audio stream.*--on_missing_audio=silence'):
    video_maps.localize_video(trained, path, str(tmp_path / 'out'), progress=False)
  r = video_maps.localize_video(trained, path, str(tmp_path / 'out'), progress=False,
                              on_missing_audio='silence')
  assert 'against silence' in caplog.text
  assert not r.has_audio and _count_frames(r.overlay_path) == 8
  assert not media.video_info(r.overlay_path).has_audio


def test_corrupt_and_truncated_files_are_named(trained, tmp_path):
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(BadExample, match=r'garbage\.mp4: corrupt_video'):
    video_maps.localize_video(trained, str(garbage), None, progress=False)
  good = pathlib.Path(_video(tmp_path / 'good.mp4', n=24, fps=8.0))
  cut = tmp_path / 'cut.mp4'
  data = good.read_bytes()
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(BadExample, match=r'cut\.mp4: corrupt_video'):
    video_maps.localize_video(trained, str(cut), None, progress=False)
  with pytest.raises(localize.LocalizeError, match=r'nothere\.mp4: no such video file'):
    video_maps.localize_video(trained, str(tmp_path / 'nothere.mp4'), None, progress=False)
  with pytest.raises(localize.LocalizeError, match=r'--window_stride=99: expected 1\.\.8'):
    video_maps.localize_video(trained, str(good), None, window_stride=99, progress=False)
  with pytest.raises(localize.LocalizeError, match=r'cannot run at 30 fps.*pass an --fps'):
    video_maps.localize_video(trained, str(good), None, fps=30.0, progress=False)
  with pytest.raises(localize.LocalizeError, match=r'matches no file'):
    localize.expand_videos(str(tmp_path / '*.mkv'))


def test_checkpoint_problems_are_named(tmp_path, run_dir):
  with pytest.raises(localize.LocalizeError, match='is not a directory'):
    trained_run.find_checkpoint(str(tmp_path / 'missing'))
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(localize.LocalizeError, match='no finished checkpoint step'):
    trained_run.find_checkpoint(str(tmp_path / 'empty'))
  # A step folder copied away from its run has no config.json above it.
  orphan = tmp_path / 'a' / 'b' / 'c' / '0'
  (orphan / 'state').mkdir(parents=True)
  with pytest.raises(localize.LocalizeError, match='no config.json'):
    trained_run.find_checkpoint(str(orphan))
  # A config.json written before a field existed: the field takes its default.
  stored = json.loads(pathlib.Path(run_dir, 'config.json').read_text())
  del stored['model']['attention_block']
  stored['model']['attention_impl'] = 'ring'       # needs the training mesh
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'config.json').write_text(json.dumps(stored))
  config = trained_run.load_config(str(old))
  assert config.model.attention_block == config_lib.base_config().model.attention_block
  assert config.model.attention_impl == 'xla'      # same params, one device
  bad = tmp_path / 'badjson'
  bad.mkdir()
  (bad / 'config.json').write_text('{not json')
  with pytest.raises(localize.LocalizeError, match=r'config\.json: cannot read'):
    trained_run.load_config(str(bad))


def test_a_run_stored_with_retired_fields_still_loads(tmp_path, run_dir):
  """config.json of a run trained before an experiment was removed holds
  its field: at its "off" value it is ignored; switched on, the run was a
  model this code cannot build, and the field is named."""
  stored = json.loads(pathlib.Path(run_dir, 'config.json').read_text())
  for name, off in trained_run.RETIRED_FIELDS.items():
    section, field = name.split('.')
    stored[section][field] = off
  stored['evals']['total']['split'] = 'test'
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'config.json').write_text(json.dumps(stored))
  config = trained_run.load_config(str(old))
  assert 'aligned_maps' not in config.model and 'split' not in config.evals.total
  models.build_model(config)
  stored['model']['aligned_maps'] = True
  (old / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(localize.LocalizeError, match=r'model\.aligned_maps=True'):
    trained_run.load_config(str(old))


@pytest.mark.slow
def test_checkpoint_from_another_config_uses_its_stored_config(tmp_path, run_dir):
  other = _config(**{'input.num_frames': 4, 'input.image_size': 40, 'model.embed_dim': 8})
  workdir = _save_run(tmp_path / 'other', other)
  # A checkpoints/<step> folder works too: config.json is found above it.
  r = trained_run.load_run(os.path.join(workdir, 'checkpoints', '0'))
  assert r.config.input.num_frames == 4 and r.step == 0
  assert r.in_view is None                               # never evaluated
  path = _video(tmp_path / 'v.mp4', n=10, fps=8.0, height=32, width=32)
  out = video_maps.localize_video(r, path, None, progress=False)
  g = _grid(r.config)
  assert g == 40 // 4 and out.frame_maps[0].shape == (g, g)   # 40 px input, fine maps
  # The weights of one run with the config of another: named, not a traceback.
  (tmp_path / 'other' / 'config.json').write_text(pathlib.Path(run_dir, 'config.json').read_text())
  with pytest.raises(localize.LocalizeError, match='does not fit'):
    trained_run.load_run(workdir)


@pytest.mark.slow
def test_cli_reports_errors_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'tavlo_jax.localize',
                      f'--checkpoint={tmp_path / "nope"}', f'--video={tmp_path / "x.mp4"}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: --video=')
  assert 'Traceback' not in r.stderr


# ---------------------------------------------------------------------------
# A trained tiny model points at the sounding object more often than chance
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_trained_model_points_at_the_sounding_object(tmp_path):
  import tensorflow_datasets as tfds
  import tavlo_datasets.avatar_synth  # noqa: F401  (registers the builder)
  from tavlo_datasets.avatar_synth import release_writer
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.main', '--config=configs/avatar_synth.py:runlocal',
       f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
       '--config.train.total_steps=150', '--config.train.log_every_steps=50',
       '--config.train.checkpoint_every_steps=150', '--config.optimizer.warmup_steps=10',
       '--mode=train'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  source = tfds.builder('avatar_synth/tiny', data_dir=str(data_dir)).as_data_source('test')
  release = tmp_path / 'release'
  ids = release_writer.export_release(source, str(release), limit=8)

  out = tmp_path / 'out'
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.localize', f'--checkpoint={workdir}',
       f'--video={release}/video/*.mp4', f'--out={out}', '--overlay=png'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert 'Restored step 150' in r.stdout
  assert sorted(p.name for p in out.glob('*.png')) == sorted(f'{i}.overlay.png' for i in ids)
  rows = (out / 'scores.csv').read_text().splitlines()[1:]
  assert len(rows) == 8 * 16                             # tiny clips: 2 s at 8 fps

  frames = evaluate_maps.load_annotations(str(release))
  hits, chance = [], []
  with np.load(out / 'maps.npz') as maps:
    evaluate_maps.check_heatmaps(frames, maps)
    results, _, _ = evaluate_maps.evaluate(
        frames, maps, evaluate_maps.make_config([0.1], 0.1, 'bilinear', 'no_pixel_above'))
    assert 'total' in results['scenarios']
    for fa in frames:
      w, h = fa.original_size
      mask = evaluate_maps.rasterize(fa, (h, w))
      if not mask.any():
        continue                              # Off-screen: nothing to point at
      up = np.asarray(models.upsample_heatmap(maps[fa.frame_id], (h, w)))
      hits.append(bool(mask.flat[np.argmax(up)]))
      chance.append(mask.mean())
  hit_rate, chance_rate = float(np.mean(hits)), float(np.mean(chance))
  print(f'argmax on the sounding mask: {hit_rate:.3f} of {len(hits)} frames; '
        f'chance (mask area): {chance_rate:.3f}')
  assert hit_rate > chance_rate

  # The same run through the category probe's command line: one row per
  # category of the tiny world, named from the dataset's metadata.
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.category_probe', f'--checkpoint={workdir}',
       '--batches=4'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  rows = [line for line in r.stdout.splitlines() if line.startswith('| ')][1:]
  assert rows and all(line.count('|') == 7 for line in rows), r.stdout
  assert all(line.split('|')[1].strip().endswith(')') for line in rows), r.stdout
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.category_probe', f'--checkpoint={tmp_path}/none'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: --checkpoint='{tmp_path}/none'")
