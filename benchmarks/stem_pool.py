r"""The ResNet stem's max pool: flax's reduce-window against strided slices.

  python benchmarks/stem_pool.py              # ~3 min on one core
  python benchmarks/stem_pool.py --notrain_steps    # the pools alone, ~20 s

`models.resnet.max_pool_3x3_stride_2` (3x3, stride 2, padding 1) is the
maximum of three strided slices along each axis, where the stem used to call
`nn.max_pool`: the same values, and the same gradient but for tied maxima.
Timed side by side in this process, pinned to CPU 0, float32, CPU time per
call (median of --rounds alternations):
  pools  value and gradient (jit(vjp)) of each pool on the post-ReLU stem
         outputs of EZ-VSL at batch 8: the image stem's 8x112x112x64 and the
         audio stem's 8x129x100x64
  steps  the whole compiled train step with each pool: EZ-VSL as published
         (`configs/paper.py:ezvsl`, batch 8) and the CPU main job's TAVLO
         step (`configs/avatar_synth.py`), as benchmarks/torch_step.py
         builds them
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 7, 'alternations of the two pools')
flags.DEFINE_bool('train_steps', True, 'also time the whole train steps')

POOL_SHAPES = (('image stem, 8x112x112x64', (8, 112, 112, 64)),
               ('audio stem, 8x129x100x64', (8, 129, 100, 64)))
STEPS = (('EZ-VSL step (configs/paper.py:ezvsl)', 'configs/paper.py:ezvsl', 'host'),
         ('main job step (configs/avatar_synth.py)', 'configs/avatar_synth.py',
          'device'))


def flax_pool(x):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  lead = x.shape[:-3]
  y = nn.max_pool(x.reshape((-1,) + x.shape[-3:]), (3, 3), (2, 2),
                  padding=((1, 1), (1, 1)))
  return y.reshape(lead + y.shape[-3:])


def alternate(calls: dict, rounds: int) -> dict[str, float]:
  """Median CPU ms per call of each entry, the entries alternating."""
  for call in calls.values():
    call()
    call()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      t0 = time.process_time()
      call()
      times[name].append(time.process_time() - t0)
  return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main(argv):
  del argv
  os.sched_setaffinity(0, {0})
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tavlo_jax.models import resnet  # pylint: disable=g-import-not-at-top
  pools = {'flax': flax_pool, 'slices': resnet.max_pool_3x3_stride_2}
  print(f'jax {jax.__version__}, pinned to CPU 0, {FLAGS.rounds} alternating '
        'rounds, median CPU ms per call')
  print('| what | flax max_pool | strided slices | speed-up |')
  print('|---|---|---|---|')
  rng = np.random.default_rng(0)
  for label, shape in POOL_SHAPES:
    x = jax.numpy.asarray(np.maximum(rng.standard_normal(shape), 0), 'float32')
    g = jax.numpy.ones(pools['flax'](x).shape, 'float32')
    calls = {}
    for name, pool in pools.items():
      grad = jax.jit(lambda x, g, pool=pool: jax.vjp(pool, x)[1](g)[0])
      calls[name] = lambda grad=grad: grad(x, g).block_until_ready()
    ms = alternate(calls, FLAGS.rounds)
    print(f"| {label}, value + gradient | {ms['flax']:.1f} | "
          f"{ms['slices']:.1f} | {ms['flax'] / ms['slices']:.2f}x |", flush=True)
  if not FLAGS.train_steps:
    return
  import torch_step  # pylint: disable=g-import-not-at-top
  for label, spec, features_on in STEPS:
    sides = {}
    for name, pool in pools.items():
      resnet.max_pool_3x3_stride_2 = pool    # what the model is built with
      sides[name] = torch_step.JaxSide(spec, features_on)
    resnet.max_pool_3x3_stride_2 = pools['slices']

    def step(side):
      side.state, metrics = side.compiled(side.state, side.batch, side.rng)
      side.jax.block_until_ready(metrics)
    calls = {name: (lambda s=s: step(s)) for name, s in sides.items()}
    ms = alternate(calls, FLAGS.rounds)
    print(f"| {label} | {ms['flax']:.0f} | {ms['slices']:.0f} | "
          f"{ms['flax'] / ms['slices']:.2f}x |", flush=True)


if __name__ == '__main__':
  app.run(main)
