r"""Heat maps on anyone's video: where in the picture is the sound coming from.

  python -m tavlo_jax.localize --checkpoint=workdirs/tavlo --video='clips/*.mp4' \
      [--out=localize_out] [--overlay=mp4|gif|png|none] [--fps=8] \
      [--batch_windows=8] [--on_missing_audio=error|silence]

--checkpoint is a training workdir (holding `config.json` and `checkpoints/`;
the newest step is used) or one `checkpoints/<step>` folder. The model is
built from the config stored with the run, never from a config file on disk,
so a checkpoint trained with any config just works.

What happens to each video: tavlo_jax/video_maps.py (decode at the model's
frame rate, letterbox, sliding windows with each window's audio cut as in
training, maps averaged where windows overlap, then shown on every frame of
the original video).

Outputs in --out:
  <video_id>.overlay.mp4   the original frames with the map over them (per
                           frame min-max normalised, as AVATAR scores maps),
                           same frame count, rate and size (odd sizes are
                           padded by one pixel for yuv420p), h264 + the
                           original audio re-encoded as aac. Or `.gif`
                           (animated) or `.png` (a strip of frames above
                           their overlays) with --overlay.
  maps.npz                 raw cosine maps keyed `<video_id>/<frame_index>`
                           (AVATAR frame ids: video_id = file stem, frame
                           index = frame of the original video), so
                           `python -m tavlo_jax.evaluate_maps` scores them.
                           Square videos: the model's h x w grid as it is.
                           Letterboxed videos: the grid upsampled 4x
                           (bilinear) and cropped to the picture, so the
                           map's edges are the frame's edges.
  scores.csv               per frame `raw_max` (the map's maximum),
                           `in_view_score` and `in_view` (score >= the
                           Off-screen threshold calibrated on the validation
                           split, under the run's rule, when its
                           eval/step_<step>/eval.json has one; else empty).
                           Rule `peak_window` (the synthetic default): the
                           map's peak (max - mean) pooled over +-k model
                           frames; rule `raw_max`: the raw max itself.
  localize.json            what was run: checkpoint, step, rates, rule.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import app, flags, logging

from tavlo_datasets.robustness import BadExample
from tavlo_jax import cli, logs
from tavlo_jax.trained_run import Run, RunError, load_run
from tavlo_jax.video_maps import VideoResult, localize_video

# Bad input of any kind (checkpoint, config, video, flag): one line, exit 2.
LocalizeError = RunError


# ---------------------------------------------------------------------------
# Many videos -> maps.npz, scores.csv, localize.json
# ---------------------------------------------------------------------------

def expand_videos(pattern: str) -> list[str]:
  paths = [pattern] if os.path.isfile(pattern) else sorted(
      p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise LocalizeError(f'--video={pattern!r} matches no file')
  stems: dict[str, str] = {}
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    if stem in stems:
      raise LocalizeError(f'{stems[stem]} and {p} have the same video id {stem!r} '
                          '(the file stem keys the maps); rename one')
    stems[stem] = p
  return paths


def write_outputs(out_dir: str, results: Sequence[VideoResult], run: Run,
                  checkpoint: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, name) for k, name in
           (('maps', 'maps.npz'), ('scores', 'scores.csv'), ('summary', 'localize.json'))}
  np.savez_compressed(paths['maps'], **{
      f'{r.video_id}/{k}': m for r in results for k, m in enumerate(r.frame_maps)})
  rule = run.in_view
  with open(paths['scores'], 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['video_id', 'frame_index', 'time_s', 'raw_max', 'in_view_score', 'in_view'])
    for r in results:
      for k, v in enumerate(r.raw_max):
        score = None if r.in_view_score is None else float(r.in_view_score[k])
        w.writerow([r.video_id, k, f'{k / r.fps:.4f}', f'{v:.6f}',
                    '' if score is None else f'{score:.6f}',
                    '' if score is None else int(score >= rule.threshold)])
  summary = {
      'checkpoint': os.path.abspath(checkpoint), 'workdir': run.workdir,
      'step': run.step, 'in_view_rule': None if rule is None else dataclasses.asdict(rule),
      'videos': [{'video_id': r.video_id, 'path': os.path.abspath(r.path),
                  'fps': r.fps, 'num_frames': r.num_frames, 'model_fps': r.model_fps,
                  'letterbox': dataclasses.asdict(r.letterbox),
                  'has_audio': r.has_audio, 'overlay': r.overlay_path}
                 for r in results]}
  with open(paths['summary'], 'w') as f:
    json.dump(summary, f, indent=1)
  return paths


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _define_flags() -> dict:
  """Defined when the CLI starts, not at import: evaluate_maps (imported
  alongside in tests and notebooks) owns absl flags of the same names."""
  return {
      'checkpoint': flags.DEFINE_string(
          'checkpoint', None, 'Training workdir, or one of its checkpoints/<step>.'),
      'video': flags.DEFINE_string('video', None, 'A video file or a glob (quote it).'),
      'out': flags.DEFINE_string('out', 'localize_out', 'Output directory.'),
      'fps': flags.DEFINE_float('fps', None, 'Frames per second the model sees '
                                '(default: the rate the run trained at).'),
      'overlay': flags.DEFINE_enum('overlay', 'mp4', ['mp4', 'gif', 'png', 'none'],
                                   'Overlay format.'),
      'batch_windows': flags.DEFINE_integer('batch_windows', 8, 'Windows per device call.'),
      'window_stride': flags.DEFINE_integer(
          'window_stride', 0, 'Frames between window starts (0: half a window).'),
      'on_missing_audio': flags.DEFINE_enum(
          'on_missing_audio', 'error', ['error', 'silence'],
          'A video without an audio stream: stop, or localize against silence.'),
  }


@cli.user_errors()
def main(flag, argv):
  # Orbax narrates every restore (and warns about a metadata file that
  # TrainState checkpoints never have); a user of this tool needs none of it.
  logging.get_absl_handler().addFilter(logs.QuietLibraries('error'))
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = {name: holder.value for name, holder in flag.items()}
  if not f['checkpoint'] or not f['video']:
    raise app.UsageError('--checkpoint and --video are required')
  if f['batch_windows'] < 1 or f['window_stride'] < 0:
    raise app.UsageError('--batch_windows must be >= 1 and --window_stride >= 0')
  try:
    videos = expand_videos(f['video'])
    trained = load_run(f['checkpoint'])
    rule = trained.in_view
    print(f'Restored step {trained.step} from {trained.workdir} on '
          f'{jax.devices()[0].platform}; Off-screen rule: '
          + ('none (no eval.json for this step)' if rule is None else
             f'{rule.rule}, threshold {rule.threshold:.4f}'
             + (f' (q{rule.quantile:g} of the peak over +-{rule.half_width} frames)'
                if rule.rule == 'peak_window' else '')),
          flush=True)
    results = []
    for path in videos:
      r = localize_video(trained, path, f['out'], fps=f['fps'], overlay=f['overlay'],
                         batch_windows=f['batch_windows'], window_stride=f['window_stride'],
                         on_missing_audio=f['on_missing_audio'])
      print(f'{path}: {r.num_frames} frames at {r.fps:g} fps (model {r.model_fps:g} fps), '
            f'max raw score {float(r.raw_max.max()):.3f}'
            + (f' -> {r.overlay_path}' if r.overlay_path else ''), flush=True)
      results.append(r)
    paths = write_outputs(f['out'], results, trained, f['checkpoint'])
  except (LocalizeError, BadExample) as e:
    cli.fail(str(e))
  print('wrote', ', '.join(paths.values()))


def run():
  app.run(functools.partial(main, _define_flags()))


if __name__ == '__main__':
  run()
