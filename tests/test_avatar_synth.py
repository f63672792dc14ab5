"""AVATAR-Synth on the `tiny` config: schema, scenarios, ground truth, timing
of actions vs sound, determinism, and the AVATAR release-layout round trip."""

import collections
import dataclasses
import json
import os

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tavlo_datasets.avatar_synth  # noqa: F401  (registers the builder)
from tavlo_datasets import schema
from tavlo_datasets.avatar_synth import avatar_synth_dataset_builder as builder_lib
from tavlo_datasets.avatar_synth import contact_sheet
from tavlo_datasets.avatar_synth import generator as gen
from tavlo_datasets.avatar_synth import release_writer

TINY = builder_lib.synth_config('tiny')
# More clips than `tiny` ships, same world: statistics need a few dozen.
MANY = 48


def _build(data_dir, num_workers=1):
  b = tfds.builder('avatar_synth/tiny', data_dir=str(data_dir), num_workers=num_workers)
  b.download_and_prepare(file_format='array_record')
  return b


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('tfds_a'))


@pytest.fixture(scope='module')
def debug_clips():
  """(split, index) -> (record, debug) for the eval split plus a train slice."""
  keys = [('test', i) for i in range(MANY)] + [('train', i) for i in range(24)]
  return {k: gen.generate_clip_debug(TINY, *k) for k in keys}


def _records_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _records_equal(a[k], b[k])
    elif isinstance(a[k], list):
      assert len(a[k]) == len(b[k]), k
      for x, y in zip(a[k], b[k]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
    else:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


# ------------------------------------------------------------------- schema


def test_builder_schema_and_readback(built):
  size, n = TINY.image_size, TINY.num_frames
  expected = schema.features(frame_height=size, frame_width=size,
                             mask_height=size, mask_width=size)
  assert built.info.features.get_serialized_info() == expected.get_serialized_info()
  sources = built.as_data_source()
  assert {s: len(sources[s]) for s in sources} == {
      'train': TINY.num_train, 'validation': TINY.num_validation,
      'test': TINY.num_test}
  for split in ('train', 'test'):
    for i in (0, len(sources[split]) - 1):
      rec = sources[split][i]
      # Record i is clip i (no shuffling), and equals the generator's output.
      ref = gen.generate_clip(TINY, split, i)
      assert _text(rec['video_id']) == ref['video_id'] == f'synth_{split}_{i:06d}'
      assert rec['frames'].shape == (n, size, size, 3)
      assert rec['frames'].dtype == np.uint8
      assert rec['waveform'].shape == (TINY.num_samples,)
      assert rec['waveform'].dtype == np.float32
      np.testing.assert_array_equal(rec['frames'], ref['frames'])
      np.testing.assert_array_equal(rec['waveform'], ref['waveform'])
      np.testing.assert_allclose(rec['frame_times'], np.arange(n) / TINY.fps)
      assert rec['sample_rate'] == TINY.sample_rate and rec['fps'] == TINY.fps
      inst = rec['instances']
      np.testing.assert_array_equal(np.stack(inst['mask']), ref['instances']['mask'])
      np.testing.assert_array_equal(np.stack(inst['box']), ref['instances']['box'])
      assert [_text(c) for c in inst['category_name']] == ref['instances']['category_name']
      ann = rec['frames_annotated']
      np.testing.assert_allclose(
          ann['time'], np.asarray(rec['frame_times'])[np.asarray(ann['frame_index'])])
      assert [_text(f) for f in ann['frame_id']] == [
          f'{ref["video_id"]}/{f}' for f in ann['frame_index']]
  assert built.info.metadata['category_names'] == gen.category_names(TINY)


def test_build_is_deterministic(built, tmp_path):
  # ... and the same with clip-generating worker processes (what the main
  # job's build uses: config.dataset.build_workers).
  again = _build(tmp_path, num_workers=2).as_data_source()
  first = built.as_data_source()
  for split in first:
    assert len(first[split]) == len(again[split])
    for i in range(len(first[split])):
      _records_equal(first[split][i], again[split][i])


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match='num_test'):
    gen.SynthConfig(num_test=10)
  with pytest.raises(ValueError, match='split'):
    gen.generate_clip(TINY, 'dev', 0)


