"""Contact sheet: a few clips per scenario, ground truth outlined, audio below.

  python -m tavlo_datasets.avatar_synth.contact_sheet --builder_config=tiny \
      --data_dir=./data/tfds --out=sheet.png
  (--source=generator draws the same clips without building the dataset)

Each clip is a row of frames (time runs left to right) with the SOUNDING
instances outlined in white and the silent ones in dashed red, only on annotated
frames (the ones with a sound); the letters over a frame are its tags
(S single, M mixed, E multi-entity, O off-screen; * = cross-event clip). Under
the frames is the audio envelope on the same time axis, so one can check that
white outlines sit where the sound is, and that the silent look-alikes act
(hop, squash, flash, pulse) where it is quiet.
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import app
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from tavlo_datasets import schema  # noqa: E402

_LETTER = {'single': 'S', 'mixed': 'M', 'multi': 'E', 'offscreen': 'O'}
SOUNDING_COLOUR, SILENT_COLOUR = '#ffffff', '#ff2020'


def _majority_tag(record) -> str | None:
  tags = np.asarray(record['frames_annotated']['tags'], bool).reshape(-1, 4)
  if not len(tags):
    return None
  return schema.SCENARIOS[int(tags.sum(0).argmax())]


def pick_clips(records: Sequence[dict], per_scenario: int = 2) -> list[dict]:
  """`per_scenario` records per scenario (by majority frame tag); for Multi-
  entity one plain and one cross-event clip, when there are both."""
  chosen = {s: [] for s in schema.SCENARIOS}
  for r in records:
    tag = _majority_tag(r)
    if tag is None or len(chosen[tag]) >= per_scenario:
      continue
    if tag == 'multi' and per_scenario >= 2:
      cross = bool(np.any(r['frames_annotated']['cross_event']))
      if sum(bool(np.any(c['frames_annotated']['cross_event'])) == cross
             for c in chosen[tag]) >= (per_scenario + 1) // 2:
        continue
    chosen[tag].append(r)
    if all(len(v) >= per_scenario for v in chosen.values()):
      break
  return [r for s in schema.SCENARIOS for r in chosen[s]]


def _envelope(wave: np.ndarray, sr: int, hop_s: float = 0.01) -> tuple:
  hop = max(1, int(sr * hop_s))
  n = len(wave) // hop
  rms = np.sqrt((wave[:n * hop].reshape(n, hop) ** 2).mean(1))
  return (np.arange(n) + 0.5) * hop / sr, rms


def draw_contact_sheet(records: Sequence[dict[str, Any]], out_path: str,
                       max_frames: int = 16, title: str = '') -> None:
  """Draws the given records (schema format, decoded or generated) to a PNG."""
  if not records:
    raise ValueError('draw_contact_sheet: no records to draw')
  n_clips = len(records)
  fig = plt.figure(figsize=(max_frames * 0.9, n_clips * 1.9 + 0.6))
  grid = fig.add_gridspec(2 * n_clips, 1, height_ratios=[1.0, 0.4] * n_clips,
                          hspace=0.55, top=1 - 0.5 / (n_clips * 1.9 + 0.6),
                          bottom=0.03)
  for c, rec in enumerate(records):
    frames = np.asarray(rec['frames'])
    n, h, w, _ = frames.shape
    fps = float(rec['fps'])
    stride = max(1, int(np.ceil(n / max_frames)))
    shown = range(0, n, stride)
    dt = stride / fps
    ax = fig.add_subplot(grid[2 * c])
    ax_env = fig.add_subplot(grid[2 * c + 1], sharex=ax)
    ann = rec['frames_annotated']
    ann_frames = {int(f): a for a, f in enumerate(np.asarray(ann['frame_index']).reshape(-1))}
    inst = rec['instances']
    ann_index = np.asarray(inst['annotation_index']).reshape(-1)
    cross = bool(np.any(ann['cross_event']))
    for f in shown:
      t0 = f / fps - dt / 2
      ax.imshow(frames[f], extent=(t0, t0 + dt, h, 0), interpolation='nearest')
      if f not in ann_frames:
        continue
      a = ann_frames[f]
      tags = np.asarray(ann['tags'][a], bool)
      label = ''.join(_LETTER[s] for s, on in zip(schema.SCENARIOS, tags) if on)
      ax.text(f / fps, -1, label + ('*' if cross else ''), ha='center',
              va='bottom', fontsize=7)
      xs = t0 + (np.arange(w) + 0.5) / w * dt
      ys = np.arange(h) + 0.5
      for r in np.flatnonzero(ann_index == a):
        m = np.asarray(inst['mask'][r], np.float32)
        if m.any():
          sounding = bool(inst['sounding'][r])
          ax.contour(xs, ys, m, levels=[0.5],
                     colors=[SOUNDING_COLOUR if sounding else SILENT_COLOUR],
                     linewidths=1.3 if sounding else 0.9,
                     linestyles='solid' if sounding else 'dashed')
    vid = rec['video_id']
    vid = vid.decode() if isinstance(vid, bytes) else vid
    ax.set_title(f'{vid}  ({_majority_tag(rec) or "no annotated frame"}'
                 f'{", cross-event" if cross else ""})', fontsize=8, loc='left')
    ax.set_xlim(-dt / 2, (max(shown) / fps) + dt / 2)
    ax.set_ylim(h, -h * 0.18)
    ax.set_aspect('auto')
    ax.axis('off')
    t, rms = _envelope(np.asarray(rec['waveform'], np.float32), int(rec['sample_rate']))
    ax_env.fill_between(t, rms, color='0.3', lw=0)
    for f in ann_frames:
      ax_env.axvline(f / fps, color='#00aa33', lw=0.4, alpha=0.6)
    ax_env.set_yticks([])
    ax_env.tick_params(labelsize=6)
    if c == n_clips - 1:
      ax_env.set_xlabel('seconds (green ticks: annotated frames, i.e. a source '
                        'sounds)', fontsize=7, labelpad=1)
  fig.suptitle(title or 'AVATAR-Synth: white = sounding, red dashed = silent',
               fontsize=10, y=0.995)
  fig.savefig(out_path, dpi=90, bbox_inches='tight')
  plt.close(fig)


def contact_sheet_from_builder(builder_config: str, data_dir: str, out: str,
                               split: str = 'test', per_scenario: int = 2,
                               max_frames: int = 16, scan: int = 64) -> None:
  """Builds the dataset if missing, reads `split` and draws a sheet."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tavlo_datasets.avatar_synth  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  builder = tfds.builder(f'avatar_synth/{builder_config}', data_dir=data_dir)
  builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source()[split]
  records = [source[i] for i in range(min(scan, len(source)))]
  draw_contact_sheet(pick_clips(records, per_scenario), out, max_frames,
                     title=f'avatar_synth/{builder_config} {split}: white = '
                     'sounding, red dashed = silent; S/M/E/O = tags, * = cross-event')


