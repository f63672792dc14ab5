"""Single-device attention kernels over [N, L, H, d] arrays.

  xla_attention        jax.nn.dot_product_attention with a boolean mask.
  blockwise_attention  flash attention: online softmax over key blocks in a
                       `lax.scan`, custom VJP that recomputes them.
  flash_*              the per-block steps, shared with ring_attention.py,
                       which folds key blocks arriving from other devices.

Which keys a query may see: `window` (|i - j| <= window, -1 no limit) and
`segment_ids` (a query sees only keys of its own segment); see attention.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


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
