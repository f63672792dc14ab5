"""Multi-head attention for the AST blocks, with three interchangeable kernels.

  xla        jax.nn.dot_product_attention with a boolean mask. (Its cuDNN
             flash path cannot take a symmetric +-k window, so JAX's
             default implementation, XLA, is used everywhere.)
  blockwise  flash attention: online softmax over key blocks in a `lax.scan`
             and a custom VJP that recomputes them; the [L, L] score matrix
             is never materialised, memory is O(L * block) in training too.
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

import functools
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


# ---- flash kernel: online softmax forward, recomputing backward ---------------
# Shared with ring_attention.py. Layout: q [N, Lq, H, d], keys [N, Lk, H, d];
# per-row statistics [N, H, Lq]; scores [N, H, Lq, block]. All maths in float32.


def _key_blocks(length, block_size):
  """(size, starts, firsts) of the key blocks a scan visits.

  Blocks are sliced in place (no padded or transposed copy of the keys). When
  `size` does not divide the length, the last block starts early
  (starts[-1] = length - size) and its keys before firsts[-1] were folded in
  already, so they are masked out there.
  """
  size = min(block_size, length)
  num_blocks = -(-length // size)
  firsts = jnp.arange(num_blocks) * size
  return size, jnp.minimum(firsts, length - size), firsts


def _block_scores(qf, kb, scale, q_pos, kp, window, q_seg, ks, valid):
  """Scaled scores [N, H, Lq, size] of one key block, -inf where not allowed."""
  s = jnp.einsum('nqhd,nkhd->nhqk', qf, kb.astype(jnp.float32)) * scale
  ok = allowed_pairs(q_pos, kp, window, q_seg, ks)
  if valid is not None:
    ok &= valid[None]
  return jnp.where(ok[None, None], s, -jnp.inf)


def _scan_key_blocks(fn, carry, k_pos, k_seg, q_pos, window, block_size):
  """lax.scan of fn(carry, start, kp, ks, valid) over the key blocks.

  kp / ks / valid are the block's positions, segments (or None) and
  not-yet-folded mask (None when blocks tile the keys). With a window, a
  block wholly outside it for every query (positions are contiguous ranges)
  is skipped: its maths is not done.
  """
  length = k_pos.shape[0]
  size, starts, firsts = _key_blocks(length, block_size)
  ragged = length % size != 0

  def step(carry, block):
    start, first = block
    kp = jax.lax.dynamic_slice_in_dim(k_pos, start, size)
    ks = None if k_seg is None else jax.lax.dynamic_slice_in_dim(k_seg, start, size)
    valid = start + jnp.arange(size) >= first if ragged else None
    update = lambda c: fn(c, start, kp, ks, valid)
    if window < 0:
      return update(carry), None
    gap = jnp.maximum(kp[0] - q_pos[-1], q_pos[0] - kp[-1])
    return jax.lax.cond(gap <= window, update, lambda c: c, carry), None

  carry, _ = jax.lax.scan(step, carry, (starts, firsts))
  return carry


def flash_init(q):
  """Empty online-softmax statistics (m, l, acc) for queries q [N, Lq, H, d].

  Built with *_like so that inside shard_map they vary over the same mesh
  axes as q (scan/fori carries must keep one type).
  """
  n, length, heads, _ = q.shape
  m = jnp.full_like(q, -jnp.inf, jnp.float32, shape=(n, heads, length))
  l = jnp.zeros_like(q, jnp.float32, shape=(n, heads, length))
  return m, l, jnp.zeros_like(q, jnp.float32)


def flash_fold(stats, q, k, v, *, q_pos, k_pos, q_seg=None, k_seg=None,
               window: int = -1, block_size: int = 128):
  """Folds keys k, v [N, Lk, H, d] into the running (m, l, acc) of queries q.

  q: [N, Lq, H, d] (scores are scaled by 1/sqrt(d) here). q_pos / k_pos are
  the (global) positions used by the window, q_seg / k_seg the segments
  (None: one segment). softmax needs exp(s - max over ALL keys) but sees keys
  a block at a time: keeping the running max m, a block that raises it to m'
  rescales what was summed so far by exp(m - m'). Scores exist one
  [Lq, block] block at a time, so memory is linear in Lk. Not meant to be
  differentiated: `flash_backward` is its gradient.
  """
  qf = q.astype(jnp.float32)
  scale = 1.0 / math.sqrt(q.shape[-1])
  size = min(block_size, k.shape[1])

  def update(stats, start, kp, ks, valid):
    m, l, acc = stats
    kb = jax.lax.dynamic_slice_in_dim(k, start, size, axis=1)
    vb = jax.lax.dynamic_slice_in_dim(v, start, size, axis=1)
    s = _block_scores(qf, kb, scale, q_pos, kp, window, q_seg, ks, valid)
    m_new = jnp.maximum(m, s.max(-1))
    # A row may have seen no allowed key yet (m_new = -inf): subtract 0
    # there instead, so exp() gives 0 rather than NaN.
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m - m_safe)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum('nhqk,nkhd->nqhd', p, vb.astype(jnp.float32))
    acc = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
    return m_new, l, acc

  return _scan_key_blocks(update, stats, k_pos, k_seg, q_pos, window, block_size)


def flash_finish(stats):
  """(m, l, acc) -> output [N, Lq, H, d] float32 and log-sum-exp [N, H, Lq].

  A row that saw no key (impossible in this model: every query sees itself)
  gets output 0 and lse = +inf, which makes its backward probabilities 0.
  """
  m, l, acc = stats
  seen = l > 0
  out = acc / jnp.moveaxis(jnp.where(seen, l, 1.0), 1, 2)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return out, lse


def flash_delta(do, out):
  """rowsum(dO * O) [N, H, Lq]: the softmax backward's per-row constant."""
  return jnp.einsum('nqhd,nqhd->nhq', do.astype(jnp.float32),
                    out.astype(jnp.float32))


def flash_backward(grads, q, k, v, do, lse, delta, *, q_pos, k_pos, q_seg=None,
                   k_seg=None, window: int = -1, block_size: int = 128):
  """FlashAttention-2 backward over the key blocks of k, v [N, Lk, H, d].

  grads = (dq, dk, dv) float32 accumulators shaped like q, k, v. Recomputes
  P = exp(S - lse) one block at a time from the forward's log-sum-exp, then
  dV += P^T dO, dP = dO V^T, dS = P * (dP - delta) / sqrt(d), dQ += dS K,
  dK += dS^T Q, adding into the block's rows of dk / dv in place.
  """
  qf, dof = q.astype(jnp.float32), do.astype(jnp.float32)
  scale = 1.0 / math.sqrt(q.shape[-1])
  size = min(block_size, k.shape[1])

  def update(grads, start, kp, ks, valid):
    dq, dk, dv = grads
    kb = jax.lax.dynamic_slice_in_dim(k, start, size, axis=1).astype(jnp.float32)
    vb = jax.lax.dynamic_slice_in_dim(v, start, size, axis=1).astype(jnp.float32)
    s = _block_scores(qf, kb, scale, q_pos, kp, window, q_seg, ks, valid)
    p = jnp.exp(s - lse[..., None])                 # 0 where not allowed
    dp = jnp.einsum('nqhd,nkhd->nhqk', dof, vb)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum('nhqk,nkhd->nqhd', ds, kb)

    def add(acc, block):  # acc[:, start:start + size] += block, in place
      old = jax.lax.dynamic_slice_in_dim(acc, start, size, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(acc, old + block, start, axis=1)
    dk = add(dk, jnp.einsum('nhqk,nqhd->nkhd', ds, qf))
    dv = add(dv, jnp.einsum('nhqk,nqhd->nkhd', p, dof))
    return dq, dk, dv

  return _scan_key_blocks(update, grads, k_pos, k_seg, q_pos, window, block_size)


def _flash_forward(q, k, v, segment_ids, window, block_size):
  pos = jnp.arange(q.shape[1])
  stats = flash_fold(flash_init(q), q, k, v, q_pos=pos, k_pos=pos,
                     q_seg=segment_ids, k_seg=segment_ids, window=window,
                     block_size=block_size)
  out, lse = flash_finish(stats)
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash_attention(q, k, v, segment_ids, window, block_size):
  return _flash_forward(q, k, v, segment_ids, window, block_size)[0]


def _flash_attention_fwd(q, k, v, segment_ids, window, block_size):
  out, lse = _flash_forward(q, k, v, segment_ids, window, block_size)
  # Residuals linear in L: the inputs, the output and one number per row.
  return out, (q, k, v, segment_ids, out, lse)


def _flash_attention_bwd(window, block_size, residuals, do):
  q, k, v, segment_ids, out, lse = residuals
  pos = jnp.arange(q.shape[1])
  zeros = lambda x: jnp.zeros_like(x, jnp.float32)
  dq, dk, dv = flash_backward(
      (zeros(q), zeros(k), zeros(v)), q, k, v, do, lse, flash_delta(do, out),
      q_pos=pos, k_pos=pos, q_seg=segment_ids, k_seg=segment_ids,
      window=window, block_size=block_size)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def blockwise_attention(q, k, v, *, window: int = -1, segment_ids=None,
                        block_size: int = 128):
  """Same result as `xla_attention`, scanning over key blocks (online softmax).

  Flash attention: statistics are kept in float32 whatever the input dtype;
  the forward pass holds one [L, block] score block at a time, and a
  `jax.custom_vjp` saves only q, k, v, the output and the per-query
  log-sum-exp, so the backward pass recomputes the probabilities block by
  block (FlashAttention-2). Memory is linear in L in training too.
  `window` and `block_size` must be Python ints.
  """
  return _flash_attention(q, k, v, segment_ids, int(window), int(block_size))


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

