r"""EZ-VSL's training step in JAX (this project) and in PyTorch, side by side.

  python benchmarks/torch_step.py                  # ~3-5 min on 2 idle cores
  python benchmarks/torch_step.py --one_core --notavlo   # per-core speed
  python benchmarks/torch_step.py --one_core --notavlo --breakdown   # + where the time goes

(torch is an optional extra, not in requirements.txt: `pip install
torch==2.13.0` (CPU build) or `pip install -e .[bench]`; a separate
`pip install --target DIR torch==2.13.0` put on PYTHONPATH keeps it out of
the project's environment.)

One training step on identical shapes, float32: batch 8, one 224 px frame
per sample through an image ResNet-18, a 1 x 257 x 200 log spectrogram
through the audio ResNet-18 (1-channel stem, global max pooling), both
projected to 512, EZ-VSL's max-MIL contrastive loss in both directions, and
an Adam update.
  jax    `configs/paper.py:ezvsl` through `tavlo_jax.train` (the very step
         that trains: create_state + compile_steps, donated state)
  torch  the same architecture written here once for PyTorch (`TorchEZVSL`),
         eager mode, torch.optim.Adam
  tavlo  the CPU main job's step (`configs/avatar_synth.py`, as trained),
         for its FLOP/s against the matmul peak
Each side runs in its own process (a worker of this script), all compiled
and warmed up first; then the timed steps ALTERNATE between them, one step
each per round, so load from other programs falls on both alike. Reported
per side: median wall time per step, median CPU time per step (the
process's user+system time over all its threads: what the step costs when
the cores are shared), FLOPs per step and FLOP/s:
  jax/tavlo  XLA's cost analysis of the compiled step (all ops)
  torch      torch.utils.flop_counter.FlopCounterMode over one step
             (matmuls and convolutions only, forward and backward)
The peak is the float32 2048^2 `jnp.dot` rate, measured as
`benchmarks/train_step.py` does. `--xla_flags=NAME=FLAGS` (repeatable)
adds a JAX worker per flag set, e.g. `--xla_flags=fastmath=--xla_cpu_enable_fast_math=true`.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH, IMAGE, FREQ, COLUMNS, DIM, TAU, LR = 8, 224, 257, 200, 512, 0.03, 1e-4

FLAGS = flags.FLAGS
flags.DEFINE_integer('steps', 10, 'timed steps per side (rounds)')
flags.DEFINE_integer('warmup', 2, 'untimed steps per side after compiling')
flags.DEFINE_integer('threads', 0, 'torch intra-op threads (0: all cores)')
flags.DEFINE_bool('one_core', False, 'pin every side to CPU 0 (torch: 1 '
                  'thread): per-core speed, robust to other programs\' load')
flags.DEFINE_bool('tavlo', True, 'also time the CPU main job\'s step')
flags.DEFINE_multi_string('xla_flags', [], 'NAME=FLAGS: one more JAX worker '
                          'with these XLA_FLAGS (repeatable)')
flags.DEFINE_bool('breakdown', False, 'after the timed rounds, profile a '
                  'few steps of jax and torch and print where each spends '
                  'its time (benchmarks/step_breakdown.py)')
flags.DEFINE_string('json_out', '', 'also write the results here as JSON')
flags.DEFINE_string('worker', '', 'internal: run as the worker of this side')
flags.DEFINE_string('worker_spec', '', 'internal: config of a jax worker')


# ---------------------------------------------------------------------------
# PyTorch side (imported only in the torch worker)
# ---------------------------------------------------------------------------

def torch_model():
  """TorchEZVSL: torchvision's ResNet-18 layout, written out here."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class BasicBlock(nn.Module):

    def __init__(self, c_in, c_out, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(c_out)
      self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(c_out)
      self.downsample = None
      if stride != 1 or c_in != c_out:
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet18(nn.Module):
    """Feature map [B, 512, H/32, W/32]: no pooling, no fc."""

    def __init__(self, in_channels):
      super().__init__()
      self.stem = nn.Sequential(
          nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
          nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
      blocks, c_in = [], 64
      for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
      self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
      return self.blocks(self.stem(x))

  class TorchEZVSL(nn.Module):

    def __init__(self):
      super().__init__()
      self.imgnet, self.img_proj = ResNet18(3), nn.Conv2d(512, DIM, 1)
      self.audnet, self.aud_proj = ResNet18(1), nn.Linear(512, DIM)

    def forward(self, image, spec):
      img = F.normalize(self.img_proj(self.imgnet(image)), dim=1)
      aud = self.audnet(spec).amax(dim=(2, 3))          # global max pooling
      aud = F.normalize(self.aud_proj(aud), dim=1)
      # max-MIL: each (image, audio) pair scores its best location.
      logits = torch.einsum('nchw,mc->nmhw', img, aud).flatten(2).amax(-1) / TAU
      labels = torch.arange(image.shape[0])
      return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)

  return TorchEZVSL()


class TorchSide:

  def __init__(self):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    if FLAGS.threads or FLAGS.one_core:
      torch.set_num_threads(1 if FLAGS.one_core else FLAGS.threads)
    self.model = torch_model().train()
    self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    self.image = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
    self.spec = torch.randn(BATCH, 1, FREQ, COLUMNS, generator=gen)
    with FlopCounterMode(display=False) as counter:
      self.step()
    self.info = dict(
        flops=float(counter.get_total_flops()), torch=torch.__version__,
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in self.model.parameters()))

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(self.image, self.spec)
    loss.backward()
    self.opt.step()
    return loss.item()


