r"""Compiled train-step time, clips/s, FLOPs and MFU for the shipped configs.

  python benchmarks/train_step.py                              # CPU defaults
  python benchmarks/train_step.py --configs=paper --dtype=bfloat16 --steps=30
  python benchmarks/train_step.py --configs=configs/paper.py:synth --batch=4

Configs (`--configs`, comma-separated; a name below or any `file.py[:variant]`):
  cpu     configs/avatar_synth.py         the CPU default (64x64, T=16, tiny model)
  paper   configs/paper.py:synth          224x224 ResNet-18, T=16, batch 128
  long    configs/paper.py:long_clip      T=256, time sharded 8 ways over `seq`
                                          (all-to-all temporal attention)
each in every `--dtype` (float32, bfloat16 = `--config.model.dtype`).

What is measured: `tavlo_jax.train.create_state` + `compile_steps`, the very
step that trains, on a fixed batch of random data with the WORKSPACE batch
contract (frames uint8 [B,T,S,S,3]; `--features_on=host`: log-mel `audio`
[B,T*C,M], i.e. the model alone; `device`: `waveform` [B,T*spf], the step
also computes the log-mel). Time per step is the median of `--steps` steps
after `--warmup` steps, each synchronised with `jax.block_until_ready`.
FLOPs per step are XLA's cost analysis of the compiled step
(`.lower(...).compile().cost_analysis()`, which is per device: summed over
the mesh here). MFU = FLOPs / time / peak of the devices used:
  CPU          measured here: best of a few float32 2048x2048 `jnp.dot`s
               (all cores; the 8 fake devices of `long` share them)
  accelerators the vendor's dense bf16 peak per chip (table PEAKS_TFLOPS),
               for both dtypes (float32 runs as TF32 on NVIDIA by default,
               whose peak is half that; the MFU convention is the bf16 peak)

On a CPU the paper-scale configs are shrunk so a step takes seconds, and the
table says so: `paper` runs at batch 2, `long` at batch 1 and 64x64 frames on
8 fake CPU devices (set below, before jax is imported). On a GPU/TPU they run
as configured unless --batch / --image_size say otherwise; `long` needs
`mesh.seq` devices and uses as many as there are (up to 8) otherwise.
"""

from __future__ import annotations

import os
import sys

# Fake CPU devices for the seq-sharded config must exist before jax is
# imported. The flag only concerns the host platform: GPUs/TPUs are untouched,
# and configs that do not shard use one device (the fakes share the cores).
_FAKE = ([a.split('=', 1)[1] for a in sys.argv if a.startswith('--fake_devices=')]
         or ['8'])[-1]
if int(_FAKE) > 0:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_FAKE}')

import ast  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

import accelerator_peaks  # noqa: E402  (next to this script)
from matmul_peak import measured_matmul_tflops  # noqa: E402  (benchmarks/)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    'cpu': 'configs/avatar_synth.py',
    'paper': 'configs/paper.py:synth',
    'long': 'configs/paper.py:long_clip',
}
# Reductions applied on a CPU only (batch, image_size); None keeps the config's.
CPU_SHRINK = {'cpu': (None, None), 'paper': (2, None), 'long': (1, 64)}
# Dense bf16 TFLOP/s per chip, vendor figures. Matched on device_kind, in order.
PEAKS_TFLOPS = accelerator_peaks.PEAKS_TFLOPS

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['cpu', 'paper', 'long'],
                  f'names {sorted(CONFIGS)} or file.py[:variant] specs')
flags.DEFINE_list('dtype', ['float32', 'bfloat16'], 'model compute dtypes')
flags.DEFINE_integer('steps', 10, 'timed steps per row (median reported)')
flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation (at '
                     'least 1; capped at max_seconds/4 after the first)')
flags.DEFINE_float('max_seconds', 120.0,
                   'stop timing a row after this long (at least 3 steps)')
flags.DEFINE_integer('batch', 0, 'global batch for every config (0: the '
                     'config\'s, shrunk on CPU)')
flags.DEFINE_integer('image_size', 0, 'frame size for every config (0: the '
                     'config\'s, shrunk on CPU)')
flags.DEFINE_enum('features_on', 'host', ['host', 'device'],
                  'host: the batch carries log-mel (model only); device: '
                  'waveform, the step computes the log-mel')
flags.DEFINE_float('fps', 8.0, 'video frame rate (waveform length only)')
flags.DEFINE_integer('fake_devices', 8, 'fake CPU devices (0: none; read '
                     'before jax is imported)')
flags.DEFINE_string('json_out', 'out/train_step.json',
                    'results as JSON ("" = do not write)')
flags.DEFINE_multi_string('set', [], 'a config override for every row, '
                          'e.g. --set=model.fine_stride=4 (repeatable)')
flags.DEFINE_string('profile_dir', '', 'also write a jax.profiler trace of '
                    'a few steps per row here (TensorBoard/Perfetto)')


