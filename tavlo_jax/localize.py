r"""Heat maps on anyone's video: where in the picture is the sound coming from.

  python -m tavlo_jax.localize --checkpoint=workdirs/tavlo --video='clips/*.mp4' \
      [--out=localize_out] [--overlay=mp4|gif|png|none] [--fps=8] \
      [--batch_windows=8] [--on_missing_audio=error|silence]

--checkpoint is a training workdir (holding `config.json` and `checkpoints/`;
the newest step is used) or one `checkpoints/<step>` folder. The model is
built from the config stored with the run, never from a config file on disk,
so a checkpoint trained with any config just works.

What happens to each video:
  1. Decode at the model's frame rate (`--fps`; default: the rate of the
     dataset the run trained on) by timestamp, so a variable-frame-rate file
     works; audio is resampled to the run's sample rate, mono.
  2. Letterbox each frame into the model's square input (scale the long side
     to `input.image_size`, pad the short side with black). Why letterbox and
     not a centre crop: a crop would hide the top and bottom of a portrait
     video, exactly where a speaker's face or an instrument may be, and the
     map must cover the whole picture. Small videos are scaled up.
  3. Slide windows of T = `input.num_frames` frames over the whole video
     (stride T/2; the last window is moved back to end on the last frame)
     with each window's audio cut as in training (WORKSPACE.md "Audio
     alignment"), run them in batches, and average the maps of the windows
     that share a frame. A video shorter than T gets one window padded with
     black frames and silence, as evaluation pads.
  4. For each frame of the ORIGINAL video (its own frame rate and size), take
     the map of the model frame nearest in time.

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

import copy
import csv
import dataclasses
import fractions
import functools
import glob
import json
import logging as logging_std
import os
from typing import Callable, Iterator, Sequence

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from tavlo_datasets import media
from tavlo_datasets.robustness import BadExample
from tavlo_jax import cli, config_lib, models
from tavlo_jax.data import audio as audio_lib
from tavlo_jax.data import sampling
from tavlo_jax.evaluation import evaluator, visualize

CROP_UPSAMPLE = 4         # letterboxed maps: grid upsampled this much, then cropped
PNG_FRAMES = 8            # frames in the --overlay=png strip
PNG_HEIGHT = 160          # strip frames larger than this are scaled down to it
GIF_MAX_WIDTH = 480       # GIF frames wider than this are scaled down to it


class LocalizeError(ValueError):
  """Bad input (checkpoint, config, video, flag), with what was expected."""


# ---------------------------------------------------------------------------
# The run: stored config + restored weights
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  config: ml_collections.ConfigDict
  variables: dict                  # {'params': ..., 'batch_stats'?: ...}
  step: int
  workdir: str
  in_view: InView | None           # calibrated Off-screen rule, if any


def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, 'state'))


def find_checkpoint(checkpoint: str) -> tuple[str, str, int]:
  """--checkpoint -> (workdir with config.json, step dir, step)."""
  if not os.path.isdir(checkpoint):
    raise LocalizeError(f'--checkpoint={checkpoint!r} is not a directory '
                        '(expected a training workdir or checkpoints/<step>)')
  checkpoint = os.path.abspath(checkpoint)
  if _is_step_dir(checkpoint):
    step_dir = checkpoint
  else:
    root = checkpoint
    if os.path.isdir(os.path.join(root, 'checkpoints')):
      root = os.path.join(root, 'checkpoints')
    # Only finalised steps: Orbax renames a step dir to its bare number when
    # the save completed; half-written ones carry a tmp suffix.
    steps = sorted(int(n) for n in os.listdir(root)
                   if _is_step_dir(os.path.join(root, n)))
    if not steps:
      raise LocalizeError(f'--checkpoint={checkpoint!r}: no finished checkpoint '
                          f'step (a <step>/state folder) in {root}')
    step_dir = os.path.join(root, str(steps[-1]))
  # config.json sits in the workdir, two levels above <step>/ (main writes it).
  workdir = step_dir
  for _ in range(3):
    workdir = os.path.dirname(workdir)
    if os.path.exists(os.path.join(workdir, 'config.json')):
      return workdir, step_dir, int(os.path.basename(step_dir))
  raise LocalizeError(
      f'--checkpoint={checkpoint!r}: no config.json in the run folders above '
      f'{step_dir} (tavlo_jax.main writes <workdir>/config.json; the model is '
      'built from it)')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's stored config; fields added to the code since it was written
  take their defaults (a new switch defaults to the old behaviour)."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise LocalizeError(f'{path}: cannot read the run config ({e})') from None
  for key in ('input', 'model', 'dataset'):
    if key not in config:
      raise LocalizeError(f'{path}: missing config section {key!r}')
  filled = _fill_defaults(config, config_lib.base_config())
  if filled:
    logging.warning('%s predates config fields %s; using their defaults.', path, filled)
  # Sequence-parallel attention needs the training mesh; the plain kernel has
  # the same parameters and gives the same maps on one device.
  if config.model.attention_impl in ('ring', 'all_to_all'):
    config.model.attention_impl = 'xla'
  return config


def _fill_defaults(config, defaults, prefix: str = '') -> list[str]:
  filled = []
  for key, value in defaults.items():
    if key not in config:
      config[key] = copy.deepcopy(value)
      filled.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      filled += _fill_defaults(config[key], value, f'{prefix}{key}.')
  return filled


def restore_variables(step_dir: str) -> tuple[dict, int]:
  """params/batch_stats of a TrainState checkpoint onto the default device.

  Restored from the checkpoint's own metadata (no target state), so it loads
  whatever mesh or device kind it was saved from; the optimizer state is left
  on disk.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(path).item_metadata.tree
    wanted = {k: meta[k] for k in ('params', 'batch_stats', 'step') if k in meta}
    if 'params' not in wanted:
      raise LocalizeError(f'{path}: the checkpoint has no params')
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
    restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device),
                                wanted)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except LocalizeError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore errors
    raise LocalizeError(f'{path}: cannot restore the checkpoint '
                        f'({type(e).__name__}: {str(e).splitlines()[0][:300]})'
                        ) from None
  variables = {'params': restored['params']}
  if restored.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
  step = int(restored['step']) if 'step' in restored else -1
  return variables, step


