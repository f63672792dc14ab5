r"""EZ-VSL's convolution shapes one by one: XLA:CPU against PyTorch, one core.

  PYTHONPATH=~/torch_site python benchmarks/conv_layers.py      # ~2 min

(torch is an optional extra: see benchmarks/torch_step.py.) Where does the
JAX step lose to PyTorch's? Each distinct convolution of EZ-VSL's two
ResNet-18s at batch 8 (the image stem on 224 px, the audio stem on the
1 x 257 x 200 spectrogram, one 3x3 conv per stage, a strided 3x3 and a 1x1
projection) is timed alone, forward and backward (the input gradient only
where a network needs it: not for the stems), float32, bias-free:
  jax    lax.conv_general_dilated in NHWC under jit(grad), XLA's default
         (YNNPACK) convolutions; --xla_flags adds another JAX side
  torch  nn.Conv2d in NCHW, eager, torch.set_num_threads(1)
Each side runs in its own process pinned to CPU 0, and the sides alternate
--rounds times; per shape: median CPU ms over the rounds (each round's
value is the median of --repeats calls), GFLOP/s, and jax / torch speed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 3, 'alternations of the sides')
flags.DEFINE_integer('repeats', 7, 'timed calls per shape and round')
flags.DEFINE_multi_string('xla_flags', [], 'NAME=FLAGS: one more JAX side '
                          'with these XLA_FLAGS (repeatable)')
flags.DEFINE_string('side', '', 'internal: run one side and print JSON')

# (name, batch, height, width, in channels, out channels, kernel, stride,
#  input gradient needed)
SHAPES = (
    ('image stem 7x7/2', 8, 224, 224, 3, 64, 7, 2, False),
    ('audio stem 7x7/2', 8, 257, 200, 1, 64, 7, 2, False),
    ('stage 1 3x3 @56', 8, 56, 56, 64, 64, 3, 1, True),
    ('stage 2 3x3/2 @56', 8, 56, 56, 64, 128, 3, 2, True),
    ('stage 2 1x1/2 projection', 8, 56, 56, 64, 128, 1, 2, True),
    ('stage 2 3x3 @28', 8, 28, 28, 128, 128, 3, 1, True),
    ('stage 3 3x3 @14', 8, 14, 14, 256, 256, 3, 1, True),
    ('stage 4 3x3 @7', 8, 7, 7, 512, 512, 3, 1, True),
)


def gflop(shape) -> float:
  _, b, h, w, ci, co, k, s, dx = shape
  out = b * -(-h // s) * -(-w // s)
  return (3 if dx else 2) * 2 * out * ci * co * k * k / 1e9


def median_ms(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.process_time()
    fn()
    times.append(time.process_time() - t0)
  return 1e3 * statistics.median(times)


def jax_side(repeats: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  rng = np.random.default_rng(0)
  for _, b, h, w, ci, co, k, s, dx in SHAPES:
    x = jnp.asarray(rng.random((b, h, w, ci)), jnp.float32)
    kernel = jnp.asarray(rng.random((k, k, ci, co)) * 0.01, jnp.float32)
    pad = [(k // 2, k // 2)] * 2

    def loss(x, kernel, s=s, pad=pad):
      y = lax.conv_general_dilated(x, kernel, (s, s), pad,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.sum(y * y)
    step = jax.jit(jax.grad(loss, argnums=(0, 1) if dx else 1))
    out.append(median_ms(
        lambda step=step, x=x, kernel=kernel: jax.block_until_ready(
            step(x, kernel)), repeats))
  return out


def torch_side(repeats: int) -> list[float]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  torch.manual_seed(0)
  out = []
  for _, b, h, w, ci, co, k, s, dx in SHAPES:
    x = torch.rand(b, ci, h, w, requires_grad=dx)
    conv = torch.nn.Conv2d(ci, co, k, s, k // 2, bias=False)

    def step(conv=conv, x=x):
      conv.zero_grad(set_to_none=True)
      conv(x).pow(2).sum().backward()
    out.append(median_ms(step, repeats))
  return out


def run_side(name: str, xla: str) -> list[float]:
  env = dict(os.environ, XLA_FLAGS=xla)
  cmd = ['taskset', '-c', '0', sys.executable, __file__,
         f'--side={name.split("=")[0]}', f'--repeats={FLAGS.repeats}']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'side {name} failed:\n{proc.stderr[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.side:
    fn = torch_side if FLAGS.side == 'torch' else jax_side
    print(json.dumps(fn(FLAGS.repeats)))
    return
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise app.UsageError('torch is not importable: install the optional '
                         'extra (benchmarks/torch_step.py says how)')
  sides = {'jax': '', 'torch': ''}
  for spec in FLAGS.xla_flags:
    name, _, xla = spec.partition('=')
    sides[f'jax {name}'] = xla
  runs = {name: [] for name in sides}
  for _ in range(FLAGS.rounds):
    for name, xla in sides.items():
      side = 'torch' if name == 'torch' else 'jax'
      runs[name].append(run_side(side, xla))
  ms = {name: [statistics.median(r[i] for r in rounds)
               for i in range(len(SHAPES))] for name, rounds in runs.items()}
  print(f'## one convolution, forward + backward, one core, median of '
        f'{FLAGS.rounds} alternating rounds ({os.cpu_count()} cores, load '
        f'{os.getloadavg()[0]:.1f})')
  names = list(sides)
  print('| convolution | GFLOP | ' + ' | '.join(f'{n} ms (GFLOP/s)'
                                                 for n in names)
        + ' | jax / torch speed |')
  print('|---|---|' + '---|' * len(names) + '---|')
  for i, shape in enumerate(SHAPES):
    g = gflop(shape)
    cells = ' | '.join(f'{ms[n][i]:.1f} ({g / ms[n][i] * 1e3:.0f})'
                       for n in names)
    print(f'| {shape[0]} | {g:.2f} | {cells} | '
          f'{ms["torch"][i] / ms["jax"][i]:.2f}x |')
  total = {n: sum(ms[n]) for n in names}
  print(f'| all of the above | {sum(gflop(s) for s in SHAPES):.2f} | '
        + ' | '.join(f'{total[n]:.1f}' for n in names)
        + f' | {total["torch"] / total["jax"]:.2f}x |')


if __name__ == '__main__':
  app.run(main)
