"""Load torchvision ResNet-18 weights into the visual encoder (optional).

Training sets `config.model.visual.init_from` to a local weights file and
`train.run` calls `init_visual_encoder` on a fresh state. No torch is needed
for .safetensors (e.g. timm's `resnet18.tv_in1k` model.safetensors, which
holds torchvision's ImageNet weights under torchvision's names) or .npz; a
torchvision .pth is converted once, where torch is installed:

  python -m tavlo_jax.models.convert_torch resnet18-f37072fd.pth resnet18.npz

In code:

  sd = load_state_dict('model.safetensors')            # or .npz / .pth
  variables = load_visual_encoder(variables, sd)

The encoder must be the torchvision shape: stem 'imagenet', width 64,
stage_sizes (2, 2, 2, 2), stage_strides (1, 2, 2, 2), norm 'batch' (set those
in config.model.visual; output stride 32, so use >= 256 px frames for an 8x8
grid). Layouts: torch conv weights are OIHW, Flax kernels HWIO; BatchNorm
weight/bias/running_mean/running_var -> scale/bias (params) and mean/var
(batch_stats). The fc layer is not used.
"""

from __future__ import annotations

import json
import os
import re
import sys

import flax
import flax.linen as nn
import numpy as np

_TORCH_NORM = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
               'running_mean': ('batch_stats', 'mean'),
               'running_var': ('batch_stats', 'var')}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A local torchvision state dict as numpy arrays."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no weights file at {path}')
  if path.endswith('.npz'):
    return dict(np.load(path))
  if path.endswith('.safetensors'):
    try:
      from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
      return st.load_file(path)
    except ImportError:
      return _read_safetensors(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs torch; convert it to .safetensors '
                      'or .npz elsewhere, or install torch') from e
  sd = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() for k, v in sd.items() if v.is_floating_point()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The safetensors layout (u64 header size, JSON header, raw little-endian
  buffers), for when the safetensors package is not installed."""
  dtypes = {'F32': np.float32, 'F16': np.float16, 'F64': np.float64,
            'I64': np.int64, 'I32': np.int32}
  with open(path, 'rb') as f:
    size = int(np.frombuffer(f.read(8), '<u8')[0])
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in dtypes:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype '
                       f'{info["dtype"]}')
    start, end = info['data_offsets']
    out[name] = np.frombuffer(data[start:end], dtypes[info['dtype']]).reshape(
        info['shape']).astype(np.float32)
  return out


def _flax_path(torch_key: str) -> tuple[tuple[str, ...], str]:
  """'layer2.0.downsample.1.running_var' -> (('stage2_block1',
  'downsample_norm'), 'running_var')."""
  module, _, leaf = torch_key.rpartition('.')
  module = {'conv1': 'stem_conv', 'bn1': 'stem_norm'}.get(module, module)
  m = re.fullmatch(r'layer(\d)\.(\d+)\.(.+)', module)
  if m:
    inner = {'conv1': 'conv1', 'bn1': 'norm1', 'conv2': 'conv2', 'bn2': 'norm2',
             'downsample.0': 'downsample_conv',
             'downsample.1': 'downsample_norm'}[m.group(3)]
    return (f'stage{m.group(1)}_block{int(m.group(2)) + 1}', inner), leaf
  return (module,), leaf


def torchvision_to_flax(state_dict) -> dict:
  """{'params': ..., 'batch_stats': ...} for `ResNet` from a torchvision
  resnet state dict (fc.* and num_batches_tracked are dropped)."""
  flat = {}
  for key, value in state_dict.items():
    if key.startswith('fc.') or key.endswith('num_batches_tracked'):
      continue
    path, leaf = _flax_path(key)
    value = np.asarray(value, np.float32)
    if value.ndim == 4:                          # OIHW -> HWIO
      flat[('params',) + path + ('kernel',)] = value.transpose(2, 3, 1, 0)
    elif leaf in _TORCH_NORM:
      collection, name = _TORCH_NORM[leaf]
      flat[(collection,) + path + (name,)] = value
    else:
      raise ValueError(f'unexpected tensor {key} {value.shape} in a '
                       'torchvision ResNet state dict')
  return flax.traverse_util.unflatten_dict(flat)


def _check_matches(ours: set, wanted: set) -> None:
  if ours != wanted:
    raise ValueError(
        'the torchvision weights do not match the visual encoder '
        '(config.model.visual must be stem=imagenet, width=64, stage_sizes='
        '(2,2,2,2), stage_strides=(1,2,2,2), norm=batch); missing: '
        f'{sorted(ours - wanted)[:5]}, unexpected: {sorted(wanted - ours)[:5]}')


def _check_shape(target: tuple, have, value) -> None:
  if tuple(have) != tuple(value.shape):
    raise ValueError(f'{"/".join(target)}: shape {tuple(have)} but the '
                     f'weights give {tuple(value.shape)}')


def load_visual_encoder(variables, state_dict,
                        scope: str | None = 'visual_encoder'):
  """Returns (unboxed) `variables` with the encoder's weights replaced.

  scope: the encoder's submodule name in `variables` (None: the variables
  are a bare `ResNet`'s). Every encoder variable must be provided with its
  exact shape and every provided tensor used: a mismatched architecture fails
  loudly instead of loading half the weights.
  """
  prefix = () if scope is None else (scope,)
  at = lambda k: (k[0],) + prefix + k[1:]
  variables = flax.core.unfreeze(nn.meta.unbox(variables))
  converted = flax.traverse_util.flatten_dict(torchvision_to_flax(state_dict))
  flat = flax.traverse_util.flatten_dict(variables)
  ours = {k for k in flat if k[1:1 + len(prefix)] == prefix}
  wanted = {at(k) for k in converted}
  _check_matches(ours, wanted)
  for key, value in converted.items():
    target = at(key)
    _check_shape(target, flat[target].shape, value)
    flat[target] = value.astype(flat[target].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def init_visual_encoder(params, batch_stats, path: str,
                        scope: str = 'visual_encoder'):
  """(params, batch_stats) of a fresh train state with the encoder's weights
  read from `path` (.safetensors, .npz or, with torch, .pth).

  Works on global (sharded, possibly multi-process) jax arrays: each new
  array gets the old one's sharding and every process fills its own shards
  from its copy of the file, so nothing is gathered on one host.
  """
  import jax  # pylint: disable=g-import-not-at-top
  converted = flax.traverse_util.flatten_dict(
      torchvision_to_flax(load_state_dict(path)))
  trees = {'params': params, 'batch_stats': batch_stats or {}}
  flat = {(c,) + k: v for c, tree in trees.items()
          for k, v in flax.traverse_util.flatten_dict(tree).items()}
  ours = {k for k in flat if k[1] == scope}
  wanted = {(k[0], scope) + k[1:] for k in converted}
  _check_matches(ours, wanted)
  for key, value in converted.items():
    target = (key[0], scope) + key[1:]
    old = flat[target]
    _check_shape(target, old.shape, value)
    value = value.astype(old.dtype)
    flat[target] = jax.make_array_from_callback(
        old.shape, old.sharding, lambda index, v=value: v[index])
  out = {c: flax.traverse_util.unflatten_dict(
      {k[1:]: v for k, v in flat.items() if k[0] == c}) for c in trees}
  return out['params'], out['batch_stats']


def main(argv=None) -> int:
  """One-time conversion: a torchvision .pth (needs torch) -> .npz."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      description='Converts torchvision ResNet weights (.pth) to an .npz '
      'that training reads without torch (config.model.visual.init_from).')
  parser.add_argument('source', help='torchvision state dict (.pth)')
  parser.add_argument('target', help='output .npz')
  args = parser.parse_args(argv)
  try:
    state_dict = load_state_dict(args.source)
    torchvision_to_flax(state_dict)         # refuse what would not load
  except (OSError, ImportError, ValueError) as e:
    print(f'error: {args.source}: {e}', file=sys.stderr)
    return 2
  np.savez(args.target, **state_dict)
  print(f'wrote {len(state_dict)} tensors to {args.target}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