def _check_matches(config, variables, workdir: str) -> None:
  """The weights must fit the stored config; say where they do not."""
  model = models.build_model(config)
  t, s = config.input.num_frames, config.input.image_size
  cols = t * config.input.audio.columns_per_frame
  expected = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, t, s, s, 3), jnp.uint8),
      jnp.zeros((1, cols, audio_lib.feature_bins(config.input.audio)),
                jnp.float32))))['params']
  want = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(variables['params'])}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise LocalizeError(
        f'the checkpoint does not fit {workdir}/config.json (first '
        f'differences, path and shape: {diff}); was config.json overwritten '
        'by another run?')


@dataclasses.dataclass(frozen=True)
class InView:
  """The run's Off-screen rule ("is the sound's source in view?") with the
  threshold calibrated on validation for exactly these weights."""
  rule: str                  # 'raw_max' | 'peak_window' (config.eval.offscreen_rule)
  threshold: float
  half_width: int = 0        # peak_window: model frames on each side
  quantile: float = 1.0      # peak_window: pooled by this quantile

  def scores(self, raw_max: np.ndarray, raw_mean: np.ndarray) -> np.ndarray:
    """Per model frame of one video, the score compared with `threshold`."""
    if self.rule == 'raw_max':
      return np.asarray(raw_max, np.float64)
    n = len(raw_max)       # one clip: the video's model frames, in order
    return evaluator.peak_window(
        {'clip_index': np.zeros(n, int), 'frame_index': np.arange(n),
         'raw_max': raw_max, 'raw_mean': raw_mean}, (self.half_width, self.quantile))


