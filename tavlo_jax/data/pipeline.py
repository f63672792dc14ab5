"""grain pipelines: TFDS array_record records -> host batches -> global arrays.

Dataset-agnostic: every function takes `config` and a random-access data
source (`tfds.data_source(...)` / `builder.as_data_source(split)`) of records
in the shared schema (datasets/schema.py), and never asks which dataset it is.

Training (`make_train_iterator`)
  record indices -> one global stream shuffled with the same seed on every
  process, reshuffled every epoch, repeated forever -> this process's rows of
  each global batch -> cut a clip + augment -> batch. The global batches do
  not depend on the number of processes (2 processes x 4 devices train
  exactly like 1 x 8), and within an epoch the processes read disjoint
  records that together cover the split. The randomness of an example is a function of (seed, epoch,
  record index) only (`np.random.SeedSequence`), so it does not depend on
  the number of processes or workers.
  Batching happens BEFORE `to_iter_dataset`/`mp_prefetch`: a worker builds
  whole batches (batch k = stream elements [k*B, (k+1)*B)), so the batches
  are the same for any `num_workers`, and the iterator state is one small
  JSON dict. Saving it: `grain.checkpoint.CheckpointSave(iterator)` next to
  the model in an Orbax `Composite`; `CheckpointRestore` resumes bit-exactly
  (a state saved with N workers restores into an iterator with N workers).

Evaluation (`make_eval_batches`)
  Every host lists the same deterministic windows over the whole split
  (sampling.eval_windows), pads the list with `valid=False` examples to a
  multiple of the global eval batch, and takes windows h, h+P, ...: every
  host runs the same number of batches and every annotated frame is scored
  exactly once in the split.

`make_global_batch` turns a host batch into global `jax.Array`s with the
batch dimension sharded over the mesh's data axes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from tavlo_datasets import clip_storage
from tavlo_jax.data import audio as audio_lib
from tavlo_jax.data import augment as augment_lib
from tavlo_jax.data import sampling

# Threads that build batches ahead of the consumer when num_workers == 0:
# numpy/PIL/FFT/libavcodec release the GIL for much of the work, and the
# project's machines have 2 cores. Inside each grain worker one thread: the
# workers are the parallelism, and a second thread per worker only added
# GIL hand-offs (2 workers on 2 cores, paper-scale clips, 4 alternating
# rounds: 95.0 clips per CPU-second with one thread each, 84.6 with two).
READ_THREADS = 2
WORKER_READ_THREADS = 1


def host_batch_size(global_batch: int, process_count: int,
                    field: str = 'input.batch_size') -> int:
  if global_batch % process_count:
    raise ValueError(f'config.{field}={global_batch} is not divisible by the '
                     f'{process_count} processes; it is the GLOBAL batch.')
  return global_batch // process_count


def _process_layout(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in '
                     f'[0, {process_count})')
  return process_index, process_count


def _audio_outputs(waveform: np.ndarray, config, spec_rng=None) -> dict:
  """`audio` (host log-mel) or `waveform` (+ SpecAugment masks) of a clip."""
  a = config.input.audio
  num_columns = config.input.num_frames * a.columns_per_frame
  masks = None
  if spec_rng is not None:
    masks = augment_lib.sample_spec_masks(spec_rng, num_columns, audio_lib.feature_bins(a),
                                          config.input.augment)
  if a.features_on == 'host':
    logmel = audio_lib.log_features_np(waveform, a, num_columns)
    if masks is not None:
      logmel = audio_lib.apply_spec_masks(logmel, *masks)
    return {'audio': logmel}
  if a.features_on == 'device':
    out = {'waveform': waveform.astype(np.float32)}
    if masks is not None:
      out['spec_time_mask'], out['spec_freq_mask'] = masks
    return out
  raise ValueError(f"config.input.audio.features_on={a.features_on!r}; "
                   "expected 'host' or 'device'")


@functools.cache
def reuse_freed_memory() -> bool:
  """Lets this process reuse freed blocks of up to 32 MB (glibc's mallopt).

  Why: every example allocates and frees buffers of 0.15-2.5 MB (the record
  read, each decoded RGB frame, the clip). By default glibc serves each with
  a fresh mmap (or grows and trims the heap around it), and the kernel
  zero-fills every page on its first touch: about a quarter of the CPU time
  of a paper-scale example (benchmarks/paper_data_path.py, BENCHMARKS.md).
  A fixed mmap threshold of 32 MB and a trim threshold of 512 MB keep those
  blocks in the heap for the next example: the process holds on to up to
  that much freed memory. Nothing else changes (same bytes, same batches).
  Returns False where the C library has no mallopt (not glibc).
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3   # <malloc.h>
  return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(
      mallopt(m_trim_threshold, 512 << 20))


# ---- training ---------------------------------------------------------------


class _GlobalStreamSlice:
  """Local element j of process p -> (epoch, record) of the GLOBAL stream.

  Every process shuffles the whole split with the same seed (one global
  stream, reshuffled each epoch) and takes its rows of each global batch:
  rows [p*b, (p+1)*b) of batch k are global elements k*B + p*b + i. So the
  global batches, hence training, are identical for any number of processes,
  and within an epoch the processes still read disjoint records.
  """

  def __init__(self, stream, num_records, local_batch, global_batch, process_index):
    self.stream, self.n = stream, num_records
    self.b, self.B, self.p = local_batch, global_batch, process_index

  def __call__(self, j: int):
    g = (j // self.b) * self.B + self.p * self.b + (j % self.b)
    return g // self.n, int(self.stream[g])


CLIP_STARTS = ('any', 'key_frames')


def _random_start(record, config, rng: np.random.Generator) -> int:
  """A training clip's first frame, uniform over the starts that fit: any
  stored frame, or with `input.clip_starts='key_frames'` only frames where
  decoding starts (clip_storage.key_frame_step: saves decoding the frames
  before the clip in its H.264 segment, ~30% of the decoding at T = 16 =
  the segment length, for 1/16 of the distinct clip starts)."""
  num_stored = clip_storage.num_frames(record)
  where = config.input.clip_starts
  if where == 'any':
    return sampling.random_first_frame(num_stored, config, rng)
  if where != 'key_frames':
    raise ValueError(f'config.input.clip_starts={where!r}; expected one of '
                     f'{CLIP_STARTS}')
  step = clip_storage.key_frame_step(record)
  span = (config.input.num_frames - 1) * config.input.frame_stride + 1
  return step * int(rng.integers(0, max(num_stored - span, 0) // step + 1))


class _TrainExample:
  """(epoch, record index) -> one augmented training clip (picklable)."""

  def __init__(self, data_source, config, seed: int):
    self.source, self.config, self.seed = data_source, config, int(seed)

  def __call__(self, item) -> dict[str, np.ndarray]:
    reuse_freed_memory()   # once per process: here, and in each grain worker
    epoch, record_index = item
    config = self.config
    aug = config.input.augment
    record = self.source[record_index]
    # Independent streams, so switching one augmentation off leaves the
    # others (and the clip start) unchanged.
    start_rng, video_rng, audio_rng = (
        np.random.default_rng(s) for s in
        np.random.SeedSequence([self.seed, epoch, record_index]).spawn(3))
    first = _random_start(record, config, start_rng)
    # The crop box and flip are drawn once the decoder knows the frame size;
    # the decoder crops, scales and flips as it converts to RGB (or only
    # crops, with 'yuv420_unscaled': the train step scales and flips).
    clip = sampling.cut_clip(
        record, first, config, size=config.input.image_size,
        geometry=augment_lib.ClipGeometry(video_rng, aug),
        frame_format=config.input.frame_format,
        window=tuple(config.input.unscaled_window))
    spec_rng = audio_rng if aug.enabled else None
    return {
        **augment_lib.jitter_video(clip.frames, video_rng, aug),
        **_audio_outputs(clip.waveform, config, spec_rng),
        'clip_index': np.int32(record_index),
        'frame_index': clip.frame_index,
    }


def make_train_dataset(config, data_source, *, process_index=None,
                       process_count=None, seed=None) -> grain.IterDataset:
  """The infinite training IterDataset of host batches for this process."""
  process_index, process_count = _process_layout(process_index, process_count)
  seed = config.seed if seed is None else seed
  batch = host_batch_size(config.input.batch_size, process_count)
  num_records = len(data_source)
  if num_records < process_count:
    raise ValueError(f'the training split has {num_records} records: too few '
                     f'for {process_count} processes')
  stream = grain.MapDataset.range(num_records).shuffle(
      seed=seed + config.input.shuffle_buffer_seed).repeat()
  ds = grain.MapDataset.range(len(stream) // process_count).map(_GlobalStreamSlice(
      stream, num_records, batch, batch * process_count, process_index))
  ds = ds.map(_TrainExample(data_source, config, seed))
  ds = ds.batch(batch, drop_remainder=True)
  return _to_iter(ds, config)


def make_train_iterator(config, data_source, *, process_index=None,
                        process_count=None, seed=None) -> grain.DatasetIterator:
  """Iterator of host batches; `get_state()`/`set_state()` for resumption."""
  return iter(make_train_dataset(config, data_source,
                                 process_index=process_index,
                                 process_count=process_count, seed=seed))


def train_batch_spec(config, fps: float) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one GLOBAL training batch, without any data.

  Runs the real example code (`_TrainExample`) on one blank record stored at
  `fps` frames/s, so the keys, shapes and dtypes are exactly what
  `make_train_iterator` yields, with the global batch size in front. For
  ahead-of-time compiles (`tavlo_jax.aot_compile`).
  """
  t, s = config.input.num_frames, config.input.frame_stride
  num_stored = (t - 1) * s + 1
  sr = int(config.input.audio.sample_rate)
  size = int(config.input.image_size)
  blank = {
      'video_id': 'blank',
      'frames': np.zeros((num_stored, size, size, 3), np.uint8),
      'waveform': np.zeros((int(np.ceil((num_stored + s) * sr / fps)),), np.float32),
      'sample_rate': np.int32(sr),
      'fps': np.float32(fps),
  }
  example = _TrainExample([blank], config, config.seed)((0, 0))
  batch = int(config.input.batch_size)
  return {k: jax.ShapeDtypeStruct((batch, *np.shape(v)), np.asarray(v).dtype)
          for k, v in example.items()}


def _to_iter(ds: grain.MapDataset, config) -> grain.IterDataset:
  prefetch = max(int(config.input.prefetch), 1)
  workers = int(config.input.num_workers)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=WORKER_READ_THREADS if workers > 0 else READ_THREADS,
      prefetch_buffer_size=prefetch))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch))
  return it


# ---- evaluation -------------------------------------------------------------


def mask_shape_of(data_source, config) -> tuple[int, int]:
  """(MH, MW) of the annotation masks: from the dataset's features."""
  try:
    shape = data_source.dataset_info.features['instances']['mask'].shape
    return int(shape[0]), int(shape[1])
  except (AttributeError, KeyError, TypeError):
    pass
  size = tuple(config.eval.annotation_size)
  if size[0] > 0 and size[1] > 0:
    return size
  raise ValueError('cannot tell the mask size: the data source has no '
                   "dataset_info.features['instances']['mask'] and "
                   'config.eval.annotation_size is (0, 0)')


def plan_eval_windows(config, data_source) -> list[sampling.EvalWindow]:
  """All eval windows of the split (reads every record once; cache it)."""
  windows = []
  for r in range(len(data_source)):
    record = data_source[r]
    windows += sampling.eval_windows(
        r, clip_storage.num_frames(record), sampling.annotated_frames(record),
        config.input.num_frames, config.input.frame_stride)
  return windows


_PADDING = sampling.EvalWindow(-1, 0, ())


class _EvalExample:
  """EvalWindow -> one un-augmented clip with its annotations (picklable)."""

  def __init__(self, data_source, config, *, mask_shape, max_instances,
               samples_per_frame):
    self.source, self.config = data_source, config
    self.mask_shape, self.max_instances = mask_shape, max_instances
    self.samples_per_frame = samples_per_frame   # shapes the padding waveform

  def __call__(self, window: sampling.EvalWindow) -> dict[str, np.ndarray]:
    reuse_freed_memory()
    if window.record < 0:
      return self._padding()
    record = self.source[window.record]
    clip = sampling.cut_clip(record, window.first_frame, self.config)
    out = {
        'frames': clip_storage.resize_frames(clip.frames,
                                         self.config.input.image_size),
        **_audio_outputs(clip.waveform, self.config),
        'valid': np.bool_(True),
        'clip_index': np.int32(window.record),
        'frame_index': clip.frame_index,
    }
    out.update(sampling.window_annotations(
        record, clip.frame_index, window.owned, self.mask_shape,
        self.max_instances))
    return out

  def _padding(self) -> dict[str, np.ndarray]:
    """A silent black clip with nothing annotated, shaped like the rest."""
    c = self.config
    t, s = c.input.num_frames, c.input.image_size
    waveform = np.zeros((t * self.samples_per_frame,), np.float32)
    frame_index = np.full((t,), -1, np.int32)
    no_annotations = {'frames_annotated': {'frame_index': []},
                      'instances': {'annotation_index': []}}
    return {
        'frames': np.zeros((t, s, s, 3), np.uint8),
        **_audio_outputs(waveform, c),
        'valid': np.bool_(False),
        'clip_index': np.int32(-1),
        'frame_index': frame_index,
        **sampling.window_annotations(no_annotations, frame_index, (),
                                      self.mask_shape, self.max_instances),
    }


@dataclasses.dataclass
class EvalBatches:
  """Re-iterable eval batches of this host (iterate once per evaluation)."""
  dataset: grain.IterDataset
  num_batches: int          # per host; the same on every host
  num_windows: int          # real (valid) windows in the whole split
  windows: Sequence[sampling.EvalWindow]   # the whole split's plan

  def __iter__(self):
    return iter(self.dataset)

  def __len__(self):
    return self.num_batches


def make_eval_batches(config, data_source, *, process_index=None,
                      process_count=None,
                      windows: Sequence[sampling.EvalWindow] | None = None
                      ) -> EvalBatches:
  """Deterministic, padded eval batches of this host (see module docstring).

  `windows`: a plan from `plan_eval_windows` to reuse (it reads the split).
  """
  process_index, process_count = _process_layout(process_index, process_count)
  if len(data_source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'the eval split {data_source!r} has no records')
  batch = host_batch_size(config.input.eval_batch_size, process_count,
                          'input.eval_batch_size')
  if windows is None:
    windows = plan_eval_windows(config, data_source)
  global_batch = batch * process_count
  num_batches = -(-len(windows) // global_batch)
  padded = list(windows) + [_PADDING] * (num_batches * global_batch -
                                         len(windows))
  mine = padded[process_index::process_count]
  # All records share one fps (else the batch could not be stacked); the
  # padding examples need it for the length of their silent audio window.
  fps, sr = sampling.record_audio_params(data_source[0], config)
  example = _EvalExample(
      data_source, config, mask_shape=mask_shape_of(data_source, config),
      max_instances=int(config.input.max_instances),
      samples_per_frame=audio_lib.samples_per_frame(
          sr, fps, config.input.frame_stride))
  ds = grain.MapDataset.source(mine).map(example).batch(batch)
  return EvalBatches(_to_iter(ds, config), num_batches, len(windows), windows)


# ---- global arrays ----------------------------------------------------------


def make_global_batch(host_batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                      data_axes: Sequence[str] = ('data', 'fsdp')):
  """Host-local numpy batch -> global jax.Arrays, batch dim over data axes.

  Process p's rows become rows [p*B, (p+1)*B) of the global batch (B = host
  batch). Axes in `data_axes` missing from the mesh are ignored. Any pytree
  of host arrays; an array that is already global is passed through.
  """
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f'mesh axes {mesh.axis_names} contain none of the data '
                     f'axes {tuple(data_axes)}')
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  def to_global(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  if isinstance(host_batch, Mapping):
    host_batch = dict(host_batch)
  return jax.tree.map(to_global, host_batch)