def contact_sheet_from_generator(builder_config: str, out: str,
                                 split: str = 'test', per_scenario: int = 2,
                                 max_frames: int = 16, scan: int = 64) -> None:
  """Same picture without building: records straight from the generator
  (identical to the stored ones; tests/test_avatar_synth.py checks it)."""
  from tavlo_datasets.avatar_synth import avatar_synth_dataset_builder as lib  # pylint: disable=g-import-not-at-top
  from tavlo_datasets.avatar_synth import generator  # pylint: disable=g-import-not-at-top
  cfg = lib.synth_config(builder_config)
  n = min(scan, cfg.num_examples(split))
  records = [generator.generate_clip(cfg, split, i) for i in range(n)]
  draw_contact_sheet(pick_clips(records, per_scenario), out, max_frames,
                     title=f'avatar_synth/{builder_config} {split}: white = '
                     'sounding, red dashed = silent; S/M/E/O = tags, * = cross-event')


def _define_flags():
  """Defined only when run as a program (no clash with other CLIs' flags)."""
  global _CONFIG, _DATA_DIR, _OUT, _SPLIT, _PER_SCENARIO, _MAX_FRAMES, _SOURCE
  _CONFIG = flags.DEFINE_string('builder_config', 'tiny', 'avatar_synth config.')
  _DATA_DIR = flags.DEFINE_string('data_dir', './data/tfds', 'TFDS data_dir.')
  _OUT = flags.DEFINE_string('out', 'contact_sheet.png', 'Output PNG.')
  _SPLIT = flags.DEFINE_string('split', 'test', 'Split to draw from.')
  _PER_SCENARIO = flags.DEFINE_integer('per_scenario', 2, 'Clips per scenario.')
  _MAX_FRAMES = flags.DEFINE_integer('max_frames', 16, 'Frames per row (strided).')
  _SOURCE = flags.DEFINE_enum('source', 'tfds', ['tfds', 'generator'],
                              'tfds: read (building if missing) the TFDS records; '
                              'generator: regenerate them without building.')


def main(argv):
  del argv
  if _SOURCE.value == 'generator':
    contact_sheet_from_generator(_CONFIG.value, _OUT.value, _SPLIT.value,
                                 _PER_SCENARIO.value, _MAX_FRAMES.value)
  else:
    contact_sheet_from_builder(_CONFIG.value, _DATA_DIR.value, _OUT.value,
                               _SPLIT.value, _PER_SCENARIO.value, _MAX_FRAMES.value)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