def _in_view_rule(workdir: str, step: int) -> InView | None:
  """The Off-screen rule the run's evaluation calibrated for these weights."""
  path = os.path.join(workdir, 'eval', f'step_{step}', 'eval.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    settings = json.load(f).get('settings', {})
  calibration = settings.get('calibration') or {}
  if (settings.get('offscreen_rule') == 'peak_window'
      and calibration.get('window_threshold') is not None):
    return InView('peak_window', float(calibration['window_threshold']),
                  int(settings['offscreen_window_half_width']),
                  float(settings['offscreen_window_quantile']))
  thr = calibration.get('raw_threshold')
  return None if thr is None else InView('raw_max', float(thr))


def load_run(checkpoint: str) -> Run:
  workdir, step_dir, step = find_checkpoint(checkpoint)
  config = load_config(workdir)
  variables, stored_step = restore_variables(step_dir)
  _check_matches(config, variables, workdir)
  step = stored_step if stored_step >= 0 else step
  return Run(config, variables, step, workdir, _in_view_rule(workdir, step))


def model_fps(config, fps_flag: float | None = None) -> float:
  """Frames per second the model sees: the flag, or the run's training rate.

  The config has no frame-rate field, so the rate comes from the run's
  dataset builder config (every builder decodes at a fixed `fps`), divided by
  `input.frame_stride` (a clip frame spans that many stored frames).
  """
  if fps_flag:
    if fps_flag <= 0:
      raise LocalizeError(f'--fps must be positive, got {fps_flag}')
    return float(fps_flag)
  stride = int(config.input.get('frame_stride', 1))
  if config.input.get('fps'):            # a config that records its rate
    return float(config.input.fps) / stride
  d = config.dataset
  fps = None
  try:
    import importlib  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    importlib.import_module(f'tavlo_datasets.{d.name}')
    builder_config = tfds.builder_cls(d.name).builder_configs[d.builder_config]
    fps = getattr(builder_config, 'fps', None) or getattr(
        getattr(builder_config, 'synth', None), 'fps', None)
  except Exception:  # pylint: disable=broad-except  # unknown dataset: ask for --fps
    pass
  if not fps:
    raise LocalizeError(
        f'cannot tell the frame rate the run trained at (dataset '
        f'{d.name}/{d.builder_config} is not a known builder config); '
        'pass --fps')
  return float(fps) / stride


# ---------------------------------------------------------------------------
# Geometry: letterbox into the model's square input, and back
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Letterbox:
  size: int      # S, the model's square input
  top: int       # the picture's place inside the S x S input
  left: int
  height: int
  width: int

  @property
  def full(self) -> bool:
    return self.height == self.size and self.width == self.size


def letterbox_geometry(width: int, height: int, size: int) -> Letterbox:
  scale = size / max(width, height)
  h = min(size, max(1, round(height * scale)))
  w = min(size, max(1, round(width * scale)))
  return Letterbox(size, (size - h) // 2, (size - w) // 2, h, w)


def letterbox(frames: np.ndarray, box: Letterbox) -> np.ndarray:
  """uint8 [N, box.height, box.width, 3] -> [N, S, S, 3] on black."""
  out = np.zeros((len(frames), box.size, box.size, 3), np.uint8)
  out[:, box.top:box.top + box.height, box.left:box.left + box.width] = frames
  return out


def crop_to_picture(maps: np.ndarray, box: Letterbox) -> np.ndarray:
  """[N, h, w] maps of the square input -> maps of the picture alone."""
  if box.full:
    return maps
  n, gh, gw = maps.shape
  up = np.asarray(models.upsample_heatmap(
      jnp.asarray(maps), (gh * CROP_UPSAMPLE, gw * CROP_UPSAMPLE)))
  sy, sx = gh * CROP_UPSAMPLE / box.size, gw * CROP_UPSAMPLE / box.size
  y0, x0 = int(round(box.top * sy)), int(round(box.left * sx))
  y1 = max(y0 + 1, int(round((box.top + box.height) * sy)))
  x1 = max(x0 + 1, int(round((box.left + box.width) * sx)))
  return up[:, y0:y1, x0:x1]


# ---------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------

def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
  """First frames of windows covering [0, num_frames); the last ends at the end."""
  if num_frames <= window:
    return [0]
  starts = list(range(0, num_frames - window + 1, stride))
  if starts[-1] != num_frames - window:
    starts.append(num_frames - window)
  return starts


PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def blended_maps(predict: PredictFn, frames: np.ndarray, waveform: np.ndarray, *,
                 window: int, stride: int, fps: float, sample_rate: int,
                 batch_windows: int, audio_block: str = 'centred', desc: str = '',
                 progress: bool = True) -> np.ndarray:
  """Per-frame maps [N, h, w]: the average over the windows holding the frame.

  predict: (frames uint8 [B, T, S, S, 3], waveform f32 [B, T*spf]) -> maps
    [B, T, h, w]. Every call gets exactly `batch_windows` windows (the last
    batch is padded), so it compiles once.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(frames)
  spf = audio_lib.samples_per_frame(sample_rate, fps, 1)
  starts = window_starts(n, window, stride)
  total = count = None
  with tqdm(total=len(starts), desc=desc, unit='window', disable=not progress,
            leave=False) as bar:
    for b in range(0, len(starts), batch_windows):
      chunk = starts[b:b + batch_windows]
      padded = chunk + [chunk[-1]] * (batch_windows - len(chunk))
      clip_frames = np.stack([sampling.slice_padded(frames, s, window)
                              for s in padded])
      clip_audio = np.stack([sampling.slice_padded(
          waveform, sampling.audio_window_start(s, fps, sample_rate, 1, audio_block),
          window * spf) for s in padded])
      heat = np.asarray(predict(clip_frames, clip_audio), np.float64)
      if total is None:
        total = np.zeros((n,) + heat.shape[2:], np.float64)
        count = np.zeros((n,), np.int64)
      for i, s in enumerate(chunk):
        m = min(window, n - s)
        total[s:s + m] += heat[i, :m]
        count[s:s + m] += 1
      bar.update(len(chunk))
  return (total / count[:, None, None]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _jitted_predict(config_json: str):
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = models.build_model(config)

  @jax.jit
  def predict(variables, frames, waveform):
    # Same log-mel as the train/eval step computes on device.
    logmel = audio_lib.log_features_jnp(waveform, config)
    return model.apply(variables, frames, logmel, train=False)['heatmap']
  return predict


def make_predict(run: Run) -> PredictFn:
  predict = _jitted_predict(run.config.to_json())
  return lambda frames, waveform: np.asarray(predict(run.variables, frames, waveform))


# ---------------------------------------------------------------------------
# Video in, overlays out
# ---------------------------------------------------------------------------

def iter_frames(path: str, fps: float, count: int) -> Iterator[np.ndarray]:
  """`count` RGB frames at the original size, frame k = the source frame
  nearest to time k / fps (the earlier on a tie), as `media.read_video`
  picks them, but streamed: an HD video never sits in memory whole."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    k, previous, rgb = 0, None, None
    for frame in container.decode(stream):
      t = frame.time - start
      if previous is not None:
        while k < count and k / fps <= (previous[0] + t) / 2:
          rgb = rgb if rgb is not None else previous[1].to_ndarray(format='rgb24')
          yield rgb
          k += 1
      previous, rgb = (t, frame), None
    while k < count and previous is not None:
      rgb = rgb if rgb is not None else previous[1].to_ndarray(format='rgb24')
      yield rgb
      k += 1


def _even(image: np.ndarray) -> np.ndarray:
  """yuv420p needs even sizes: repeat the last row/column when odd."""
  h, w = image.shape[:2]
  return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode='edge')


def write_overlay_mp4(out_path: str, video_path: str, frame_maps: Sequence[np.ndarray],
                      fps: float, keep_audio: bool) -> None:
  """Overlays every frame of the original video; audio re-encoded as aac."""
  with av.open(video_path) as src, av.open(out_path, 'w') as out:
    # Every stream must exist before the first packet is muxed.
    codec = src.streams.video[0].codec_context
    video = out.add_stream('libx264', rate=fractions.Fraction(fps).limit_denominator(1001))
    video.height, video.width = codec.height + codec.height % 2, codec.width + codec.width % 2
    video.pix_fmt, video.options = 'yuv420p', {'crf': '20'}
    source = src.streams.audio[0] if keep_audio else None
    if source is not None:
      audio = out.add_stream('aac', rate=source.codec_context.sample_rate,
                             layout=source.codec_context.layout.name)
    for k, frame in enumerate(iter_frames(video_path, fps, len(frame_maps))):
      image = _even(visualize.overlay(frame, frame_maps[k]))
      av_frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      av_frame.pts = k
      out.mux(video.encode(av_frame))
    out.mux(video.encode())
    if source is not None:
      _copy_audio(src, source, out, audio)


def _copy_audio(src, source, out, audio) -> None:
  """Re-encodes the source's audio, cut to the stream's own duration.

  Why the cut: the decoder returns whole codec frames (aac: 1024 samples),
  padding included; re-encoding that padding would make the audio longer
  than the original each time a file goes through here.
  """
  rate = source.codec_context.sample_rate
  layout = source.codec_context.layout.name
  duration = (source.duration * source.time_base if source.duration is not None
              else src.duration / av.time_base if src.duration is not None else None)
  remaining = int(round(duration * rate)) if duration is not None else None
  resampler = av.AudioResampler(format='fltp', layout=layout, rate=rate)

  def resampled():
    for frame in src.decode(source):
      yield from resampler.resample(frame)
    yield from resampler.resample(None)       # what the resampler holds back

  done = 0
  for frame in resampled():
    samples = frame.to_ndarray()                        # [channels, n]
    if remaining is not None:
      samples = samples[:, :max(remaining - done, 0)]
    if not samples.shape[1]:
      break
    chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format='fltp',
                                       layout=layout)
    # Timestamps from 0 in samples: the audio starts with the video.
    chunk.sample_rate, chunk.pts = rate, done
    chunk.time_base = fractions.Fraction(1, rate)
    done += samples.shape[1]
    out.mux(audio.encode(chunk))
  out.mux(audio.encode())


