"""Pretrained ResNet-18 start: torchvision-named weights -> the Flax encoder.

The reference is a float64 numpy ResNet-18 written here from torchvision's
definition (conv, BatchNorm with running statistics, relu, maxpool, residual
and downsample paths), fed random weights in torchvision's names and OIHW
layout. It needs no torch, so this check always runs; the comparison with
torchvision itself lives in test_models.py (skipped without torch).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tavlo_jax import config_lib, models, sharding, train
from tavlo_jax.models import convert_torch
from tavlo_jax.models.resnet import ResNet

EPS = 1e-5
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))   # torchvision resnet18


def torchvision_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random resnet18 weights, named and laid out as torchvision saves them."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, out_c, in_c, k):
    std = np.sqrt(2.0 / (out_c * k * k))
    sd[f'{name}.weight'] = rng.normal(0, std, (out_c, in_c, k, k)).astype(np.float32)

  def bn(name, c):
    sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f'{name}.bias'] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
    sd[f'{name}.running_mean'] = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    sd[f'{name}.running_var'] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f'{name}.num_batches_tracked'] = np.array(100, np.int64)

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  in_c = 64
  for i, (c, stride) in enumerate(STAGES, start=1):
    for j in range(2):
      conv(f'layer{i}.{j}.conv1', c, in_c, 3)
      bn(f'layer{i}.{j}.bn1', c)
      conv(f'layer{i}.{j}.conv2', c, c, 3)
      bn(f'layer{i}.{j}.bn2', c)
      if j == 0 and (stride != 1 or in_c != c):
        conv(f'layer{i}.{j}.downsample.0', c, in_c, 1)
        bn(f'layer{i}.{j}.downsample.1', c)
      in_c = c
  sd['fc.weight'] = rng.normal(0, 0.01, (1000, 512)).astype(np.float32)
  sd['fc.bias'] = np.zeros(1000, np.float32)
  return sd


# --- the independent float64 reference -------------------------------------------


def np_conv(x, w, stride, pad):
  """x [H, W, Cin], w [Cout, Cin, k, k] (torch OIHW), zero padding."""
  k = w.shape[-1]
  x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  h = (x.shape[0] - k) // stride + 1
  wd = (x.shape[1] - k) // stride + 1
  out = np.zeros((h, wd, w.shape[0]))
  for i in range(k):
    for j in range(k):
      patch = x[i:i + stride * (h - 1) + 1:stride, j:j + stride * (wd - 1) + 1:stride]
      out += patch @ w[:, :, i, j].T
  return out


def np_bn(x, sd, name):
  g = lambda leaf: sd[f'{name}.{leaf}'].astype(np.float64)
  return (x - g('running_mean')) / np.sqrt(g('running_var') + EPS) * g('weight') + g('bias')


def np_maxpool(x):
  """3x3, stride 2, padding 1 (padding never wins the max)."""
  x = np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  h = (x.shape[0] - 3) // 2 + 1
  w = (x.shape[1] - 3) // 2 + 1
  return np.max([x[i:i + 2 * (h - 1) + 1:2, j:j + 2 * (w - 1) + 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def np_resnet18(image, sd):
  """One [H, W, 3] image -> the last stage's [H/32, W/32, 512] features."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  relu = lambda v: np.maximum(v, 0)
  x = relu(np_bn(np_conv(image, sd['conv1.weight'], 2, 3), sd, 'bn1'))
  x = np_maxpool(x)
  for i, (_, stride) in enumerate(STAGES, start=1):
    for j in range(2):
      name = f'layer{i}.{j}'
      s = stride if j == 0 else 1
      y = relu(np_bn(np_conv(x, sd[f'{name}.conv1.weight'], s, 1), sd, f'{name}.bn1'))
      y = np_bn(np_conv(y, sd[f'{name}.conv2.weight'], 1, 1), sd, f'{name}.bn2')
      if f'{name}.downsample.0.weight' in sd:
        x = np_bn(np_conv(x, sd[f'{name}.downsample.0.weight'], s, 0), sd,
                  f'{name}.downsample.1')
      x = relu(y + x)
  return x


# --- files as users get them --------------------------------------------------------


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  """The safetensors layout by hand (u64 header size, JSON header, data), so
  the file format is checked independently of the reader."""
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  codes = {np.dtype(np.float32): 'F32', np.dtype(np.int64): 'I64'}
  for name, value in tensors.items():
    blob = np.ascontiguousarray(value).astype(value.dtype.newbyteorder('<')).tobytes()
    header[name] = dict(dtype=codes[value.dtype], shape=list(value.shape),
                        data_offsets=[offset, offset + len(blob)])
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(np.uint64(len(text)).astype('<u8').tobytes() + text + b''.join(blobs))


def flax_resnet18(images, state_dict) -> np.ndarray:
  """[N, H, W, 3] images (as one clip of N frames) -> our ResNet's features
  with the converted weights, float32."""
  net = ResNet()                         # torchvision's resnet18 shape
  x = jnp.asarray(images[None], jnp.float32)                 # [B=1, T=N, ...]
  variables = nn.meta.unbox(jax.eval_shape(
      lambda: net.init(jax.random.key(0), x, train=False)))
  variables = convert_torch.load_visual_encoder(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables), state_dict,
      scope=None)
  return np.asarray(net.apply(variables, x, train=False))[0]


@pytest.fixture(scope='module')
def state_dict():
  return torchvision_state_dict()