# ---------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------

def device_peak(matmul_fp32: float) -> tuple[float, str]:
  """(peak TFLOP/s of ONE device, where the figure comes from)."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return matmul_fp32, 'measured float32 jnp.dot on this CPU (all cores)'
  for key, peak in PEAKS_TFLOPS:
    if key.lower() in dev.device_kind.lower():
      return peak, f'vendor dense bf16 peak of {key} ({peak:.0f} TFLOP/s)'
  return matmul_fp32, (f'unknown device {dev.device_kind!r}: measured '
                       'float32 jnp.dot')


# ---------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------

def make_config(name: str, dtype: str):
  """(config, notes): the config as shipped, reduced where it must be."""
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax import config_lib  # pylint: disable=g-import-not-at-top
  spec = CONFIGS.get(name, name)
  path, _, variant = spec.partition(':')
  config = config_lib.load_config_file(
      str(REPO / path) + (f':{variant}' if variant else ''))
  config.model.dtype = dtype
  config.input.audio.features_on = FLAGS.features_on
  notes = []
  for item in FLAGS.set:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--set={item!r}: expected key=value')
    parent = config
    *path, leaf = key.split('.')
    for part in path:
      parent = parent[part]
    # The field's own type parses the value ('4' -> 4, 'True' -> True).
    parent[leaf] = ast.literal_eval(value) if not isinstance(parent[leaf], str) else value
    notes.append(item)
  on_cpu = jax.default_backend() == 'cpu'
  batch, size = CPU_SHRINK.get(name, (None, None)) if on_cpu else (None, None)
  batch = FLAGS.batch or batch
  size = FLAGS.image_size or size
  if batch and batch != config.input.batch_size:
    notes.append(f'batch {config.input.batch_size}->{batch}')
    config.input.batch_size = batch
  if size and size != config.input.image_size:
    notes.append(f'{config.input.image_size}px->{size}px')
    config.input.image_size = size
  seq = int(config.mesh.seq)
  if seq > 1 and jax.device_count() < seq:
    usable = max(d for d in range(1, jax.device_count() + 1)
                 if seq % d == 0 and jax.device_count() % d == 0)
    notes.append(f'seq {seq}->{usable} (only {jax.device_count()} devices)')
    config.mesh.seq = usable
  return config, notes


def mesh_devices(config):
  """Devices a row runs on: the `seq` ones if it shards time, else all (one
  on a CPU, whose fake devices only split the same cores)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if int(config.mesh.seq) > 1:
    return devices[:int(config.mesh.seq)]
  return devices[:1] if jax.default_backend() == 'cpu' else devices


def random_batch(config, mesh):
  """A global batch of random data with the WORKSPACE batch contract."""
  from tavlo_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  i, a = config.input, config.input.audio
  b, t, s = i.batch_size, i.num_frames, i.image_size
  host = {'frames': rng.integers(0, 256, (b, t, s, s, 3), dtype=np.uint8)}
  if FLAGS.features_on == 'host':
    host['audio'] = rng.normal(
        size=(b, t * a.columns_per_frame, a.n_mels)).astype(np.float32)
  else:
    spf = audio_lib.samples_per_frame(a.sample_rate, FLAGS.fps, i.frame_stride)
    host['waveform'] = (0.1 * rng.normal(size=(b, t * spf))).astype(np.float32)
  return pipeline.make_global_batch(host, mesh)


