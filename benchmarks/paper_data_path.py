r"""Paper-scale data path on camera-like content: storage, build, pipeline, demand.

  python benchmarks/paper_data_path.py                       # everything
  python benchmarks/paper_data_path.py --clips=4 --workers=0,1 --batches=4
  python benchmarks/paper_data_path.py --gflop_per_clip=273.6  # skip the compile
  python benchmarks/paper_data_path.py --codecs=h264:25,h264:25:8 --workers=0

1. Fixture: --clips VGGSound-like mp4s written here (tests/fixtures/
   natural_video.py: 1/f colour texture, camera pan and shake, moving
   textured blobs, sensor noise; 640x360 H.264 at 600 kbit/s, 25/30 fps;
   AAC stereo 128 kbit/s at 44.1/48 kHz), 10 s each.
2. Storage and build, per --codecs entry (`h264:<crf>[:<segment frames>]`
   or `jpeg:<quality>`): the `vggsound` builder (8 fps, short side 256,
   16 kHz, 16-bit PCM audio) from the mp4s to array_record; bytes on disk
   per second of video
   against the mp4s', and builder clips per CPU-second; the frames decoded
   for one random T=16 clip and their cost.
3. Training pipeline (`configs/paper.py:real`: 224 px, T=16, 128 mels,
   augmentation on, log-mel, the crop's scaling and flip, colour jitter and
   YUV->RGB on the device: the pipeline ships waveforms, and the crop box's
   4:2:0 planes unscaled with their jitter factors; clips start on key
   frames)
   for each --workers count: clips per CPU-second of this process and its
   grain workers together (the machine may be shared: CPU time, not wall
   time, is the per-core rate), and wall clips/s beside it. Then the
   VARIANTS (one choice of the config undone each, or grain workers with
   one or two read threads each), alternately, --rounds times each. With
   --first_round, three data paths alternately, --rounds times each, every
   run in a fresh process (0 workers): the first encoded-storage round's
   (whole RGB frames, PIL crop + resize, float64 jitter on the host,
   FLAC audio),
   today's with glibc's malloc defaults, and today's (PATHS). Then what
   limits the rate: today's example in one thread with a timer around each
   stage, and a cProfile of the first round's.
4. Demand: clips/s one accelerator consumes at 40% MFU from the FLOPs per
   clip of the compiled paper train step (`tavlo_jax.aot_compile`, batch 2
   on this CPU; --gflop_per_clip skips the compile), and the host cores each
   would need at the best measured per-core rate, in-process and with grain
   worker processes.
"""

from __future__ import annotations

import cProfile
import copy
import importlib.util
import io
import json
import os
import pathlib
import pstats
import shutil
import sys
import time

from absl import app
from absl import flags
import numpy as np
import psutil

import accelerator_peaks  # next to this script

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['paper'], 'only `paper` (224 px, T=16, 128 mels)')
flags.DEFINE_integer('clips', 6, 'fixture clips (10 s each)')
flags.DEFINE_float('seconds', 10.0, 'length of each fixture clip')
flags.DEFINE_list('codecs', ['h264:25', 'h264:25:8', 'h264:23', 'jpeg:85',
                             'jpeg:75'],
                  'frame layouts to build: h264:<crf>[:<segment frames>] or '
                  'jpeg:<quality>; the first one feeds the pipeline rows')
flags.DEFINE_bool('first_round', True, 'also measure the first-round data '
                  'path (host jitter, PIL resize), alternately with today\'s')
flags.DEFINE_integer('rounds', 3, 'alternations of the variant and '
                     'first-round rows')
flags.DEFINE_list('workers', ['0', '1', '2'], 'grain worker counts')
flags.DEFINE_integer('batches', 6, 'timed batches per pipeline row')
flags.DEFINE_integer('split_records', 10000, 'records the pipeline rows see: '
                     'the fixture clips repeated (RepeatedSource)')
flags.DEFINE_integer('batch_size', 16, 'host batch of the pipeline rows')
flags.DEFINE_integer('profile_examples', 48, 'examples in the stage timing '
                     '(and the first round\'s cProfile)')