@pytest.mark.parametrize('suffix', ['safetensors', 'npz'])
def test_converted_resnet18_matches_a_float64_numpy_resnet18(state_dict, suffix,
                                                             tmp_path):
  path = tmp_path / f'resnet18.{suffix}'
  if suffix == 'npz':
    np.savez(path, **state_dict)
  else:
    write_safetensors(path, state_dict)
  loaded = convert_torch.load_state_dict(str(path))
  for key in ('conv1.weight', 'layer3.0.downsample.1.running_var'):
    np.testing.assert_array_equal(loaded[key], state_dict[key])

  images = np.random.default_rng(1).uniform(-2, 2, (2, 64, 96, 3))
  got = flax_resnet18(images, loaded)
  want = np.stack([np_resnet18(img, state_dict) for img in images])
  assert got.shape == want.shape == (2, 2, 3, 512)
  scale = np.abs(want).max()
  assert scale > 1.0                     # the features are not trivially small
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_a_wrong_architecture_or_tensor_is_refused(state_dict):
  net = ResNet()
  x = jnp.zeros((1, 1, 32, 32, 3))
  variables = nn.meta.unbox(jax.eval_shape(
      lambda: net.init(jax.random.key(0), x, train=False)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  bad = dict(state_dict)
  bad['layer2.0.conv1.weight'] = bad['layer2.0.conv1.weight'][:, :, :1, :1]
  with pytest.raises(ValueError, match='stage2_block1/conv1/kernel: shape'):
    convert_torch.load_visual_encoder(zeros, bad, scope=None)
  with pytest.raises(ValueError, match='do not match'):
    convert_torch.load_visual_encoder(
        zeros, {k: v for k, v in state_dict.items() if 'layer4' not in k},
        scope=None)


def small_resnet18_config(init_from: str) -> ml_collections.ConfigDict:
  """The runlocal model with a torchvision-shaped visual encoder."""
  config = config_lib.load_config_file('configs/paper.py:runlocal')
  v = config.model.visual
  v.stage_sizes, v.stage_strides, v.width = (2, 2, 2, 2), (1, 2, 2, 2), 64
  v.output_stride, v.norm, v.init_from = 32, 'batch', init_from
  config.input.image_size = 64
  return config


@pytest.mark.slow   # compiles a ResNet-18 train-state init
def test_init_from_loads_the_file_into_a_fresh_train_state(state_dict, tmp_path):
  path = tmp_path / 'model.safetensors'
  write_safetensors(path, state_dict)
  config = small_resnet18_config(str(path))
  model = models.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  init_rng, _ = train.base_rngs(config)
  state, _, _ = train.create_state(config, model, mesh, init_rng)
  loaded = train._initial_weights(config, state)   # pylint: disable=protected-access
  enc = loaded.params['visual_encoder']
  np.testing.assert_array_equal(
      np.asarray(enc['stage3_block1']['downsample_conv']['kernel']),
      state_dict['layer3.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(loaded.batch_stats['visual_encoder']['stem_norm']['var']),
      state_dict['bn1.running_var'])
  # Everything outside the visual encoder keeps its initialisation.
  for name in loaded.params:
    if name != 'visual_encoder':
      jax.tree.map(np.testing.assert_array_equal, loaded.params[name],
                   state.params[name])
  # and each array keeps the sharding the train step was compiled for
  assert (enc['stem_conv']['kernel'].sharding
          == state.params['visual_encoder']['stem_conv']['kernel'].sharding)


def test_init_from_is_checked_before_training(tmp_path):
  with pytest.raises(ValueError, match='init_from=.*no such file'):
    models.build_model(small_resnet18_config(str(tmp_path / 'missing.npz')))
  path = tmp_path / 'weights.npz'
  np.savez(path, x=np.zeros(1))
  config = small_resnet18_config(str(path))
  config.model.visual.width = 32
  with pytest.raises(ValueError, match=r'width=32 \(need 64\)'):
    models.build_model(config)


def test_pth_converts_once_to_an_npz_that_training_reads(state_dict, tmp_path, capsys):
  assert convert_torch.main([str(tmp_path / 'absent.pth'), str(tmp_path / 'x.npz')]) == 2
  assert 'absent.pth: no weights file' in capsys.readouterr().err
  torch = pytest.importorskip('torch', reason='torch is not installed')
  pth, npz = tmp_path / 'resnet18.pth', tmp_path / 'resnet18.npz'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
  assert convert_torch.main([str(pth), str(npz)]) == 0
  loaded = convert_torch.load_state_dict(str(npz))
  assert set(loaded) == {k for k in state_dict if 'num_batches_tracked' not in k}
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, state_dict[k])


def test_torchvision_numpy_and_flax_agree_on_the_same_weights(state_dict):
  """The reference above against torchvision itself (where installed): the
  three forward passes of one set of torchvision-layout weights agree."""
  torch = pytest.importorskip('torch', reason='torch is not installed')
  torchvision = pytest.importorskip('torchvision', reason='torchvision is not installed')
  tnet = torchvision.models.resnet18().double().eval()
  tnet.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  trunk = torch.nn.Sequential(*list(tnet.children())[:-2])
  images = np.random.default_rng(2).uniform(-2, 2, (2, 64, 96, 3))
  with torch.no_grad():
    theirs = trunk(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  theirs = theirs.transpose(0, 2, 3, 1)                      # float64, NHWC
  reference = np.stack([np_resnet18(img, state_dict) for img in images])
  ours = flax_resnet18(images, state_dict)
  scale = np.abs(theirs).max()
  print(f'\nmax |torchvision|={scale:.3f}; max abs difference: numpy float64 vs '
        f'torchvision float64 {np.abs(reference - theirs).max():.2e}, Flax float32 vs '
        f'torchvision {np.abs(ours - theirs).max():.2e} '
        f'(relative {np.abs(ours - theirs).max() / scale:.2e})')
  np.testing.assert_allclose(reference, theirs, rtol=0, atol=1e-9 * scale)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