# ---------------------------------------------------------------- scenarios


def test_eval_split_is_balanced_with_half_cross_event(debug_clips):
  per = collections.Counter()
  cross = collections.Counter()
  for (split, i), (rec, dbg) in debug_clips.items():
    if split != 'test':
      continue
    scene = dbg['scene']
    per[scene.scenario] += 1
    cross[scene.scenario] += scene.cross_event
    # The cross-event flag is per clip: on all of its annotated frames or none.
    flags = np.asarray(rec['frames_annotated']['cross_event'])
    assert flags.all() == scene.cross_event and flags.any() == scene.cross_event
  assert per == {s: MANY // 4 for s in schema.SCENARIOS}
  assert cross == {'single': 0, 'mixed': 0, 'multi': MANY // 8, 'offscreen': 0}


def test_train_mix_follows_config():
  scenes = [gen.make_scene(TINY, 'train', i) for i in range(400)]
  counts = collections.Counter(s.scenario for s in scenes)
  for name, p in zip(schema.SCENARIOS, TINY.train_mix):
    assert abs(counts[name] / 400 - p) < 0.08, (name, counts)
  multi = [s for s in scenes if s.scenario == 'multi']
  assert 0.3 < np.mean([s.cross_event for s in multi]) < 0.7


def test_frame_tags_match_what_is_on_screen(debug_clips):
  allowed = {'single': {'single', 'offscreen'},
             'mixed': {'mixed', 'single', 'offscreen'},
             'multi': {'multi', 'single', 'offscreen'},
             'offscreen': {'offscreen', 'single'}}
  majority_ok = collections.Counter()
  for (split, i), (rec, dbg) in debug_clips.items():
    scene = dbg['scene']
    ann, inst = rec['frames_annotated'], rec['instances']
    tags = ann['tags']
    assert (tags.sum(1) == 1).all(), 'synth frames carry exactly one tag'
    names = [schema.SCENARIOS[k] for k in tags.argmax(1)]
    assert set(names) <= allowed[scene.scenario], (split, i, names)
    for a, name in enumerate(names):
      rows = inst['annotation_index'] == a
      sounding = inst['sounding'][rows]
      cats = inst['category'][rows]
      # A frame is annotated only when some source sounds at its time.
      assert dbg['sounding'][:, ann['frame_index'][a]].any()
      if name == 'mixed':
        assert sounding.sum() >= 2
        assert len(set(cats[sounding])) == sounding.sum()
      elif name == 'single':
        assert sounding.sum() == 1
        assert cats[sounding][0] not in set(cats[~sounding])
      elif name == 'multi':
        assert sounding.sum() == 1
        assert cats[sounding][0] in set(cats[~sounding])
      else:
        assert sounding.sum() == 0
    if names:
      majority_ok[scene.scenario] += (
          collections.Counter(names).most_common(1)[0][0] == scene.scenario)
  # Mostly the frames are what the clip was generated as.
  for s in schema.SCENARIOS:
    assert majority_ok[s] >= 0.75 * (MANY // 4), majority_ok


def test_offscreen_frames_have_no_source_in_view(debug_clips):
  same_category = walk_in = n_off = 0
  for (split, _), (rec, dbg) in debug_clips.items():
    scene = dbg['scene']
    ann, inst = rec['frames_annotated'], rec['instances']
    for a in np.flatnonzero(ann['tags'][:, 3]):
      t = ann['frame_index'][a]
      rows = inst['annotation_index'] == a
      assert not inst['sounding'][rows].any()
      # ...yet some source is sounding: it is out of view.
      src = np.flatnonzero(dbg['sounding'][:, t])
      assert len(src) and not dbg['in_view'][src, t].any()
    if split == 'test' and scene.scenario == 'offscreen':
      n_off += 1
      visible = {scene.instances[i].category for i in range(len(scene.instances))
                 if dbg['in_view'][i].any() and not scene.instances[i].audible}
      source_cat = next(x.category for x in scene.instances if x.audible)
      same_category += source_cat in visible
      walk_in += scene.variant == 'walk_in'
      if scene.variant == 'walk_in':
        tags = ann['tags']
        first_single = np.flatnonzero(tags[:, 0])
        # Off-screen frames come first, then (once in view) Single-sound.
        if len(first_single):
          assert not tags[first_single[0]:, 3].any()
  assert same_category >= n_off // 2, 'a silent twin must mostly be visible'
  assert walk_in >= 1


# ------------------------------------------------------------ ground truth


def _dilate(mask, reach):
  """Square (Chebyshev) dilation by `reach` pixels."""
  out = mask.copy()
  for axis in (0, 1):
    grown = out.copy()
    for shift in range(1, reach + 1):
      grown |= np.roll(out, shift, axis) | np.roll(out, -shift, axis)
    out = grown
  return out


def _bbox_reference(mask):
  ys, xs = np.nonzero(mask)
  return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_masks_and_boxes_agree_with_each_other_and_renderer(debug_clips):
  cats = gen.categories(TINY)
  checked_circle = 0
  for (split, i), (rec, dbg) in list(debug_clips.items())[:24]:
    ann, inst = rec['frames_annotated'], rec['instances']
    full, visible = dbg['full_masks'], dbg['visible_masks']
    scene = dbg['scene']
    for r in range(len(inst['mask'])):
      m = inst['mask'][r].astype(bool)
      t = ann['frame_index'][inst['annotation_index'][r]]
      k = inst['instance_id'][r]
      assert m.any()
      np.testing.assert_array_equal(inst['box'][r], _bbox_reference(m))
      # Visible = own silhouette minus everything drawn in front of it.
      in_front = full[k + 1:, t].any(0)
      np.testing.assert_array_equal(m, full[k, t] & ~in_front)
      assert inst['category'][r] == scene.instances[k].category
      assert _text(inst['category_name'][r]) == cats[inst['category'][r]].name
      # Interior pixels show the category colour (when not flashing); those
      # within 3 px of an occluder may carry its anti-aliased edge (up to
      # ~2.5 px wide while it squashes: the AA band scales with rx / ry).
      cat = cats[scene.instances[k].category]
      interior = m & ~_dilate(in_front, 3)
      for axis in (0, 1):
        for shift in (1, -1):
          interior &= np.roll(m, shift, axis)
      interior[[0, -1], :] = interior[:, [0, -1]] = False
      if interior.any() and not (cat.action == 'flash' and dbg['action'][k, t] > 0):
        pix = rec['frames'][t][interior].astype(np.int32)
        expected = np.round(np.asarray(cat.colour) * 255).astype(np.int32)
        assert np.abs(pix - expected).max() <= 1
    # Independent float64 reference of the silhouette: circles at rest.
    for k, x in enumerate(scene.instances):
      if cats[x.category].shape != 'circle':
        continue
      for t in np.flatnonzero(dbg['action'][k] == 0):
        yy, xx = np.mgrid[0:TINY.image_size, 0:TINY.image_size] + 0.5
        d = np.hypot(xx - float(x.xs[t]), yy - float(x.ys[t])) - x.diameter / 2
        sure = np.abs(d) > 1e-3
        np.testing.assert_array_equal(full[k, t][sure], (d <= 0)[sure])
        checked_circle += 1
  assert checked_circle > 0


def test_multi_entity_instances_share_one_template(debug_clips):
  n_multi = 0
  for (split, _), (rec, dbg) in debug_clips.items():
    scene = dbg['scene']
    if scene.scenario != 'multi':
      continue
    n_multi += 1
    insts = scene.instances
    assert len({x.category for x in insts}) == 1
    assert len({x.diameter for x in insts}) == 1
    # Rendered from the same template: at rest, each looks identical up to
    # position (compare silhouettes drawn at a common centre).
    cat = gen.categories(TINY)[insts[0].category]
    shapes = []
    for x in insts:
      c = np.full(TINY.num_frames, TINY.image_size / 2, np.float32)
      p = gen.pose(TINY, cat, x.diameter, c, c, np.zeros(TINY.num_frames))
      shapes.append(gen.coverage(TINY, cat.shape, p)[0][0])
    for s in shapes[1:]:
      np.testing.assert_array_equal(s, shapes[0])
    # Exactly one sounds at any time, and every twin acts at some point, so
    # that only timing tells them apart.
    assert (dbg['sounding'].sum(0) <= 1).all()
    if split == 'test':
      assert all(dbg['action'][k].max() > 0 for k in range(len(insts)))
  assert n_multi >= MANY // 4


def _acting_frames(split, index, k):
  """Frames where instance k visibly acts: the clip's pixels differ from the
  same clip rendered with instance k held at rest."""
  rng = gen.clip_rng(TINY, split, index)
  scene = gen.make_scene(TINY, split, index, rng)
  frames, _, _ = gen.render(TINY, scene, np.random.default_rng(0))
  scene.instances[k] = dataclasses.replace(scene.instances[k], audible=[], silent=[])
  rest, _, _ = gen.render(TINY, scene, np.random.default_rng(0))
  return (frames != rest).reshape(len(frames), -1).any(1)


def test_actions_line_up_with_audio_events(debug_clips):
  times = np.arange(TINY.num_frames) / TINY.fps
  sr = TINY.sample_rate
  n_sounding_actions = n_silent_actions = 0
  for (split, i), (rec, dbg) in debug_clips.items():
    scene, stems = dbg['scene'], dbg['stems']
    all_audio = np.abs(stems).sum(0)
    for k, x in enumerate(scene.instances):
      acting = _acting_frames(split, i, k)
      strong = dbg['action'][k] > 0.05
      for t in np.flatnonzero(acting):
        lo, hi = int(times[t] * sr) - 80, int(times[t] * sr) + 80   # +-5 ms
        in_note = any(a <= times[t] <= b for a, b in x.audible)
        if in_note:
          # A sounding action: its own sound is playing right now.
          assert np.abs(stems[k, max(lo, 0):hi]).max() > 0
          n_sounding_actions += 1
        else:
          # A silent action: NO source makes a sound within the guard gap.
          g = int(TINY.guard_s * sr) - 1
          assert all_audio[max(lo - g, 0):hi + g].max() == 0, (split, i, k, t)
          n_silent_actions += 1
      # Every frame inside one of its notes shows the action on screen (when
      # the instance is on screen at all: off-screen sources act unseen).
      on_screen = dbg['full_masks'][k].reshape(len(times), -1).any(1)
      in_notes = np.array([any(a <= tt <= b for a, b in x.audible) for tt in times])
      assert not (in_notes & strong & on_screen & ~acting).any(), (split, i, k)
      # Its audio is silent outside its notes.
      if x.audible:
        gate = np.zeros(TINY.num_samples, bool)
        for a, b in x.audible:
          gate[int(np.floor(a * sr)):int(np.ceil(b * sr)) + 1] = True
        assert not stems[k][~gate].any()
  assert n_sounding_actions > 50 and n_silent_actions > 20


def test_audio_snr_matches_config_float64(debug_clips):
  for (split, i), (rec, dbg) in list(debug_clips.items())[:12]:
    signal = dbg['stems'].astype(np.float64).sum(0)
    noise = rec['waveform'].astype(np.float64) - signal
    active = signal != 0
    snr = 10 * np.log10(np.mean(signal[active] ** 2) / np.mean(noise ** 2))
    assert abs(snr - TINY.snr_db) < 0.5, (split, i, snr)


def test_objects_fit_an_8x8_grid_and_move():
  cfg = gen.SynthConfig(image_size=64)
  for i in range(20):
    scene = gen.make_scene(cfg, 'test', i)
    for x in scene.instances:
      assert 14 <= x.diameter <= 22        # 2-3 cells of an 8x8 map
    moving = [np.hypot(x.xs[-1] - x.xs[0], x.ys[-1] - x.ys[0]) for x in scene.instances]
    assert max(moving) > 1.0


# ---------------------------------------------------------- release layout


def test_release_writer_round_trip(built, tmp_path):
  source = built.as_data_source()['test']
  records = [source[i] for i in range(4)]   # one clip per scenario
  ids = release_writer.export_release(records, str(tmp_path))
  assert ids == [f'synth_test_{i:06d}' for i in range(4)]
  size, n = TINY.image_size, TINY.num_frames
  n_offscreen = 0
  for rec, vid in zip(records, ids):
    path = tmp_path / 'video' / f'{vid}.mp4'
    with av.open(str(path)) as c:
      assert c.streams.video[0].codec_context.name == 'h264'
      assert c.streams.audio[0].codec_context.name == 'aac'
      decoded = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    with av.open(str(path)) as c:
      samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert len(decoded) == n and decoded[0].shape == (size, size, 3)
    assert len(samples) >= TINY.num_samples
    assert np.abs(np.asarray(decoded, np.float32) - rec['frames']).mean() < 12
    ann, inst = rec['frames_annotated'], rec['instances']
    files = sorted(os.listdir(tmp_path / 'metadata' / vid))
    assert files == sorted(f'{f}.json' for f in ann['frame_index'])
    for a, f in enumerate(ann['frame_index']):
      meta = json.loads((tmp_path / 'metadata' / vid / f'{f}.json').read_text())
      assert meta['original_width'] == size and meta['original_height'] == size
      rows = [r for r in range(len(inst['mask']))
              if inst['annotation_index'][r] == a and inst['sounding'][r]]
      tag = schema.SCENARIOS[int(np.argmax(ann['tags'][a]))]
      if not rows:
        assert meta['annotations'] == [{'segmentation': [], 'bbox': [],
                                        'audio_visual_category': '',
                                        'task': 'Off-Screen'}]
        assert schema.normalize_tag(meta['annotations'][0]['task']) == 'offscreen'
        n_offscreen += 1
        continue
      assert len(meta['annotations']) == len(rows)
      for r, entry in zip(rows, meta['annotations']):
        assert schema.normalize_tag(entry['task']) == tag
        assert entry['audio_visual_category'] == _text(inst['category_name'][r])
        assert entry['bbox'] == [float(v) for v in inst['box'][r]]
        mask = inst['mask'][r].astype(bool)
        back = release_writer.polygons_to_mask(entry['segmentation'], size, size) > 0
        # Equal except within one pixel of the mask's edge.
        grown = mask.copy()
        shrunk = mask.copy()
        for axis in (0, 1):
          for shift in (1, -1):
            grown |= np.roll(mask, shift, axis)
            shrunk &= np.roll(mask, shift, axis)
        edge = grown & ~shrunk
        assert not ((back != mask) & ~edge).any()
        assert (back == mask).mean() > 0.97
  assert n_offscreen > 0


def test_polygons_keep_holes():
  m = np.zeros((20, 20), np.uint8)
  m[3:17, 3:17] = 1
  m[7:13, 7:13] = 0                  # a hole: e.g. an object in front
  back = release_writer.polygons_to_mask(release_writer.mask_to_polygons(m), 20, 20)
  np.testing.assert_array_equal(back, m)


def test_contact_sheet_draws(tmp_path, debug_clips):
  records = [rec for (split, _), (rec, _) in debug_clips.items() if split == 'test']
  picked = contact_sheet.pick_clips(records, per_scenario=1)
  assert len(picked) == 4
  out = tmp_path / 'sheet.png'
  contact_sheet.draw_contact_sheet(picked, str(out), max_frames=4)
  assert out.stat().st_size > 10_000
