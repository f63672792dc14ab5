r"""Input pipeline throughput (clips/s) vs what the train step consumes.

  python benchmarks/input_pipeline.py                         # everything
  python benchmarks/input_pipeline.py --configs=cpu --workers=0 --batches=4
  python benchmarks/input_pipeline.py --step_clips_per_s=35   # give the step rate

Reads `avatar_synth/<builder_config>` from `config.dataset.data_dir` when it
is built; otherwise builds the test fixture's `bench` config (128x128 frames,
16 kHz, 8 fps, 4 s clips, like AVATAR-Synth's default) into --fixture_dir and
says so. Two configs:

  cpu     configs/avatar_synth.py as is (T=16, 64x64, 40 mels)
  paper   paper-like: 224x224 frames, T=16, 128 mels, n_fft 1024

For each: clips/s of the training pipeline with 0/1/2 grain workers and
audio features on the host (numpy log-mel in the pipeline) or on the device
(the pipeline ships the waveform; the jitted `log_mel_jnp` cost is measured
separately and added as clips/s of the step side). Also: frame resizing with
PIL vs jax.image.resize on the host, and the ratio pipeline / train step.

The train step rate comes from `--step_clips_per_s`, or is measured with
tavlo_jax.train's `create_state` + `compile_steps` on a pipeline batch (the
model config is the config's own; `paper` changes only the input); if that
fails the report is pipeline-only and says why. Numbers on a shared 2-core machine
are noisy: compare within one run.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['cpu', 'paper'], 'cpu and/or paper')
flags.DEFINE_list('workers', ['0', '1', '2'], 'grain worker counts')
flags.DEFINE_list('features_on', ['host', 'device'], 'where log-mel runs')
flags.DEFINE_integer('batches', 6, 'timed batches per setting')
flags.DEFINE_integer('batch_size', 16, 'host batch for the benchmark')
flags.DEFINE_float('step_clips_per_s', 0.0, 'train step rate, if known')
flags.DEFINE_integer('step_batches', 3, 'timed train steps (0: skip)')
flags.DEFINE_string('fixture_dir', 'out/bench_fixture',
                    'where to build the fixture dataset if needed')
flags.DEFINE_string('json_out', '', 'also write the results here')


def make_config(name: str):
  spec = importlib.util.spec_from_file_location(
      'configs_avatar_synth', REPO / 'configs' / 'avatar_synth.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  if name == 'paper':
    c.input.image_size = 224
    c.input.num_frames = 16
    c.input.audio.n_mels = 128
    c.input.audio.n_fft = 1024
  elif name != 'cpu':
    raise ValueError(f'unknown config {name!r}; expected cpu or paper')
  c.input.batch_size = FLAGS.batch_size
  c.mesh.data = 1        # one device: the numbers are per device/host
  return c


def open_source(config):
  """(data source, description): avatar_synth if built, else the fixture."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = f'{config.dataset.name}/{config.dataset.builder_config}'
  try:
    import tavlo_datasets.avatar_synth  # pylint: disable=g-import-not-at-top,unused-import
    # Never build here (tfds.data_source would try): only read what exists.
    builder = tfds.builder(name, data_dir=config.dataset.data_dir)
    if builder.is_prepared():
      return (builder.as_data_source(config.dataset.train_split),
              f'{name} from {config.dataset.data_dir}')
    reason = f'not built in {config.dataset.data_dir}'
  except Exception as e:  # pylint: disable=broad-except
    reason = f'{type(e).__name__}: {str(e)[:120]}'
  sys.path.insert(0, str(REPO / 'tests'))
  from fixtures import fixture_builder  # pylint: disable=g-import-not-at-top
  builder = fixture_builder.build(FLAGS.fixture_dir, 'bench')
  return builder.as_data_source('train'), (
      f'FIXTURE tavlo_fixture/bench ({name} not available: {reason})')


def pipeline_clips_per_s(config, source, workers: int, features_on: str):
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(config)
  c.input.num_workers = workers
  c.input.audio.features_on = features_on
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(c, source, process_index=0,
                                    process_count=1)
  next(it)
  startup = time.perf_counter() - t0
  # Drain what was buffered during start-up: steady state only.
  for _ in range(max(workers, 1) * c.input.prefetch):
    next(it)
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  rate = FLAGS.batches * c.input.batch_size / (time.perf_counter() - t0)
  if hasattr(it, 'close'):
    it.close()
  return rate, startup


def device_log_mel_clips_per_s(config):
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import audio  # pylint: disable=g-import-not-at-top
  a, t = config.input.audio, config.input.num_frames
  spf = audio.samples_per_frame(a.sample_rate, 8.0, config.input.frame_stride)
  b = config.input.batch_size
  x = np.random.default_rng(0).standard_normal((b, t * spf)).astype(np.float32)
  f = jax.jit(lambda w: audio.log_mel_jnp(w, a, t * a.columns_per_frame))
  f(x).block_until_ready()
  reps = 5
  t0 = time.perf_counter()
  for _ in range(reps):
    f(x).block_until_ready()
  host_t0 = time.perf_counter()
  device_rate = reps * b / (host_t0 - t0)
  for i in range(b):
    audio.log_mel_np(x[i], a, t * a.columns_per_frame)
  host_rate = b / (time.perf_counter() - host_t0)
  return device_rate, host_rate, jax.default_backend()