def flops_of(cost) -> float:
  if isinstance(cost, (list, tuple)):   # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def bench_row(name: str, dtype: str, peak_tflops: float) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax import models, sharding, train  # pylint: disable=g-import-not-at-top

  config, notes = make_config(name, dtype)
  devices = mesh_devices(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  model = models.build_model(config)
  # rbg keys, as train.run uses (much faster to compile on CPU).
  init_rng, step_rng = jax.random.split(jax.random.key(0, impl='rbg'))
  state, state_shardings, _ = train.create_state(config, model, mesh, init_rng)
  train_fn, _ = train.compile_steps(config, model, mesh, state_shardings)
  batch = random_batch(config, mesh)
  step_rng = jax.device_put(step_rng, sharding.replicated(mesh))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    t0 = time.perf_counter()
    lowered = train_fn.lower(state, batch, step_rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # Compiled cost analysis is per device (the partitioned program).
    flops_per_device = flops_of(compiled.cost_analysis())
    try:
      flops_unpartitioned = flops_of(lowered.cost_analysis())
    except Exception:  # pylint: disable=broad-except
      flops_unpartitioned = float('nan')
    mem = compiled.memory_analysis()
    mem_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
                 mem.temp_size_in_bytes - mem.alias_size_in_bytes) if mem else 0

    # Warm-up: --warmup steps, but no more than a quarter of the time cap
    # after the first (a 2-minute CPU step needs no second warm-up).
    start = time.perf_counter()
    for i in range(max(FLAGS.warmup, 1)):
      if i and time.perf_counter() - start > FLAGS.max_seconds / 4:
        break
      state, metrics = compiled(state, batch, step_rng)
      jax.block_until_ready((state, metrics))
    times = []
    start = time.perf_counter()
    while len(times) < FLAGS.steps:
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, step_rng)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
      if len(times) >= 3 and time.perf_counter() - start > FLAGS.max_seconds:
        notes.append(f'{len(times)} steps (time cap)')
        break
    if FLAGS.profile_dir:
      trace_dir = os.path.join(FLAGS.profile_dir, f'{name}_{dtype}')
      with jax.profiler.trace(trace_dir):
        for _ in range(3):
          state, metrics = compiled(state, batch, step_rng)
        jax.block_until_ready((state, metrics))
    loss = float(jax.device_get(metrics['loss']))

  step_s = statistics.median(times)
  flops = flops_per_device * len(devices)
  # Fake CPU devices share one machine's cores: its peak, not 8 of them.
  chips = 1 if jax.default_backend() == 'cpu' else len(devices)
  tflops = flops / step_s / 1e12
  i = config.input
  return dict(
      config=name, spec=CONFIGS.get(name, name), dtype=dtype,
      batch=i.batch_size, frames=i.num_frames, image_size=i.image_size,
      features_on=FLAGS.features_on, mesh=dict(mesh.shape),
      devices=len(devices), params=int(num_params), notes=notes,
      compile_s=compile_s, steps_timed=len(times), step_s=step_s,
      step_s_min=min(times), step_s_max=max(times),
      clips_per_s=i.batch_size / step_s, flops_per_step=flops,
      flops_per_step_unpartitioned=flops_unpartitioned,
      tflops=tflops, mfu=tflops / (peak_tflops * chips),
      memory_per_device_bytes=int(mem_bytes), loss=loss)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

HEADER = ('| config | dtype | B | T | S | devices | step ms (median) | clips/s | '
          'GFLOP/step | TFLOP/s | MFU | mem/dev MiB | compile s | notes |')


def row_line(r: dict) -> str:
  return (f"| {r['config']} | {r['dtype']} | {r['batch']} | {r['frames']} | "
          f"{r['image_size']} | {r['devices']} | {r['step_s'] * 1e3:.1f} | "
          f"{r['clips_per_s']:.2f} | {r['flops_per_step'] / 1e9:.1f} | "
          f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% | "
          f"{r['memory_per_device_bytes'] / 2**20:.0f} | {r['compile_s']:.0f} | "
          f"{'; '.join(r['notes'])} |")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  for name in FLAGS.configs:
    if name not in CONFIGS and '.py' not in name:
      raise app.UsageError(f'--configs: unknown {name!r}; expected one of '
                           f'{sorted(CONFIGS)} or a file.py[:variant] spec')
  dev = jax.devices()[0]
  mm32 = measured_matmul_tflops(jnp.float32)
  mm16 = measured_matmul_tflops(jnp.bfloat16)
  peak, peak_source = device_peak(mm32)
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'device: {dev.platform} {dev.device_kind} x{jax.device_count()} '
        f'(jax {jax.__version__}); load average at start {load:.1f}')
  print(f'matmul measured: float32 {mm32:.3f} TFLOP/s, bfloat16 {mm16:.3f} '
        f'TFLOP/s; MFU peak per device: {peak:.3f} TFLOP/s = {peak_source}')
  print(f'features_on={FLAGS.features_on}; median of up to {FLAGS.steps} '
        f'steps after {FLAGS.warmup} warm-up; FLOPs = XLA cost analysis of '
        'the compiled step, summed over devices')
  print(HEADER)
  print('|' + '---|' * HEADER.count(' | ') + '---|')
  rows = []
  for name in FLAGS.configs:
    for dtype in FLAGS.dtype:
      try:
        r = bench_row(name, dtype, peak)
      except Exception as e:  # pylint: disable=broad-except
        # One failing config (e.g. out of memory) must not lose the others.
        print(f'| {name} | {dtype} | FAILED: {type(e).__name__}: '
              f'{str(e).splitlines()[0][:200]} |', flush=True)
        rows.append(dict(config=name, dtype=dtype,
                         error=f'{type(e).__name__}: {e}'[:2000]))
        continue
      rows.append(r)
      print(row_line(r), flush=True)
  load_end = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'load average at end {load_end:.1f}')
  if FLAGS.json_out:
    out = pathlib.Path(FLAGS.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=f'{dev.platform} {dev.device_kind}',
        device_count=jax.device_count(), jax=jax.__version__,
        matmul_tflops_float32=mm32, matmul_tflops_bfloat16=mm16,
        peak_tflops_per_device=peak, peak_source=peak_source,
        load_start=load, load_end=load_end, rows=rows), indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