flags.DEFINE_float('gflop_per_clip', 0.0, 'train step GFLOP per clip '
                   '(0: compile the paper step here and read its cost)')
flags.DEFINE_float('mfu', 0.4, 'model FLOP utilisation of the demand table')
flags.DEFINE_string('fixture_dir', 'out/paper_data_path',
                    'where the mp4s and the built records go')
flags.DEFINE_string('json_out', '', 'also write the results here')


def cpu_seconds() -> float:
  """User + system CPU of this process and all its live descendants."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


class Meter:
  """Wall and CPU seconds (process + descendants) of a `with` block."""

  def __enter__(self):
    self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall0
    self.cpu = cpu_seconds() - self.cpu0


def load_config(spec: str):
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('cfg', REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


# ---- 1. fixture ---------------------------------------------------------------


def write_fixture(root: pathlib.Path):
  from fixtures import natural_video  # pylint: disable=g-import-not-at-top
  specs = natural_video.fixture_specs(FLAGS.clips, FLAGS.seconds)
  manual = root / 'mp4'
  manual.mkdir(parents=True, exist_ok=True)
  for spec in specs:
    path = manual / f'{spec.name}.mp4'
    if not path.exists():
      natural_video.write_clip(path, spec)
  paths = [manual / f'{s.name}.mp4' for s in specs]
  return manual, paths, sum(s.seconds for s in specs)


# ---- 2. storage and build -----------------------------------------------------


def builder_for(codec: str, data_dir):
  from tavlo_datasets.vggsound import Builder, VggsoundConfig  # pylint: disable=g-import-not-at-top
  kind, _, value = codec.partition(':')
  if kind == 'h264':
    crf, _, segment = value.partition(':')
    options = dict(frame_codec='h264', h264_crf=int(crf or 25),
                   segment_frames=int(segment or 16))
  elif kind == 'jpeg':
    options = dict(frame_codec='jpeg', jpeg_quality=int(value or 85))
  else:
    raise app.UsageError(f'--codecs entry {codec!r}: expected '
                         'h264:<crf>[:<segment frames>] or jpeg:<quality>')
  name = codec.replace(':', '_')
  return Builder(config=VggsoundConfig(name=f'bench_{name}', ids_file='',
                                       **options), data_dir=str(data_dir))


def build(codec: str, manual, data_dir) -> tuple:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  old = pathlib.Path(builder_for(codec, data_dir).data_dir).parent
  if old.exists():
    shutil.rmtree(old)   # time a fresh build
  builder = builder_for(codec, data_dir)
  with Meter() as m:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
        file_format='array_record')
  return builder, m


def stored_bytes(builder) -> dict:
  """Bytes of the array_record files, and of frames / audio inside them."""
  from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
  files = sum(p.stat().st_size for p in pathlib.Path(builder.data_dir).glob(
      '*.array_record*'))
  frames = audio = 0
  for record in builder.as_data_source('train'):
    key = 'frames_h264' if clip_storage.storage_of(record) == 'h264' else (
        'frames_jpeg')
    frames += len(record[key])
    audio += sum(np.asarray(record[k]).nbytes for k in record
                 if k.startswith('waveform'))
  return dict(files=files, frames=frames, audio=audio)


def decoded_frames(record, frame_index) -> int:
  """Frames the decoder produces for these clip frames: in 'h264', every
  segment touched is decoded from its key frame to the last frame used."""
  from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
  used = {int(i) for i in frame_index if i >= 0}
  if clip_storage.storage_of(record) != 'h264':
    return len(used)
  length = int(record['segment_frames'])
  last = {}
  for i in used:
    last[i // length] = max(last.get(i // length, -1), i)
  return sum(i - g * length + 1 for g, i in last.items())


def clip_decode_ms(builder, config) -> tuple[float, float]:
  """CPU ms to decode the T frames of a random clip (as RGB at the stored
  size), and the frames decoded for it on average."""
  from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import sampling  # pylint: disable=g-import-not-at-top
  source = builder.as_data_source('train')
  rng = np.random.default_rng(0)
  records = [source[i] for i in range(len(source))]
  reps = 40
  decoded = 0
  t0 = time.process_time()
  for k in range(reps):
    record = records[k % len(records)]
    first = sampling.random_first_frame(clip_storage.num_frames(record),
                                        config, rng)
    index = sampling.clip_frame_indices(
        first, config.input.num_frames, config.input.frame_stride,
        clip_storage.num_frames(record))
    clip_storage.gather_frames(record, index)
    decoded += decoded_frames(record, index)
  return 1e3 * (time.process_time() - t0) / reps, decoded / reps


def psnr_vs_source(builder, paths) -> float:
  """Mean PSNR (dB) of the stored frames against the source decoded at the
  same size and times (what the codec loses)."""
  from tavlo_datasets import clip_storage, media  # pylint: disable=g-import-not-at-top
  source = builder.as_data_source('train')
  by_id = {r['video_id'].decode(): r for r in source}
  values = []
  for path in paths[:2]:
    record = by_id[path.stem]
    n = clip_storage.num_frames(record)
    stored = clip_storage.gather_frames(record, np.arange(n))
    reference, _, _ = media.read_video(path, 8.0, stored.shape[1:3])
    mse = np.mean((stored.astype(np.float64) - reference) ** 2)
    values.append(10 * np.log10(255.0 ** 2 / mse))
  return float(np.mean(values))


# ---- 3. training pipeline -----------------------------------------------------


def paper_config():
  c = load_config('configs/paper.py:real')
  c.input.batch_size = FLAGS.batch_size
  c.input.audio.features_on = 'device'
  return c


class FirstRoundExample:
  """The training example as the first encoded-storage round built it, to
  measure against: whole frames decoded to RGB at the stored size, then PIL
  crop + resize, flip and float64 colour jitter on the host
  (`augment_video`). Same draws, same record reads as `_TrainExample`."""

  def __init__(self, data_source, config, seed: int):
    self.source, self.config, self.seed = data_source, config, int(seed)

  def __call__(self, item):
    from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
    from tavlo_jax.data import augment, pipeline, sampling  # pylint: disable=g-import-not-at-top
    t = self
    epoch, record_index = item
    aug = t.config.input.augment
    record = t.source[record_index]
    start_rng, video_rng, audio_rng = (
        np.random.default_rng(s) for s in
        np.random.SeedSequence([t.seed, epoch, record_index]).spawn(3))
    first = sampling.random_first_frame(clip_storage.num_frames(record),
                                        t.config, start_rng)
    clip = sampling.cut_clip(record, first, t.config)
    frames = augment.augment_video(clip.frames, video_rng, aug,
                                   t.config.input.image_size)
    return {
        'frames': frames,
        **pipeline._audio_outputs(clip.waveform, t.config,  # pylint: disable=protected-access
                                  audio_rng if aug.enabled else None),
        'clip_index': np.int32(record_index),
        'frame_index': clip.frame_index,
    }


# Data paths measured side by side, each in a fresh process (the malloc
# setting is per process): what the first encoded-storage round did, today's
# without and with `pipeline.reuse_freed_memory`.
PATHS = {
    'first_round': 'first round: whole RGB frames, PIL crop + resize, '
                   'float64 jitter on the host',
    'today_default_malloc': 'today, glibc malloc defaults',
    'today': 'today: scaled while decoding, jitter on the device, freed '
             'memory reused',
}


class RepeatedSource:
  """The fixture's records seen as a split of `length` records (record i is
  fixture record i mod n). grain shuffles a split with index_shuffle, whose
  cost per element is ~0.015 ms from 10k records up but 5 ms for a 6-record
  split: the bare fixture would charge the pipeline rows a cost no real
  dataset has. Every record is still read and decoded each time."""

  def __init__(self, source, length: int):
    self.source, self.length = source, int(length)

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.source[int(index) % len(self.source)]


class FlacAudio:
  """A source of 16-bit PCM records seen as records with FLAC audio (the
  builders' `audio_codec='flac'`), each re-encoded once and kept, so that
  the rows compare only what a reader pays: the FLAC window against the
  PCM slice (the read of the record itself stays the PCM record's)."""

  def __init__(self, source):
    self.source, self.flac = source, {}

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
    record = dict(self.source[index])
    pcm = record.pop('waveform_pcm16')
    key = record['video_id']
    if key not in self.flac:
      self.flac[key] = clip_storage.encode_flac(
          pcm.astype(np.float32) / 32767, int(record['sample_rate']))
    record['waveform_flac'] = self.flac[key]
    return record


def wait_until_idle(poll_s: float = 0.25, timeout_s: float = 60.0) -> None:
  """Returns once this process and its children have used (almost) no CPU
  for `poll_s`. A grain iterator that is dropped keeps its prefetch threads
  (and worker processes) running until their buffers are full: ~0.25 CPU-s
  here, which the next measurement would otherwise be charged."""
  end = time.monotonic() + timeout_s
  while time.monotonic() < end:
    before = cpu_seconds()
    time.sleep(poll_s)
    if cpu_seconds() - before < 0.02 * poll_s:
      return


def pipeline_rate(config, source, workers: int, batches: int,
                  path: str = 'today', split_records: int = 10000) -> dict:
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  wait_until_idle()
  c = copy.deepcopy(config)
  c.input.num_workers = workers
  source = RepeatedSource(source, max(split_records, len(source)))
  example = (FirstRoundExample if path == 'first_round'
             else pipeline._TrainExample)  # pylint: disable=protected-access
  reuse = (pipeline.reuse_freed_memory if path == 'today'
           else lambda: False)
  with mock.patch.object(pipeline, '_TrainExample', example), \
       mock.patch.object(pipeline, 'reuse_freed_memory', reuse):
    it = pipeline.make_train_iterator(c, source, process_index=0,
                                      process_count=1)
    for _ in range(max(6, workers * c.input.prefetch + 1)):   # steady state
      next(it)
    with Meter() as m:
      for _ in range(batches):
        next(it)
  if hasattr(it, 'close'):
    it.close()
  clips = batches * c.input.batch_size
  return dict(workers=workers, clips_per_cpu_s=clips / m.cpu,
              clips_per_wall_s=clips / m.wall, cpu_s=m.cpu, wall_s=m.wall)


def _rate_in_this_process(config, data_dir: str, batches: int, path: str,
                          split_records: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(data_dir).as_data_source('train')
  if path == 'first_round':   # which stored its audio as FLAC
    source = FlacAudio(source)
  return pipeline_rate(config, source, 0, batches, path, split_records)


def rate_in_fresh_process(config, data_dir: str, batches: int,
                          path: str) -> dict:
  """pipeline_rate(0 workers) in a new Python process (spawned, so nothing
  this process set, such as mallopt, carries over)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context('spawn')) as pool:
    return pool.submit(_rate_in_this_process, config, data_dir, batches,
                       path, FLAGS.split_records).result()


# The pipeline rows' variants: configs/paper.py:real's data path with one of
# its choices undone. `audio='flac'`: the records as the 'flac' audio_codec
# stores them (FlacAudio); `read_threads`: grain's read threads in the process;
# `workers`: grain worker processes (0 if not given), with
# `worker_read_threads` read threads each.
VARIANTS = (
    ('as configured: the crop box\'s 4:2:0 planes unscaled, clips on key '
     'frames', {}),
    ('4:2:0 frames scaled on the host', dict(frame_format='yuv420')),
    ('clips start at any frame', dict(clip_starts='any')),
    ('RGB frames from the host', dict(frame_format='rgb')),
    ('RGB frames, clips start at any frame (the previous defaults)',
     dict(frame_format='rgb', clip_starts='any')),
    ('RGB frames, colour jitter on the host',
     dict(frame_format='rgb', color_jitter_on='host')),
    ('no augmentation', dict(enabled=False)),
    ('one read thread', dict(read_threads=1)),
    ('audio as FLAC (the records\' 16-bit PCM re-encoded in memory)',
     dict(audio='flac')),
    ('one read thread each', dict(workers=2)),
    ('two read threads each', dict(workers=2, worker_read_threads=2)),
)


# Stages of the per-example work: (label, file suffix or '', function name);
# each is the cumulative time of the function that does it.
PROFILE_STAGES = (
    ('read record (array_record + TFDS deserialise)', '', '__getitem__'),
    ('H.264 decode (libavcodec, incl. frames before the first used)', '~',
     "<method 'decode' of 'av.codec.context.CodecContext' objects>"),
    ('YUV->RGB of whole frames', 'clip_storage.py', '_to_rgb'),
    ('crop + resize to 224 (PIL)', '', 'resize_frames'),
    ('colour jitter (numpy float64)', '', 'color_jitter'),
    ('audio window (FLAC decode)', '', 'waveform_window'),   # FlacAudio
    ('SpecAugment masks', '', '_audio_outputs'),
)


def profile_first_round(config, source) -> tuple[str, float, dict]:
  """cProfile of the first round's per-example work in one thread (its costs
  are in PIL and numpy, which a profiler does not inflate much; today's
  path is timed by `stage_times`)."""
  example = FirstRoundExample(source, config, 0)
  n = FLAGS.profile_examples
  example((0, 0))
  wait_until_idle()
  profiler = cProfile.Profile(time.process_time)   # CPU, not wall, time
  t0 = time.process_time()
  profiler.enable()
  for i in range(n):
    example((i // len(source), i % len(source)))
  profiler.disable()
  per_example_ms = 1e3 * (time.process_time() - t0) / n
  stats = pstats.Stats(profiler)
  shares = {}
  for label, suffix, func in PROFILE_STAGES:
    cum = max((v[3] for k, v in stats.stats.items()
               if k[2] == func and k[0].endswith(suffix)), default=0.0)
    shares[label] = 1e3 * cum / n
  shares['everything else (copies, Python, rng, ...)'] = (
      per_example_ms - sum(shares.values()))
  out = io.StringIO()
  pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(12)
  return out.getvalue(), per_example_ms, shares


def stage_times(config, source, n: int) -> tuple[float, dict]:
  """CPU ms per example of today's path by stage, without a profiler (which
  inflates Python-heavy stages several times): a timer around each stage's
  function, `n` examples in one thread after a warm-up."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  spent = {}

  def timed(label, fn):
    def wrapper(*args, **kwargs):
      t0 = time.process_time()
      try:
        return fn(*args, **kwargs)
      finally:
        spent[label] = spent.get(label, 0.0) + time.process_time() - t0
    return wrapper

  convert_label = 'crop + flip copy of the YUV box, swscale scale (+ YUV->RGB)'
  decode_h264 = clip_storage._decode_h264  # pylint: disable=protected-access

  def decode(record, indices, convert=clip_storage._to_rgb):  # pylint: disable=protected-access
    return decode_h264(record, indices, timed(convert_label, convert))

  class Timed(RepeatedSource):
    __getitem__ = timed('read record (array_record + TFDS deserialise)',
                        RepeatedSource.__getitem__)

  wait_until_idle()
  with mock.patch.object(clip_storage, '_decode_h264',
                         timed('H.264 decode + the stage below', decode)), \
       mock.patch.object(clip_storage, 'waveform_window',
                         timed('audio window (16-bit PCM slice)',
                               clip_storage.waveform_window)), \
       mock.patch.object(clip_storage, '_unscaled_slots',
                         timed('crop box copies into the unscaled window',
                               clip_storage._unscaled_slots)), \
       mock.patch.object(clip_storage, 'copy_yuv420_planes',
                         timed('4:2:0 planes into the clip arrays',
                               clip_storage.copy_yuv420_planes)):
    example = pipeline._TrainExample(Timed(source, 10000), config, 0)  # pylint: disable=protected-access
    for i in range(8):
      example((0, i * 7))
    spent.clear()
    t0 = time.process_time()
    for i in range(n):
      example((1 + i // 100, (i * 7) % 10000))
    total = 1e3 * (time.process_time() - t0) / n
  ms = {label: 1e3 * v / n for label, v in spent.items()}
  decode_label = 'H.264 decode + the stage below'
  ms['H.264 decode (libavcodec)'] = ms.pop(decode_label, 0.0) - ms.get(
      convert_label, 0.0)
  ms['everything else (Python, rng, SpecAugment masks, ...)'] = (
      total - sum(ms.values()))
  return total, ms


# ---- 4. demand ----------------------------------------------------------------


def gflop_per_clip() -> tuple[float, str]:
  if FLAGS.gflop_per_clip > 0:
    return FLAGS.gflop_per_clip, '--gflop_per_clip'
  from tavlo_jax import aot_compile  # pylint: disable=g-import-not-at-top
  c = load_config('configs/paper.py:synth')
  c.input.batch_size = 2
  c.mesh.fsdp = 1
  c.mesh.data = -1
  report = aot_compile.analyse(c, aot_compile.get_topology('cpu:1'))
  flops = report.flops * report.num_devices / c.input.batch_size
  return flops / 1e9, ('XLA cost analysis of the compiled paper train step '
                       '(configs/paper.py:synth, batch 2, cpu:1)')


# ---- report -------------------------------------------------------------------


def main(argv):
  del argv
  if FLAGS.configs != ['paper']:
    raise app.UsageError('--configs: only `paper` is measured here')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  root = pathlib.Path(FLAGS.fixture_dir)
  results = {'machine': f'{os.cpu_count()} cores, load '
                        f'{os.getloadavg()[0]:.1f} at start'}
  with Meter() as m:
    manual, paths, seconds = write_fixture(root)
  mp4_bytes = sum(p.stat().st_size for p in paths)
  print(f'## fixture: {len(paths)} clips, {seconds:.0f} s of 640x360 video, '
        f'{mp4_bytes / 1e6:.2f} MB of mp4 ({mp4_bytes / seconds / 1e3:.1f} '
        f'KB/s); written in {m.wall:.0f} s (0 if it existed)')
  config = paper_config()

  print('\n## storage and build (vggsound builder: 8 fps, short side 256, '
        '16 kHz 16-bit PCM audio; one process)')
  print('| frames | KB per s of video | x source mp4 | of which frames / audio '
        '| PSNR vs source dB | build clips per CPU-s | build clips/s wall '
        '| frames decoded per T=16 clip | decode it, CPU ms |')
  print('|---|---|---|---|---|---|---|---|---|')
  builds = {}
  for codec in FLAGS.codecs:
    builder, meter = build(codec, manual, root / 'data')
    size = stored_bytes(builder)
    row = dict(codec=codec, kb_per_s=size['files'] / seconds / 1e3,
               ratio=size['files'] / mp4_bytes,
               frames_kb_per_s=size['frames'] / seconds / 1e3,
               audio_kb_per_s=size['audio'] / seconds / 1e3,
               psnr=psnr_vs_source(builder, paths),
               build_clips_per_cpu_s=len(paths) / meter.cpu,
               build_clips_per_wall_s=len(paths) / meter.wall,
               **dict(zip(('decode_ms', 'frames_decoded'),
                          clip_decode_ms(builder, config))))
    builds[codec] = (builder, row)
    print(f"| {codec} | {row['kb_per_s']:.1f} | {row['ratio']:.2f}x | "
          f"{row['frames_kb_per_s']:.1f} / {row['audio_kb_per_s']:.1f} | "
          f"{row['psnr']:.1f} | {row['build_clips_per_cpu_s']:.2f} | "
          f"{row['build_clips_per_wall_s']:.2f} | "
          f"{row['frames_decoded']:.1f} | {row['decode_ms']:.1f} |",
          flush=True)
  results['storage'] = [row for _, row in builds.values()]

  codec = FLAGS.codecs[0]
  source = builds[codec][0].as_data_source('train')
  print(f'\n## training pipeline, configs/paper.py:real (224 px, T=16, '
        f'128 mels, augmentation on, log-mel, crop scaling and flip, colour '
        f'jitter and YUV->RGB on the device, clips on key frames), records '
        f'{codec}, host batch {FLAGS.batch_size}; the {len(source)} fixture '
        f'records seen as a split of {FLAGS.split_records} (RepeatedSource)')
  print('| grain workers | clips per CPU-s (process + workers) | clips/s wall '
        '| CPU s | wall s |')
  print('|---|---|---|---|---|')
  rows = []
  for workers in map(int, FLAGS.workers):
    row = pipeline_rate(config, source, workers, FLAGS.batches,
                        split_records=FLAGS.split_records)
    rows.append(row)
    print(f"| {workers} | **{row['clips_per_cpu_s']:.1f}** | "
          f"{row['clips_per_wall_s']:.1f} | {row['cpu_s']:.1f} | "
          f"{row['wall_s']:.1f} |", flush=True)
  results['pipeline'] = rows
  # Demand at the best in-process rate, and at the best rate with grain
  # worker processes (what a host runs; the main process's share included).
  rates = {'in-process': [r['clips_per_cpu_s'] for r in rows
                          if r['workers'] == 0],
           'workers': [r['clips_per_cpu_s'] for r in rows if r['workers'] > 0]}
  rates = {k: max(v) for k, v in rates.items() if v}
  # The defaults' parts, each undone in turn (0 workers), alternating over
  # --rounds (the load of a shared machine drifts): rates from the summed
  # CPU and wall time of the rounds.
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  runs = {label: [] for label, _ in VARIANTS}
  for _ in range(FLAGS.rounds):
    for label, settings in VARIANTS:
      c = copy.deepcopy(config)
      threads = (pipeline.READ_THREADS, pipeline.WORKER_READ_THREADS)
      workers, rows_source = 0, source
      for key, value in settings.items():
        if key == 'audio':
          rows_source = FlacAudio(source)
        elif key == 'read_threads':
          pipeline.READ_THREADS = value
        elif key == 'worker_read_threads':
          pipeline.WORKER_READ_THREADS = value
        elif key == 'workers':
          workers = value
        elif key in c.input:
          c.input[key] = value
        else:
          c.input.augment[key] = value
      try:
        runs[label].append(pipeline_rate(c, rows_source, workers,
                                         FLAGS.batches,
                                         split_records=FLAGS.split_records))
      finally:
        pipeline.READ_THREADS, pipeline.WORKER_READ_THREADS = threads
  variants = []
  for label, settings in VARIANTS:
    cpu = sum(r['cpu_s'] for r in runs[label])
    wall = sum(r['wall_s'] for r in runs[label])
    clips = FLAGS.batches * FLAGS.batch_size * len(runs[label])
    row = dict(variant=label, clips_per_cpu_s=clips / cpu,
               clips_per_wall_s=clips / wall, cpu_s=cpu, wall_s=wall,
               per_round=[r['clips_per_cpu_s'] for r in runs[label]])
    variants.append(row)
    spread = f'{min(row["per_round"]):.0f}-{max(row["per_round"]):.0f}'
    print(f"| {settings.get('workers', 0)}, {label} ({len(runs[label])} "
          f"alternating runs: {spread}) | "
          f"{row['clips_per_cpu_s']:.1f} | {row['clips_per_wall_s']:.1f} | "
          f"{cpu:.1f} | {wall:.1f} |", flush=True)
  results['pipeline_variants'] = variants

  if FLAGS.first_round:
    # Side by side, alternating (the load of a shared machine drifts), each
    # run in a fresh process.
    data_dir = builds[codec][0].data_dir
    runs = {path: [] for path in PATHS}
    for _ in range(FLAGS.rounds):
      for path in PATHS:
        runs[path].append(rate_in_fresh_process(config, data_dir,
                                                FLAGS.batches, path))
    for path, label in PATHS.items():
      cpu = sum(r['cpu_s'] for r in runs[path])
      wall = sum(r['wall_s'] for r in runs[path])
      clips = FLAGS.batches * FLAGS.batch_size * len(runs[path])
      print(f'| 0, {label} ({len(runs[path])} alternating runs, fresh '
            f'processes) | {clips / cpu:.1f} | {clips / wall:.1f} | '
            f'{cpu:.1f} | {wall:.1f} |', flush=True)
      results[f'pipeline_{path}'] = dict(
          clips_per_cpu_s=clips / cpu, clips_per_wall_s=clips / wall,
          runs=runs[path])

  per_example_ms, stages = stage_times(config, source, FLAGS.profile_examples)
  print(f'\n## what limits it: today\'s example alone in one thread, '
        f'{FLAGS.profile_examples} examples, timers around its stages (no '
        f'profiler): {per_example_ms:.1f} CPU ms per example (= '
        f'{1e3 / per_example_ms:.0f} clips per CPU-s)')
  print('| stage | CPU ms per example | share |')
  print('|---|---|---|')
  for label, ms in sorted(stages.items(), key=lambda kv: -kv[1]):
    print(f'| {label} | {ms:.2f} | {100 * ms / per_example_ms:.0f}% |')
  results['stages'] = dict(per_example_ms=per_example_ms, stages=stages)

  # cProfile inflates Python-heavy stages several times over (today's record
  # read: ~4 ms profiled, 0.8 ms timed): the first round only, whose costs
  # are in PIL and numpy.
  if FLAGS.first_round:
    text, per_example_ms, shares = profile_first_round(config,
                                                       FlacAudio(source))
    print(f'\n## what limits it (first-round path): cProfile of '
          f'{FLAGS.profile_examples} examples in one thread, '
          f'{per_example_ms:.1f} CPU ms per example (= '
          f'{1e3 / per_example_ms:.0f} clips per CPU-s, profiler included)')
    print('| stage | CPU ms per example | share |')
    print('|---|---|---|')
    for label, ms in sorted(shares.items(), key=lambda kv: -kv[1]):
      if ms > 0.05:
        print(f'| {label} | {ms:.1f} | {100 * ms / per_example_ms:.0f}% |')
    print('\n' + '\n'.join(text.splitlines()[:40]))
    results['profile_first_round'] = dict(per_example_ms=per_example_ms,
                                          stages=shares)

  gflop, gflop_source = gflop_per_clip()
  rate_text = ', '.join(f'{v:.1f} {k}' for k, v in rates.items())
  print(f'\n## demand at {100 * FLAGS.mfu:.0f}% MFU: {gflop:.1f} GFLOP per '
        f'clip ({gflop_source}); host cores at the best clips per CPU-s '
        f'above ({rate_text})')
  print('| accelerator | dense bf16 TFLOP/s | clips/s consumed | '
        + ' | '.join(f'host cores needed ({k})' for k in rates) + ' |')
  print('|---|---|---|' + '---|' * len(rates))
  demand = []
  for chip in accelerator_peaks.DEMAND_CHIPS:
    peak = accelerator_peaks.peak_of(chip)
    clips = FLAGS.mfu * peak * 1e12 / (gflop * 1e9)
    cores = {k: clips / v for k, v in rates.items()}
    demand.append(dict(chip=chip, peak=peak, clips_per_s=clips, cores=cores))
    print(f'| {chip} | {peak:.0f} | {clips:.0f} | '
          + ' | '.join(f'{c:.1f}' for c in cores.values()) + ' |')
  results['demand'] = dict(gflop_per_clip=gflop, source=gflop_source,
                           per_core=rates, rows=demand)
  results['load_at_end'] = os.getloadavg()[0]
  print(f"\nload average: {results['machine']}, {results['load_at_end']:.1f} "
        'at the end')
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  app.run(main)