def resize_clips_per_s(config):
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_datasets import clip_storage  # pylint: disable=g-import-not-at-top
  t, s = config.input.num_frames, config.input.image_size
  clip = np.random.default_rng(0).integers(0, 255, (t, 128, 128, 3),
                                           dtype=np.uint8)
  reps = 10
  t0 = time.perf_counter()
  for _ in range(reps):
    clip_storage.resize_frames(clip, s, box=(3.0, 5.0, 120.0, 110.0))
  pil = reps / (time.perf_counter() - t0)
  resize = jax.jit(lambda x: jax.image.resize(
      x[:, 5:110, 3:120].astype(np.float32), (t, s, s, 3), 'bilinear'))
  np.asarray(resize(clip))
  t0 = time.perf_counter()
  for _ in range(reps):
    np.asarray(resize(clip)).astype(np.uint8)
  return pil, reps / (time.perf_counter() - t0)


def measure_step_clips_per_s(config, source):
  """clips/s of the jitted train step on one pipeline batch (this machine).

  Uses tavlo_jax.train's own pieces (create_state, compile_steps), so the
  step measured is the one that trains.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from tavlo_jax import models, sharding, train  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  model = models.build_model(config)
  state, shardings, _ = train.create_state(config, model, mesh,
                                           jax.random.key(0))
  train_fn, _ = train.compile_steps(config, model, mesh, shardings)
  host = next(pipeline.make_train_iterator(config, source, process_index=0,
                                           process_count=1))
  batch = pipeline.make_global_batch(host, mesh)
  rng = jax.random.key(1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state, metrics = train_fn(state, batch, rng)        # compile
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(FLAGS.step_batches):
      state, metrics = train_fn(state, batch, rng)
    jax.block_until_ready(metrics)
  return FLAGS.step_batches * config.input.batch_size / (
      time.perf_counter() - t0)


def step_rate(config, source):
  if FLAGS.step_clips_per_s > 0:
    return FLAGS.step_clips_per_s, '--step_clips_per_s'
  if FLAGS.step_batches <= 0:
    return None, 'train step not measured (--step_batches=0): pipeline-only'
  try:
    rate = measure_step_clips_per_s(config, source)
  except Exception as e:  # pylint: disable=broad-except
    return None, (f'train step not available ({type(e).__name__}: '
                  f'{str(e)[:200]}): pipeline-only')
  return rate, 'jitted tavlo_jax.train step, measured here'


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  results = []
  for name in FLAGS.configs:
    config = make_config(name)
    source, what = open_source(config)
    dev_rate, host_rate, backend = device_log_mel_clips_per_s(config)
    pil, jax_resize = resize_clips_per_s(config)
    step, step_note = step_rate(config, source)
    print(f'\n## {name}: T={config.input.num_frames} '
          f'S={config.input.image_size} mels={config.input.audio.n_mels} '
          f'n_fft={config.input.audio.n_fft} host batch='
          f'{config.input.batch_size}; data: {what}')
    print(f'log-mel alone: host numpy {host_rate:.0f} clips/s, jitted '
          f'log_mel_jnp on {backend} {dev_rate:.0f} clips/s')
    print(f'frame crop+resize 128->{config.input.image_size}: PIL '
          f'{pil:.0f} clips/s, jax.image.resize on the host {jax_resize:.0f} '
          'clips/s')
    print(f'train step: {step_note}' + (f' = {step:.1f} clips/s' if step
                                        else ''))
    print('| workers | features_on | pipeline clips/s | start-up s | '
          'incl. device log-mel clips/s | pipeline / step |')
    print('|---|---|---|---|---|---|')
    for workers in map(int, FLAGS.workers):
      for features_on in FLAGS.features_on:
        rate, startup = pipeline_clips_per_s(config, source, workers,
                                             features_on)
        # On a CPU the device log-mel runs on the same cores: add its time.
        combined = rate if features_on == 'host' else 1 / (1 / rate +
                                                           1 / dev_rate)
        ratio = f'{combined / step:.2f}' if step else 'n/a'
        print(f'| {workers} | {features_on} | {rate:.1f} | {startup:.1f} | '
              f'{combined:.1f} | {ratio} |', flush=True)
        results.append(dict(config=name, workers=workers,
                            features_on=features_on, clips_per_s=rate,
                            startup_s=startup, with_device_log_mel=combined,
                            step_clips_per_s=step, data=what,
                            log_mel_host=host_rate, log_mel_device=dev_rate,
                            resize_pil=pil, resize_jax=jax_resize))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  app.run(main)
