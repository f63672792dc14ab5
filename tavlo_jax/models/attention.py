"""Multi-head attention for the AST blocks, with three interchangeable kernels.

  xla        jax.nn.dot_product_attention with a boolean mask. (Its cuDNN
             flash path cannot take a symmetric +-k window, so JAX's
             default implementation, XLA, is used everywhere.)
  blockwise  flash attention: online softmax over key blocks in a `lax.scan`
             and a custom VJP that recomputes them; the [L, L] score matrix
             is never materialised, memory is O(L * block) in training too.
  ring       sequence-parallel over the 'seq' mesh axis, supplied by
             `tavlo_jax.models.ring_attention.ring_temporal_attention`
             (the temporal step only: frames are local to a device, so the
             spatial step then runs on the xla kernel).
The single-device kernels live in kernels.py (ring_attention.py shares them).

Which keys a query may see is described by two things, not by a dense mask, so
the blockwise and ring kernels can rebuild it per block:
  window       |i - j| <= window (-1: no limit). The temporal +-k frames.
  segment_ids  [L] ints; a query sees only keys of its own segment. The
               spatial step's leak guard: audio token = segment 0, visual
               tokens = segment 1, so neither modality reads the other.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tavlo_jax.models import ring_attention as ring
from tavlo_jax.models.kernels import blockwise_attention, xla_attention

# 'ring' and 'all_to_all' are the two ways temporal attention crosses the
# `seq` mesh axis (ring_attention.py; all_to_all measured faster, BENCHMARKS.md).
IMPLEMENTATIONS = ('xla', 'blockwise', 'ring', 'all_to_all')
SEQ_PARALLEL = ('ring', 'all_to_all')


def ring_attention(q, k, v, *, window: int = -1, block_size: int = 128,
                   impl: str = 'ring'):
  """Temporal attention of unfolded [B, T, N, H, d] arrays, T over 'seq'.

  Needs a mesh set with `jax.set_mesh` (the train step's).
  """
  return ring.ring_temporal_attention(q, k, v, window=window, seq_axis='seq',
                                      block_size=block_size, impl=impl)


def attend(q, k, v, *, impl: str, window: int = -1, segment_ids=None,
           block_size: int = 128):
  """Dispatches to a single-device kernel; q, k, v: [N, L, H, d]."""
  if impl == 'xla':
    return xla_attention(q, k, v, window=window, segment_ids=segment_ids)
  if impl == 'blockwise':
    return blockwise_attention(q, k, v, window=window, segment_ids=segment_ids,
                               block_size=block_size)
  raise ValueError(f'attention kernel {impl!r}; expected xla|blockwise '
                   "('ring' runs inside MultiHeadAttention on the time axis)")


class HeadMerge(nn.Module):
  """[..., heads, head_dim] -> [..., width]; see HeadProjection for why."""
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
        ('heads', 'head_dim', 'embed')), (x.shape[-2], x.shape[-1], self.width))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (self.width,))
    y = jnp.einsum('...hk,hkd->...d', x.astype(self.dtype),
                   kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class HeadProjection(nn.Module):
  """x [..., D] -> [..., heads, head_dim] with a 3-D, logically named kernel.

  Not nn.DenseGeneral: it initialises a flat 2-D kernel and reshapes it, and
  flax re-runs that initialiser (to check shapes) on every apply, where the
  3-D logical names then fail to constrain the 2-D array under active rules.
  """
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
        ('embed', 'heads', 'head_dim')),
        (x.shape[-1], self.num_heads, self.head_dim))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('heads', 'head_dim')),
        (self.num_heads, self.head_dim))
    y = jnp.einsum('...d,dhk->...hk', x.astype(self.dtype),
                   kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention along one axis of a [B, T, N, D] token grid.

  Projections run on the unfolded grid so every activation keeps its logical
  names (a folded B*T or B*N axis has none); only the kernel call folds the
  other axes into its batch.
  """
  num_heads: int
  axis: str              # 'space' (within a frame) | 'time' (across frames)
  impl: str = 'xla'
  block_size: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, window: int = -1, segment_ids=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
          f'token width {width} (embed_dim + temporal_pos_dim) is not '
          f'divisible by config.model.num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    names = ('batch', 'time', 'space', 'heads', 'head_dim')

    def proj(name):
      y = HeadProjection(self.num_heads, head_dim, dtype=self.dtype,
                         name=name)(x)
      return nn.with_logical_constraint(y, names)

    q, k, v = proj('query'), proj('key'), proj('value')
    b, t, n = x.shape[:3]
    if self.axis == 'space':
      fold = lambda y: y.reshape(b * t, n, self.num_heads, head_dim)
      unfold = lambda y: y.reshape(b, t, n, self.num_heads, head_dim)
      impl = 'xla' if self.impl in SEQ_PARALLEL else self.impl  # frames are local
    elif self.axis == 'time':
      fold = lambda y: jnp.swapaxes(y, 1, 2).reshape(
          b * n, t, self.num_heads, head_dim)
      unfold = lambda y: jnp.swapaxes(
          y.reshape(b, n, t, self.num_heads, head_dim), 1, 2)
      impl = self.impl
    else:
      raise ValueError(f'attention axis {self.axis!r}; expected space|time')
    if impl in SEQ_PARALLEL:  # works on the unfolded grid, T sharded over 'seq'
      out = ring_attention(q, k, v, window=window, block_size=self.block_size,
                           impl=impl)
    else:
      out = unfold(attend(fold(q), fold(k), fold(v), impl=impl, window=window,
                          segment_ids=segment_ids,
                          block_size=self.block_size))
    out = nn.with_logical_constraint(out, names)
    out = HeadMerge(width, dtype=self.dtype, name='out')(out)
    return nn.with_logical_constraint(out, ('batch', 'time', 'space', 'embed'))


def window_or_none(window: int, length: int) -> int:
  """-1 when the window covers the whole sequence anyway (no mask needed)."""
  return -1 if window < 0 or window >= length - 1 else window