# ---------------------------------------------------------------------------
# JAX side (imported only in jax workers)
# ---------------------------------------------------------------------------

class JaxSide:

  def __init__(self, spec: str, features_on: str, dtype: str = 'float32'):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from tavlo_jax import config_lib, models, sharding, train  # pylint: disable=g-import-not-at-top
    from tavlo_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
    from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    path, _, variant = spec.partition(':')
    config = config_lib.load_config_file(
        str(REPO / path) + (f':{variant}' if variant else ''))
    if 'ezvsl' in variant:
      config.input.batch_size = BATCH
      config.model.dtype = dtype
    config.input.audio.features_on = features_on
    config.mesh.fsdp, config.mesh.data, config.mesh.seq = 1, -1, 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    model = models.build_model(config)
    init_rng, step_rng = train.base_rngs(config)
    state, shardings, _ = train.create_state(config, model, mesh, init_rng)
    step_fn, _ = train.compile_steps(config, model, mesh, shardings)
    rng = np.random.default_rng(0)
    i, a = config.input, config.input.audio
    host = {'frames': rng.integers(0, 256, (i.batch_size, i.num_frames,
                                            i.image_size, i.image_size, 3),
                                   dtype=np.uint8)}
    cols = i.num_frames * a.columns_per_frame
    if features_on == 'host':
      host['audio'] = rng.normal(size=(i.batch_size, cols, audio_lib.feature_bins(
          a))).astype(np.float32)
    else:   # the main job's batches: the waveform, features on device
      spf = audio_lib.samples_per_frame(a.sample_rate, 8.0, i.frame_stride)
      host['waveform'] = (0.1 * rng.normal(
          size=(i.batch_size, i.num_frames * spf))).astype(np.float32)
    self.mesh_ctx = lambda: (jax.set_mesh(mesh),
                             nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    ctx = self.mesh_ctx()
    with ctx[0], ctx[1]:
      self.batch = pipeline.make_global_batch(host, mesh)
      self.rng = jax.device_put(step_rng, sharding.replicated(mesh))
      t0 = time.perf_counter()
      self.compiled = step_fn.lower(state, self.batch, self.rng).compile()
      compile_s = time.perf_counter() - t0
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    self.state = state
    self.jax = jax
    self.info = dict(
        flops=float(cost.get('flops', float('nan'))), jax=jax.__version__,
        params=int(sum(x.size for x in jax.tree.leaves(state.params))),
        compile_s=compile_s, batch=i.batch_size, frames=i.num_frames,
        image_size=i.image_size, xla_flags=os.environ.get('XLA_FLAGS', ''))

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    return float(self.jax.device_get(metrics['loss']))


# ---------------------------------------------------------------------------
# Worker loop and the alternating driver
# ---------------------------------------------------------------------------

def run_worker():
  """Set up, reply with `info`; then one timed step per 'step' line."""
  out = sys.stdout
  sys.stdout = sys.stderr          # library chatter must not reach the pipe
  if FLAGS.one_core:
    # Before jax/torch start their thread pools, which size to the affinity.
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  if FLAGS.worker == 'torch':
    side = TorchSide()
  else:
    spec, _, features_on = FLAGS.worker_spec.partition('@')
    side = JaxSide(spec, features_on or 'host')
  for _ in range(FLAGS.warmup):
    side.step()
  out.write(json.dumps(side.info) + '\n')
  out.flush()
  for line in sys.stdin:
    if line.strip() == 'peak':      # asked alone, after the timed rounds
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      from matmul_peak import measured_matmul_tflops  # pylint: disable=g-import-not-at-top
      out.write(json.dumps(dict(
          peak_tflops=measured_matmul_tflops(jnp.float32))) + '\n')
      out.flush()
      continue
    if line.strip() == 'breakdown':   # asked alone, after the timed rounds
      import step_breakdown  # pylint: disable=g-import-not-at-top
      rows = (step_breakdown.torch_breakdown(side.step)
              if FLAGS.worker == 'torch' else
              step_breakdown.jax_breakdown(side.compiled, side.step))
      out.write(json.dumps(rows) + '\n')
      out.flush()
      continue
    if line.strip() != 'step':
      break
    wall, cpu = time.perf_counter(), time.process_time()
    loss = side.step()
    out.write(json.dumps(dict(wall=time.perf_counter() - wall,
                              cpu=time.process_time() - cpu, loss=loss)) + '\n')
    out.flush()


def start_worker(name: str, args: list[str], xla_flags: str = ''):
  env = dict(os.environ)
  # The workers import this checkout's tavlo_jax, whatever is installed.
  env['PYTHONPATH'] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  if xla_flags:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
  cmd = [sys.executable, __file__, f'--worker={name}',
         f'--warmup={FLAGS.warmup}', f'--threads={FLAGS.threads}',
         f'--one_core={FLAGS.one_core}', *args]
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=env, cwd=REPO)


