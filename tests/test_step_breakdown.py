"""benchmarks/step_breakdown.py: the JAX side's rows come from what each
compiled instruction computes, so a small ResNet's step must show each of its
convolutions once forward, once as a weight gradient and (but the stem, whose
input is data) once as an input gradient."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tavlo_jax.models import resnet


@pytest.fixture
def bd(benchmark_module):
  return benchmark_module('step_breakdown')


@pytest.fixture(scope='module')
def resnet_step():
  """Stem + two stages of one block (the second strided, with a projection):
  6 convolutions; BatchNorm, the stem's max pool, Adam."""
  model = resnet.ResNet(stage_sizes=(1, 1), width=8, stage_strides=(1, 2))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 32, 32, 3)),
                  jnp.float32)
  variables = model.init(jax.random.key(0), x, train=True)
  opt = optax.adam(1e-3)
  state = (variables['params'], variables['batch_stats'],
           opt.init(variables['params']))

  def step(state, x):
    params, stats, opt_state = state

    def loss(p):
      y, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.mean(y ** 2), new['batch_stats']

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), value

  return jax.jit(step).lower(state, x).compile(), state, x


def test_each_convolution_is_counted_once_per_pass(bd, resnet_step):
  compiled, _, _ = resnet_step
  kinds = collections.Counter(
      bd.classify_hlo(*entry)
      for entry in bd.hlo_instructions(compiled.as_text()).values())
  assert kinds[bd.ROWS[0]] == 6, kinds
  assert kinds[f'{bd.ROWS[1]}/{bd.WEIGHT_GRAD}'] == 6, kinds
  assert kinds[f'{bd.ROWS[1]}/{bd.INPUT_GRAD}'] == 5, kinds
  for row in ('batch norm', 'max pool', 'optimizer update'):
    assert kinds[row] > 0, (row, kinds)


def test_profiled_rows_and_table(bd, resnet_step):
  compiled, state, x = resnet_step
  holder = [state]

  def step():
    holder[0], value = compiled(holder[0], x)
    return float(value)

  step()
  rows = bd.jax_breakdown(compiled, step)
  for row in (bd.ROWS[0], f'{bd.ROWS[1]}/{bd.WEIGHT_GRAD}',
              f'{bd.ROWS[1]}/{bd.INPUT_GRAD}', 'batch norm'):
    assert rows.get(row, 0) > 0, (row, rows)
  text = bd.table(rows, {bd.ROWS[0]: 1.0, bd.ROWS[1]: 2.0})
  lines = text.splitlines()
  assert len(lines) == 2 + len(bd.ROWS) + 2 + 1
  total = lines[-1].split('|')
  assert float(total[2]) == round(sum(rows.values()))
  assert float(total[3]) == 3.0
  # The backward row adds up its two parts.
  backward = next(l for l in lines if l.startswith(f'| {bd.ROWS[1]} |'))
  parts = sum(rows.get(f'{bd.ROWS[1]}/{p}', 0.0)
              for p in (bd.INPUT_GRAD, bd.WEIGHT_GRAD))
  assert float(backward.split('|')[2]) == round(parts)


def test_torch_rows(bd):
  """The PyTorch side (optional extra): every row but the transposes is fed
  by a small conv net's training step, and Adam counts as the optimizer."""
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
      torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
      torch.nn.Conv2d(8, 8, 3, padding=1, bias=False))
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  x = torch.randn(2, 3, 16, 16)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = net(x).square().mean()
    loss.backward()
    opt.step()
    return loss.item()

  step()
  rows = bd.torch_breakdown(step)
  for row in (bd.ROWS[0], bd.ROWS[1], 'batch norm', 'max pool',
              'optimizer update'):
    assert rows.get(row, 0) > 0, (row, rows)
  assert set(rows) <= set(bd.ROWS)
