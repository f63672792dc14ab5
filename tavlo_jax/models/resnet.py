"""Per-frame ResNet (BasicBlock, i.e. ResNet-18 family) and the shared norms.

The encoder takes frames with any leading batch axes ([B, T, S, S, 3]): Flax
convolutions fold them internally, so B and T keep their logical names (and
shardings, 'time' included) around every layer instead of being merged into
one anonymous axis.

Layer names follow torchvision's resnet18 (conv1/bn1 -> stem_conv/stem_norm,
layerI.J -> stageI_blockJ, downsample.0/1 -> downsample_conv/downsample_norm)
so `convert_torch.py` is a plain renaming. Padding is explicit (torch style)
rather than 'SAME', which pads asymmetrically for stride 2 and would break
parity with pretrained weights.

BatchNorm under sharding: `axis_name=None` is right for jit over a global
array. The batch mean is a jnp reduction over the GLOBAL (sharded) batch, and
XLA inserts the cross-device all-reduce itself; an `axis_name` is only needed
inside pmap/shard_map. Statistics therefore equal single-device ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

IMAGE_AXES = ('batch', 'time', 'height', 'width', 'channels')
_CONV_KERNEL_AXES = (None, None, None, 'channels')   # kh, kw, in, out


def conv(features: int, kernel: int, stride: int = 1, *, pad: int | None = None,
         dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  pad = kernel // 2 if pad is None else pad
  return nn.Conv(
      features, (kernel, kernel), (stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name,
      # torchvision's init: kaiming normal, fan_out, relu gain.
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
          _CONV_KERNEL_AXES))


def norm_layer(kind: str, train: bool, features: int, *, dtype=jnp.float32,
               image_axes: int = 3, name: str | None = None) -> nn.Module:
  """BatchNorm (running stats in 'batch_stats') or GroupNorm.

  GroupNorm uses 32 groups where the width allows (gcd for small widths);
  image_axes: how many trailing axes (channels included) one sample's
  statistics span: 3 = one image (H, W, C), so frames never share them.
  """
  params = dict(
      scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                              ('channels',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             ('channels',)))
  if kind == 'batch':
    # momentum/epsilon as in torch (momentum 0.1 there = 0.9 here).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, axis_name=None, dtype=dtype, name=name,
                        **params)
  if kind == 'group':
    return nn.GroupNorm(num_groups=math.gcd(32, features), epsilon=1e-5,
                        reduction_axes=tuple(range(-image_axes, 0)),
                        dtype=dtype, name=name, **params)
  raise ValueError(f'norm={kind!r}; expected batch|group '
                   '(config.model.visual.norm / config.model.audio.norm)')


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  norm: str = 'batch'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = conv(self.features, 3, self.stride, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(norm_layer(self.norm, train, self.features, dtype=self.dtype,
                           name='norm1')(y))
    y = conv(self.features, 3, dtype=self.dtype, name='conv2')(y)
    y = norm_layer(self.norm, train, self.features, dtype=self.dtype,
                   name='norm2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, 1, self.stride, pad=0, dtype=self.dtype,
                      name='downsample_conv')(x)
      residual = norm_layer(self.norm, train, self.features,
                            dtype=self.dtype, name='downsample_norm')(residual)
    return nn.with_logical_constraint(nn.relu(y + residual), IMAGE_AXES)


def max_pool_3x3_stride_2(x):
  """The stem's 3x3 max pool, stride 2, padding 1 (torchvision's), over the
  two axes before the last, with any leading axes: the maximum of three
  strided slices along one axis, then along the other.

  The same values as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`, and
  the same gradient except among tied maxima (split here, given to one
  there); after the ReLU before it the only ties are zeros, whose gradient
  the ReLU drops. Why not flax's: XLA:CPU differentiates a reduce-window max
  as a variadic reduce-window over the value and its position, 3-4x slower
  than these fused slices at batch 8 (one core: 243 against 78 ms for the
  image stem's pool, 215 against 58 for EZ-VSL's audio stem), which made
  the two pools ~15% of EZ-VSL's CPU train step (research log).
  """
  with jax.named_scope('max_pool'):   # names its ops in profiles
    for axis in (x.ndim - 3, x.ndim - 2):
      size = x.shape[axis]
      out = (size - 1) // 2 + 1
      # One -inf row in front, and one at the end where the last window
      # needs it.
      pad = [(0, 0, 0)] * x.ndim
      pad[axis] = (1, 2 * out - size, 0)
      padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype), pad)
      slices = [lax.slice_in_dim(padded, k, k + 2 * (out - 1) + 1, 2, axis)
                for k in range(3)]
      x = jnp.maximum(jnp.maximum(slices[0], slices[1]), slices[2])
    return x


def total_stride(stem: str, stage_strides: Sequence[int]) -> int:
  return (4 if stem == 'imagenet' else 1) * math.prod(stage_strides)


class ResNet(nn.Module):
  """[B, T, S, S, 3] normalised frames -> [B, T, S/stride, S/stride, C]."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  stem: str = 'imagenet'              # imagenet (7x7/2 + maxpool) | small
  stage_strides: Sequence[int] = (1, 2, 2, 2)
  norm: str = 'batch'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if len(self.stage_sizes) != len(self.stage_strides):
      raise ValueError(
          f'config.model.visual.stage_sizes={tuple(self.stage_sizes)} and '
          f'stage_strides={tuple(self.stage_strides)} must have equal length')
    x = nn.with_logical_constraint(x, IMAGE_AXES)
    if self.stem == 'imagenet':
      x = conv(self.width, 7, 2, dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm_layer(self.norm, train, self.width, dtype=self.dtype,
                             name='stem_norm')(x))
      x = max_pool_3x3_stride_2(x)
    elif self.stem == 'small':
      x = conv(self.width, 3, dtype=self.dtype, name='stem_conv')(x)
      x = nn.relu(norm_layer(self.norm, train, self.width, dtype=self.dtype,
                             name='stem_norm')(x))
    else:
      raise ValueError(f'config.model.visual.stem={self.stem!r}; '
                       'expected imagenet|small')
    for i, (blocks, stride) in enumerate(zip(self.stage_sizes,
                                             self.stage_strides)):
      for j in range(blocks):
        x = BasicBlock(self.width * 2**i, stride if j == 0 else 1, self.norm,
                       self.dtype, name=f'stage{i + 1}_block{j + 1}')(x, train)
    return x
