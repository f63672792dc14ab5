"""Heat maps for every frame of any video, from a trained run.

What happens to each video:
  1. Decode at the model's frame rate (`fps`; default: the rate of the
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

Overlays (`write_overlay_*`): the original frames with the map over them,
per frame min-max normalised as AVATAR scores maps; mp4 keeps the frame
count, rate, size (odd sizes padded by one pixel) and the audio.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterator, Sequence

import av
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from tavlo_datasets import media
from tavlo_jax import models
from tavlo_jax.data import audio as audio_lib
from tavlo_jax.data import sampling
from tavlo_jax.evaluation import visualize
from tavlo_jax.trained_run import Run, RunError, model_fps

CROP_UPSAMPLE = 4         # letterboxed maps: grid upsampled this much, then cropped
PNG_FRAMES = 8            # frames in the --overlay=png strip
PNG_HEIGHT = 160          # strip frames larger than this are scaled down to it
GIF_MAX_WIDTH = 480       # GIF frames wider than this are scaled down to it


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


def write_overlay_mp4(out_path: str, video_path: str, frame_maps: Sequence[np.ndarray],
                      fps: float, keep_audio: bool) -> None:
  """Overlays every frame of the original video; audio re-encoded as aac."""
  overlays = (visualize.overlay(frame, frame_maps[k])
              for k, frame in enumerate(iter_frames(video_path, fps, len(frame_maps))))
  media.write_mp4(out_path, overlays, fps, crf=20, pad_odd=True,
                  audio_from=video_path if keep_audio else None)


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
    raise RunError(
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
    raise RunError(f'{path}: no such video file')
  config = run.config
  window, size = int(config.input.num_frames), int(config.input.image_size)
  sample_rate = int(config.input.audio.sample_rate)
  rate = model_fps(config, fps)
  stride = window_stride or max(window // 2, 1)
  if not 1 <= stride <= window:
    raise RunError(f'--window_stride={window_stride}: expected 1..{window} (the '
                        'window length, input.num_frames), or 0 for half a window')
  try:  # fail before decoding anything if audio cannot be cut per frame
    audio_lib.hop_length(sample_rate, rate, 1, config.input.audio.columns_per_frame)
  except ValueError as e:
    raise RunError(f'the model cannot run at {rate:g} fps ({e}); pass an --fps '
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
      raise RunError(f'--overlay={overlay!r}; expected mp4, gif, png or none')
  return VideoResult(video_id, path, info.fps, out_count, rate, frame_maps,
                     raw_max.astype(np.float32), in_view_score, box, info.has_audio,
                     overlay_path)
