"""Temporal attention with the time axis sharded over a `seq` mesh axis.

Inputs q, k, v are [B, T, N, H, Dh]: batch, time (frames), token position in
the frame, head, head dim. Attention runs over T independently for every
(B, N, H), optionally restricted to a window of +-`window` frames. With T
sharded over `seq`, each device holds T/n frames; two ways to attend across
devices without ever gathering the whole clip on one:

- 'ring': every device keeps its query block and passes its key/value block
  round the ring with `ppermute`; after n steps each query block has met
  every key block. Softmax is accumulated online (running max and sum), a
  [T/n, block] score block at a time, so memory per device is
  O(T/n * block) and compute O(T^2 / n). With a window, key blocks wholly
  outside it are skipped (they still travel round): compute O(T * window / n).
- 'all_to_all': one `all_to_all` swaps what is sharded: from time to the
  (token, head) columns, so each device holds the WHOLE clip for 1/n of the
  columns and runs blockwise attention over it; a second `all_to_all` swaps
  back. Memory per device is O(T * block / n) too; it needs N*H >= n.

A single-device blockwise (flash) kernel lives in `attention.blockwise_attention`.

Both are plain JAX code inside `jax.shard_map`, so they are differentiable:
the transpose of `ppermute` is the reverse ring and of `all_to_all` is the
reverse swap.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# Masked scores get this finite value rather than -inf: a block can mask a
# whole row (window far from this key block), and exp(-inf - -inf) is NaN,
# which `jnp.where` hides in the forward pass but not in the gradient.
_MASKED = -1e30


def _check_window(window: int) -> None:
  if not isinstance(window, (int, np.integer)) or window < -1:
    raise ValueError(
        f'window must be -1 (whole clip) or a number of frames >= 0, got {window!r}')


def _check_shapes(q, k, v) -> None:
  if q.ndim != 5 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(
        'q, k, v must all be [B, T, N, H, Dh] with the same shape, got '
        f'{q.shape}, {k.shape}, {v.shape}')


def _as_columns(x):
  """[B, T, N, H, Dh] -> [B, T, N*H, Dh]: each (token, head) is one 'head'.

  jax.nn.dot_product_attention attends over axis 1 separately for every entry
  of axis 2, which is exactly temporal attention per (token, head).
  """
  b, t, n, h, d = x.shape
  return x.reshape(b, t, n * h, d)


def dense_temporal_attention(q, k, v, window: int = -1):
  """Plain (unsharded) temporal attention; the reference the others match."""
  _check_shapes(q, k, v)
  _check_window(window)
  out = jax.nn.dot_product_attention(
      _as_columns(q), _as_columns(k), _as_columns(v),
      local_window_size=None if window < 0 else (window, window))
  return out.reshape(q.shape)


# ---- online softmax ----------------------------------------------------------


def _init_stats(q):
  """Running (max, sum, weighted-value sum) for the online softmax.

  Layout [B, N, H, Tq(, Dh)] so the per-row statistics broadcast directly.
  """
  b, t, n, h, d = q.shape
  m = jnp.full((b, n, h, t), _MASKED, jnp.float32)
  l = jnp.zeros((b, n, h, t), jnp.float32)
  acc = jnp.zeros((b, n, h, t, d), jnp.float32)
  return m, l, acc


def _online_softmax_step(stats, q, k_blk, v_blk, q_pos, k_pos, window):
  """Fold one key/value block into the running softmax statistics.

  softmax needs exp(s - max over ALL keys), but we see keys a block at a
  time. Keeping the running max m lets us use exp(s - m) (no overflow) and,
  when a later block raises the max to m', rescale what was summed so far by
  exp(m - m'), which turns it into what it would have been with m' from the
  start. Dividing acc by l at the end gives exactly softmax(s) @ v.
  q_pos / k_pos are GLOBAL frame indices of this query / key block, so the
  window mask is right whichever device the block came from.
  """
  m, l, acc = stats
  s = jnp.einsum('bqnhd,bknhd->bnhqk', q, k_blk,
                 preferred_element_type=jnp.float32)
  if window >= 0:
    in_window = jnp.abs(q_pos[:, None] - k_pos[None, :]) <= window
    s = jnp.where(in_window, s, _MASKED)
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.exp(s - m_new[..., None])
  if window >= 0:
    # A row with no key in window would otherwise count every masked key as 1.
    p = jnp.where(in_window, p, 0.0)
  correction = jnp.exp(m - m_new)
  l = l * correction + p.sum(axis=-1)
  acc = acc * correction[..., None] + jnp.einsum(
      'bnhqk,bknhd->bnhqd', p.astype(v_blk.dtype), v_blk,
      preferred_element_type=jnp.float32)
  return m_new, l, acc


def _fold_keys(stats, q, k, v, q_pos, k_pos, window, block_size):
  """Fold keys k, v (global frames k_pos) into stats, block_size keys at a time.

  Scores are [rows, block_size] at a time, so memory is linear in the number
  of keys; the scan body is rematerialised so the backward pass keeps only
  the per-block statistics, not the scores.
  """
  def fold_block(stats, block):
    k_blk, v_blk, kp = block
    update = lambda st: _online_softmax_step(st, q, k_blk, v_blk, q_pos, kp, window)
    if window < 0:
      return update(stats), None
    # Frame ranges are contiguous: a key block whose nearest frame is more
    # than `window` away from every query adds nothing, so skip its maths.
    gap = jnp.maximum(kp[0] - q_pos[-1], q_pos[0] - kp[-1])
    return jax.lax.cond(gap <= window, update, lambda st: st, stats), None

  num_keys = k.shape[1]
  # The largest block that tiles the keys exactly (no padding to mask out).
  size = max(d for d in range(1, min(block_size, num_keys) + 1) if num_keys % d == 0)
  split = lambda x: jnp.moveaxis(
      x.reshape(x.shape[0], num_keys // size, size, *x.shape[2:]), 1, 0)
  stats, _ = jax.lax.scan(jax.checkpoint(fold_block), stats,
                          (split(k), split(v), k_pos.reshape(-1, size)))
  return stats


def _finish(stats, dtype):
  _, l, acc = stats
  # Every query attends at least to its own frame, so l > 0.
  out = acc / l[..., None]                       # [B, N, H, T, Dh]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype)


# ---- sharded implementations (bodies run per device inside shard_map) --------


def _ring_body(q, k, v, *, seq_axis, vary_axes, window, block_size):
  """q, k, v: this device's [b, T/n, N, H, Dh] time block."""
  n = jax.lax.axis_size(seq_axis)
  me = jax.lax.axis_index(seq_axis)
  t = q.shape[1]
  q = q * (1.0 / math.sqrt(q.shape[-1]))
  q_pos = me * t + jnp.arange(t)
  # Fresh constants are device-invariant; the loop makes them vary per device,
  # and shard_map's type check wants the carry's type fixed up front.
  stats = jax.lax.pcast(_init_stats(q), vary_axes, to='varying')
  # Send to the next device: after s shifts we hold the block of device me-s.
  ring = [(i, (i + 1) % n) for i in range(n)]

  # checkpoint: the backward pass recomputes each ring step instead of keeping
  # every step's intermediate statistics alive.
  @jax.checkpoint
  def fold(stats, k_blk, v_blk, s):
    k_pos = ((me - s) % n) * t + jnp.arange(t)   # global frames of this block
    return _fold_keys(stats, q, k_blk, v_blk, q_pos, k_pos, window, block_size)

  def body(s, carry):
    stats, k_blk, v_blk = carry
    # The send does not depend on this step's maths, so XLA may overlap them.
    k_next = jax.lax.ppermute(k_blk, seq_axis, ring)
    v_next = jax.lax.ppermute(v_blk, seq_axis, ring)
    return fold(stats, k_blk, v_blk, s), k_next, v_next

  # n-1 steps that also pass blocks on, then the last block without a send.
  stats, k_blk, v_blk = jax.lax.fori_loop(0, n - 1, body, (stats, k, v))
  stats = fold(stats, k_blk, v_blk, n - 1)
  return _finish(stats, q.dtype)


def _all_to_all_body(q, k, v, *, seq_axis, vary_axes, window, block_size):
  """Swap time-sharding for column-sharding, attend locally, swap back."""
  b, t, n_tok, h, d = q.shape
  n = jax.lax.axis_size(seq_axis)
  # Columns are (token, head) pairs, token-major: with N divisible by the seq
  # size this splits token positions; otherwise it splits within tokens.
  def to_cols(x):  # [b, T/n, N, H, Dh] -> [b, T, N*H/n, 1, Dh]: whole clip
    # (kept 5-D, one 'head' per column, so the online-softmax code is shared)
    x = jax.lax.all_to_all(_as_columns(x), seq_axis, split_axis=2, concat_axis=1,
                           tiled=True)
    return x[:, :, :, None]
  q, k, v = to_cols(q), to_cols(k), to_cols(v)
  # Local attention over the whole clip, blockwise so that scores stay
  # [T, block_size] instead of [T, T].
  pos = jnp.arange(t * n)
  stats = jax.lax.pcast(_init_stats(q), vary_axes, to='varying')
  stats = _fold_keys(stats, q * (1.0 / math.sqrt(d)), k, v, pos, pos, window,
                     block_size)
  out = _finish(stats, q.dtype)[:, :, :, 0]      # [b, T, N*H/n, Dh]
  out = jax.lax.all_to_all(out, seq_axis, split_axis=1, concat_axis=2, tiled=True)
  return out.reshape(b, t, n_tok, h, d)


_IMPLS = {'ring': _ring_body, 'all_to_all': _all_to_all_body}


def ring_temporal_attention(q, k, v, *, mesh: jax.sharding.Mesh | None = None,
                            window: int = -1,
                            seq_axis: str = 'seq',
                            batch_axes: Sequence[str] = ('data', 'fsdp'),
                            impl: str = 'ring', block_size: int = 128):
  """Temporal attention of [B, T, N, H, Dh] arrays with T sharded over `seq_axis`.

  The batch is sharded over those of `batch_axes` that the mesh has; other
  mesh axes see the computation replicated. `mesh=None` takes the mesh set by
  `jax.set_mesh` (what a model under the train step sees). Gives the same
  values as `dense_temporal_attention(q, k, v, window)` and is differentiable.
  Scores are formed `block_size` keys at a time (config.model.attention_block).
  """
  _check_shapes(q, k, v)
  _check_window(window)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError('ring_temporal_attention needs a mesh: pass mesh= or call '
                       'it under `with jax.set_mesh(mesh):`')
  if impl not in _IMPLS:
    raise ValueError(f'impl must be one of {sorted(_IMPLS)}, got {impl!r}')
  if seq_axis not in mesh.shape:
    raise ValueError(f'mesh has no axis {seq_axis!r}; its axes: {dict(mesh.shape)}')
  b, t, n_tok, h, _ = q.shape
  n_seq = mesh.shape[seq_axis]
  if t % n_seq:
    raise ValueError(
        f'T={t} frames cannot be split evenly over the {seq_axis!r} mesh axis of '
        f'size {n_seq}: T must be a multiple of {n_seq}')
  batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  if b % n_batch:
    raise ValueError(f'batch B={b} must be a multiple of the size of the batch '
                     f'mesh axes {batch_axes} ({n_batch})')
  if impl == 'all_to_all' and (n_tok * h) % n_seq:
    raise ValueError(
        f"impl='all_to_all' splits the N*H={n_tok}*{h} (token, head) columns over "
        f'{seq_axis!r} of size {n_seq}: N*H must be a multiple of {n_seq}')

  spec = P(batch_axes or None, seq_axis)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # Explicit-typed meshes (jax.make_mesh's default) make shard_map demand
    # inputs already laid out as in_specs; Auto meshes reshard by themselves.
    target = (jax.sharding.NamedSharding(mesh, spec)
              if isinstance(mesh, jax.sharding.Mesh) else spec)
    q, k, v = (jax.reshard(x, target) for x in (q, k, v))
  body = jax.shard_map(
      lambda q, k, v: _IMPLS[impl](
          q, k, v, seq_axis=seq_axis, vary_axes=batch_axes + (seq_axis,),
          window=window, block_size=block_size),
      mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
  return body(q, k, v)