def _small(image: np.ndarray, max_height: int = 0, max_width: int = 0) -> np.ndarray:
  h, w = image.shape[:2]
  scale = min(max_height / h if max_height else 1, max_width / w if max_width else 1)
  if scale >= 1:
    return image
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def write_overlay_gif(out_path: str, video_path: str, frame_maps, fps: float) -> None:
  images = [Image.fromarray(visualize.overlay(_small(f, max_width=GIF_MAX_WIDTH), frame_maps[k]))
            for k, f in enumerate(iter_frames(video_path, fps, len(frame_maps)))]
  images[0].save(out_path, save_all=True, append_images=images[1:],
                 duration=max(int(round(1000 / fps)), 20), loop=0)


def write_overlay_png(out_path: str, video_path: str, frame_maps, fps: float) -> None:
  """A strip: evenly spaced frames on top, their overlays below."""
  picks = np.unique(np.linspace(0, len(frame_maps) - 1, PNG_FRAMES).round().astype(int))
  wanted = set(picks.tolist())
  frames = [_small(f, max_height=PNG_HEIGHT)
            for k, f in enumerate(iter_frames(video_path, fps, len(frame_maps)))
            if k in wanted]
  grid = visualize.clip_grid(frames, [frame_maps[k] for k in picks])
  Image.fromarray(grid).save(out_path)