def reply(proc, name):
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f'worker {name} exited (rc {proc.wait()}); its '
                       'messages are above')
  return json.loads(line)


def main(argv):
  del argv
  if FLAGS.worker:
    run_worker()
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('torch is not installed: `pip install torch==2.13.0` (CPU build), '
          'or put a folder holding it on PYTHONPATH', file=sys.stderr)
    sys.exit(2)
  sides = {'jax': ('jax', ['--worker_spec=configs/paper.py:ezvsl@host'], '')}
  for item in FLAGS.xla_flags:
    name, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--xla_flags={item!r}: expected NAME=FLAGS')
    sides[f'jax[{name}]'] = ('jax', ['--worker_spec=configs/paper.py:ezvsl@host'],
                             value)
  sides['torch'] = ('torch', [], '')
  if FLAGS.tavlo:
    sides['tavlo'] = ('jax', ['--worker_spec=configs/avatar_synth.py:@device'], '')
  # All compile and warm up at once (untimed); then they take turns.
  procs = {name: start_worker(kind, args, xf)
           for name, (kind, args, xf) in sides.items()}
  info = {name: reply(p, name) for name, p in procs.items()}
  load_start = os.getloadavg()
  times = {name: [] for name in procs}
  for _ in range(FLAGS.steps):
    for name, p in procs.items():
      time.sleep(0.2)   # let the previous side's idle threads go to sleep
      p.stdin.write('step\n')
      p.stdin.flush()
      times[name].append(reply(p, name))
  load_end = os.getloadavg()
  procs['jax'].stdin.write('peak\n')
  procs['jax'].stdin.flush()
  peak = reply(procs['jax'], 'jax')['peak_tflops']
  breakdown = {}
  for name in ('jax', 'torch') if FLAGS.breakdown else ():
    procs[name].stdin.write('breakdown\n')
    procs[name].stdin.flush()
    breakdown[name] = reply(procs[name], name)
  for p in procs.values():
    p.stdin.close()
    p.wait()
  report(info, times, peak, load_start, load_end)
  if breakdown:
    import step_breakdown  # pylint: disable=g-import-not-at-top
    print('\nWhere the time goes (CPU ms per step, 2 profiled steps per '
          'side; benchmarks/step_breakdown.py):')
    print(step_breakdown.table(breakdown['jax'], breakdown['torch']))


def report(info, times, peak, load_start, load_end):
  rows = {}
  for name, samples in times.items():
    wall = statistics.median(s['wall'] for s in samples)
    cpu = statistics.median(s['cpu'] for s in samples)
    flops = info[name]['flops']
    rows[name] = dict(info[name], wall_s=wall, cpu_s=cpu,
                      gflops_per_s=flops / wall / 1e9,
                      wall_all=[s['wall'] for s in samples],
                      cpu_all=[s['cpu'] for s in samples],
                      loss=samples[-1]['loss'])
  torch_wall, torch_cpu = rows['torch']['wall_s'], rows['torch']['cpu_s']
  print(f'{os.cpu_count()} cores{" (each side pinned to one)" if FLAGS.one_core else ""}; load average (1/5/15 min) at the start of '
        f'the timed rounds {load_start[0]:.1f}/{load_start[1]:.1f}/'
        f'{load_start[2]:.1f}, at the end {load_end[0]:.1f}/{load_end[1]:.1f}/'
        f'{load_end[2]:.1f}')
  print(f'torch {rows["torch"]["torch"]} ({rows["torch"]["threads"]} threads), '
        f'jax {rows["jax"]["jax"]}; float32 matmul peak {peak * 1e3:.0f} '
        f'GFLOP/s; {FLAGS.steps} alternating rounds after {FLAGS.warmup} '
        'warm-up steps; medians')
  print('| side | step ms (wall) | step ms (CPU) | GFLOP/step | GFLOP/s | '
        '% of peak | torch/this (wall) | torch/this (CPU) | params |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, r in rows.items():
    print(f"| {name} | {r['wall_s'] * 1e3:.0f} | {r['cpu_s'] * 1e3:.0f} | "
          f"{r['flops'] / 1e9:.1f} | {r['gflops_per_s']:.0f} | "
          f"{100 * r['gflops_per_s'] / (peak * 1e3):.0f}% | "
          + (f"{torch_wall / r['wall_s']:.2f}x | {torch_cpu / r['cpu_s']:.2f}x"
             if name != 'tavlo' else '- | -') + f" | {r['params']:,} |")
  print('torch FLOPs: FlopCounterMode (matmuls/convolutions); jax: XLA cost '
        'analysis (all ops). torch/this > 1: this side is faster.')
  if FLAGS.json_out:
    out = pathlib.Path(FLAGS.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        rows=rows, peak_tflops=peak, load_start=load_start,
        load_end=load_end), indent=1))


if __name__ == '__main__':
  app.run(main)
