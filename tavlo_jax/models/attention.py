"""Multi-head attention for the AST blocks, with three interchangeable kernels.

  xla        jax.nn.dot_product_attention with a boolean mask. (Its cuDNN
             flash path cannot take a symmetric +-k window, so JAX's
             default implementation, XLA, is used everywhere.)
  blockwise  online-softmax over key blocks in a `lax.scan`: the [L, L] score
             matrix is never materialised, forward memory is O(L * block).
  ring       sequence-parallel over the 'seq' mesh axis, supplied by
             `tavlo_jax.models.ring_attention.ring_temporal_attention`
             (imported lazily; the temporal step only: frames are local to a
             device, so the spatial step then runs on the xla kernel).

Which keys a query may see is described by two things, not by a dense mask, so
the blockwise and ring kernels can rebuild it per block:
  window       |i - j| <= window (-1: no limit). The temporal +-k frames.
  segment_ids  [L] ints; a query sees only keys of its own segment. The
               spatial step's leak guard: audio token = segment 0, visual
               tokens = segment 1, so neither modality reads the other.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# 'ring' and 'all_to_all' are the two ways temporal attention crosses the
# `seq` mesh axis (ring_attention.py; all_to_all measured faster, BENCHMARKS.md).
IMPLEMENTATIONS = ('xla', 'blockwise', 'ring', 'all_to_all')
SEQ_PARALLEL = ('ring', 'all_to_all')


def allowed_pairs(q_pos, k_pos, window: int = -1, q_seg=None, k_seg=None):
  """Boolean [Lq, Lk]: may query at q_pos attend to key at k_pos?"""
  ok = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
  if window >= 0:
    ok &= jnp.abs(q_pos[:, None] - k_pos[None, :]) <= window
  if q_seg is not None:
    ok &= q_seg[:, None] == k_seg[None, :]
  return ok


def xla_attention(q, k, v, *, window: int = -1, segment_ids=None):
  """q, k, v: [N, L, H, d] -> [N, L, H, d] via jax.nn.dot_product_attention."""
  length = q.shape[1]
  mask = None
  if window >= 0 or segment_ids is not None:
    pos = jnp.arange(length)
    mask = allowed_pairs(pos, pos, window, segment_ids, segment_ids)[None, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def blockwise_attention(q, k, v, *, window: int = -1, segment_ids=None,
                        block_size: int = 128):
  """Same result as `xla_attention`, scanning over key blocks (online softmax).

  Statistics are kept in float32 whatever the input dtype. The scan body is
  rematerialised, so the backward pass also never holds an [L, L] matrix
  (it keeps the per-block carries instead).
  """
  n, length, heads, depth = q.shape
  num_blocks = -(-length // block_size)
  padded = num_blocks * block_size
  pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]

  def to_blocks(x):  # [N, P, H, d] -> [nb, N, block, H, d]
    x = jnp.pad(x, pad).reshape(n, num_blocks, block_size, heads, depth)
    return jnp.moveaxis(x, 1, 0)

  k_pos = jnp.arange(padded).reshape(num_blocks, block_size)
  seg = segment_ids if segment_ids is not None else jnp.zeros(length, jnp.int32)
  k_seg = jnp.pad(seg, (0, padded - length), constant_values=-1)
  k_seg = k_seg.reshape(num_blocks, block_size)
  q_pos = jnp.arange(length)
  scale = 1.0 / math.sqrt(depth)
  qf = q.astype(jnp.float32) * scale

  @jax.checkpoint
  def step(carry, block):
    m, l, acc = carry
    kb, vb, kpos, kseg = block
    s = jnp.einsum('nqhd,nkhd->nhqk', qf, kb.astype(jnp.float32))
    ok = allowed_pairs(q_pos, kpos, window, seg, kseg) & (kpos < length)[None]
    s = jnp.where(ok[None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    # A row may have seen no allowed key yet (m_new = -inf): subtract 0
    # there instead, so exp() gives 0 rather than NaN.
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum('nhqk,nkhd->nqhd', p, vb.astype(jnp.float32))
    acc = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((n, heads, length), -jnp.inf, jnp.float32),
          jnp.zeros((n, heads, length), jnp.float32),
          jnp.zeros((n, length, heads, depth), jnp.float32))
  (_, l, acc), _ = jax.lax.scan(
      step, init, (to_blocks(k), to_blocks(v), k_pos, k_seg))
  # Every query sees at least itself, so l > 0.
  return (acc / jnp.moveaxis(l, 1, 2)[..., None]).astype(q.dtype)


def ring_attention(q, k, v, *, window: int = -1, block_size: int = 128,
                   impl: str = 'ring'):
  """Temporal attention of unfolded [B, T, N, H, d] arrays, T over 'seq'.

  Needs a mesh set with `jax.set_mesh` (the train step's); imported lazily so
  the xla/blockwise paths never depend on ring_attention.py.
  """
  try:
    # pylint: disable-next=g-import-not-at-top
    from tavlo_jax.models import ring_attention as ring
  except ImportError as e:
    raise NotImplementedError(
        "config.model.attention_impl='ring' needs "
        'tavlo_jax/models/ring_attention.py (ring_temporal_attention), which '
        "is not present; use 'xla' or 'blockwise'.") from e
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