OVERLAY_WRITERS = {'gif': write_overlay_gif, 'png': write_overlay_png}


# ---------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class VideoResult:
  video_id: str
  path: str
  fps: float                 # of the original video (and of the overlay)
  num_frames: int            # of the original video (and of the overlay)
  model_fps: float
  frame_maps: list           # per original frame: its map (views, not copies)
  raw_max: np.ndarray        # f32 [num_frames]
  in_view_score: np.ndarray | None   # f32 [num_frames], under run.in_view
  letterbox: Letterbox
  has_audio: bool
  overlay_path: str | None


def _read_waveform(path: str, info, sample_rate: int, on_missing_audio: str) -> np.ndarray:
  if info.has_audio:   # over the video's span, as the builders store it
    return media.audio_for_video(path, media.read_audio(path, sample_rate),
                                 sample_rate, info.duration)
  if on_missing_audio != 'silence':
    raise LocalizeError(
        f'{path}: the file has no audio stream, so there is no sound to '
        'localize; pass --on_missing_audio=silence to run it against silence')
  logging.warning('%s has no audio stream: localizing against silence '
                  '(--on_missing_audio=silence); the maps show what the model '
                  'matches to silence.', path)
  return np.zeros((int(round(info.duration * sample_rate)),), np.float32)


def localize_video(run: Run, path: str, out_dir: str | None = None, *,
                   fps: float | None = None, overlay: str = 'mp4',
                   batch_windows: int = 8, window_stride: int = 0,
                   on_missing_audio: str = 'error', progress: bool = True,
                   predict: PredictFn | None = None) -> VideoResult:
  """Maps for every frame of `path`; writes its overlay into out_dir."""
  if not os.path.isfile(path):
    raise LocalizeError(f'{path}: no such video file')
  config = run.config
  window, size = int(config.input.num_frames), int(config.input.image_size)
  sample_rate = int(config.input.audio.sample_rate)
  rate = model_fps(config, fps)
  stride = window_stride or max(window // 2, 1)
  if not 1 <= stride <= window:
    raise LocalizeError(f'--window_stride={window_stride}: expected 1..{window} (the '
                        'window length, input.num_frames), or 0 for half a window')
  try:  # fail before decoding anything if audio cannot be cut per frame
    audio_lib.hop_length(sample_rate, rate, 1, config.input.audio.columns_per_frame)
  except ValueError as e:
    raise LocalizeError(f'the model cannot run at {rate:g} fps ({e}); pass an --fps '
                        f'that divides {sample_rate} samples/s into whole frames, '
                        'ideally the rate it trained at') from None
  info = media.video_info(path)                 # BadExample: corrupt / no video
  box = letterbox_geometry(info.width, info.height, size)
  if max(info.width, info.height) < size:
    logging.warning('%s is %dx%d, smaller than the model input (%d px): scaled '
                    'up, so the model sees a blurry picture.', path, info.width,
                    info.height, size)
  waveform = _read_waveform(path, info, sample_rate, on_missing_audio)
  frames, _, _ = media.read_video(path, rate, size=(box.height, box.width))
  video_id = os.path.splitext(os.path.basename(path))[0]
  maps = blended_maps(predict or make_predict(run), letterbox(frames, box), waveform,
                      window=window, stride=stride,
                      fps=rate, sample_rate=sample_rate, batch_windows=batch_windows,
                      audio_block=config.input.audio.block, desc=video_id,
                      progress=progress)
  maps = crop_to_picture(maps, box)

  # Original frame k (time k / fps) shows the model frame nearest in time.
  out_count = len(media.output_times(info.duration, info.fps))
  nearest = np.floor(np.arange(out_count) * rate / info.fps + 0.5).astype(int)
  nearest = np.minimum(nearest, len(maps) - 1)
  frame_maps = [maps[j] for j in nearest]
  flat = maps.reshape(len(maps), -1).astype(np.float64)
  model_max = flat.max(1)
  raw_max = model_max[nearest]
  # The Off-screen score over the model's frames (a window rule pools them
  # in the model's time), then shown on the original frames.
  in_view_score = (None if run.in_view is None else
                   run.in_view.scores(model_max, flat.mean(1))[nearest].astype(np.float32))

  overlay_path = None
  if out_dir and overlay != 'none':
    os.makedirs(out_dir, exist_ok=True)
    overlay_path = os.path.join(out_dir, f'{video_id}.overlay.{overlay}')
    if overlay == 'mp4':
      write_overlay_mp4(overlay_path, path, frame_maps, info.fps, info.has_audio)
    elif overlay in OVERLAY_WRITERS:
      OVERLAY_WRITERS[overlay](overlay_path, path, frame_maps, info.fps)
    else:
      raise LocalizeError(f'--overlay={overlay!r}; expected mp4, gif, png or none')
  return VideoResult(video_id, path, info.fps, out_count, rate, frame_maps,
                     raw_max.astype(np.float32), in_view_score, box, info.has_audio,
                     overlay_path)


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


class _QuietOrbax(logging_std.Filter):
  """Orbax narrates every restore (and warns about a metadata file that
  TrainState checkpoints never have); a user of this tool needs none of it."""

  def filter(self, record):
    return record.levelno >= logging_std.ERROR or 'orbax' not in record.pathname


@cli.user_errors()
def main(flag, argv):
  logging.get_absl_handler().addFilter(_QuietOrbax())
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
