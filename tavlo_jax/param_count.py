r"""Parameter and FLOP counts of a config's model.

  python -m tavlo_jax.param_count --config=configs/avatar_synth.py
  python -m tavlo_jax.param_count --config=configs/avatar_synth.py:ezvsl --train

FLOPs come from XLA's cost analysis of the compiled forward pass (eval mode)
for `--batch` clips, and with --train of one forward+backward of the
configured loss; divide by the batch for per-clip figures. Shapes only: no
weights are materialised.
"""

from __future__ import annotations

import functools
import math

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from tavlo_jax import cli, losses, models
# main's --config flag (locked) and its one-line errors for bad overrides.
from tavlo_jax import main as main_lib

_CONFIG = main_lib._CONFIG  # pylint: disable=protected-access
_BATCH = flags.DEFINE_integer('batch', 2, 'clips per batch for the FLOP count')
_TRAIN = flags.DEFINE_bool('train', False, 'also count a training step')


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):     # older jax: one dict per program
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def count(config, batch: int = 2, flops: bool = True, train: bool = False):
  """dict(params, params_by_module, forward_flops[, train_flops])."""
  model = models.build_model(config)
  frames, audio = models.input_spec(config, batch)
  variables = nn.meta.unbox(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), frames,
      audio))
  sizes = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  out = dict(params=sizes(variables['params']),
             params_by_module={k: sizes(v)
                               for k, v in variables['params'].items()})
  if flops:
    forward = jax.jit(functools.partial(model.apply, train=False))
    out['forward_flops'] = _flops(forward.lower(variables, frames,
                                                audio).compile())
  if train:
    loss_fn = losses.make_loss(config)
    mutable = ['batch_stats'] if 'batch_stats' in variables else False

    def objective(params, frames, audio):
      out = model.apply({**variables, 'params': params}, frames, audio,
                        train=True, mutable=mutable)
      return loss_fn(out[0] if mutable else out)[0]
    step = jax.jit(jax.value_and_grad(objective))
    out['train_flops'] = _flops(step.lower(variables['params'], frames,
                                               audio).compile())
  return out


@cli.user_errors(ValueError)   # a config whose fields do not fit together
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/avatar_synth.py')
  result = count(config, _BATCH.value, flops=True, train=_TRAIN.value)
  print(f'model {config.model.name}: {result["params"]:,} parameters')
  for name, n in result['params_by_module'].items():
    print(f'  {name:24s} {n:>12,}')
  b = _BATCH.value
  print(f'forward (eval): {result["forward_flops"] / b / 1e9:.3f} '
        'GFLOP per clip')
  if 'train_flops' in result:
    print(f'train step (fwd+bwd): {result["train_flops"] / b / 1e9:.3f} '
          'GFLOP per clip')


if __name__ == '__main__':
  app.run(main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access
