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

The per-block maths is the flash kernel of `kernels.py` (the one behind
`kernels.blockwise_attention`), so training memory is linear in T/n as well:
- 'ring' has its own `jax.custom_vjp` around the two shard_maps: the forward
  saves only the local q, k, v, output and log-sum-exp; the backward sends
  the key/value blocks round the ring once more, each with its dK/dV
  accumulator, and one last shift takes every accumulator home.
- 'all_to_all' calls `kernels.blockwise_attention` (custom VJP) between
  the two swaps; autodiff transposes each `all_to_all` into the reverse swap.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tavlo_jax.models import kernels

IMPLS = ('ring', 'all_to_all')


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


# ---- sharded implementations (bodies run per device inside shard_map) --------
# The per-block maths is the flash kernel of kernels.py (flash_fold /
# flash_backward), on [b, T, N*H, Dh] columns: each (token, head) is a 'head'.


def _ring_positions(me, n, t, s):
  """Global frames of the key block a device holds after s ring shifts."""
  return ((me - s) % n) * t + jnp.arange(t)


def _ring_fwd_body(q, k, v, *, seq_axis, window, block_size):
  """q, k, v: this device's [b, T/n, N, H, Dh] time block -> (out, lse).

  Every device keeps its queries and passes its key/value block round the
  ring; after n steps each query block has met every key block. lse
  [b, N*H, T/n] is what the backward pass needs to recompute probabilities.
  """
  n = jax.lax.axis_size(seq_axis)
  me = jax.lax.axis_index(seq_axis)
  t = q.shape[1]
  q_c = _as_columns(q)
  q_pos = me * t + jnp.arange(t)
  # Send to the next device: after s shifts we hold the block of device me-s.
  ring = [(i, (i + 1) % n) for i in range(n)]

  def fold(stats, k_blk, v_blk, s):
    return kernels.flash_fold(
        stats, q_c, k_blk, v_blk, q_pos=q_pos,
        k_pos=_ring_positions(me, n, t, s), window=window, block_size=block_size)

  def body(s, carry):
    stats, k_blk, v_blk = carry
    # The send does not depend on this step's maths, so XLA may overlap them.
    k_next = jax.lax.ppermute(k_blk, seq_axis, ring)
    v_next = jax.lax.ppermute(v_blk, seq_axis, ring)
    return fold(stats, k_blk, v_blk, s), k_next, v_next

  # n-1 steps that also pass blocks on, then the last block without a send.
  stats, k_blk, v_blk = jax.lax.fori_loop(
      0, n - 1, body, (kernels.flash_init(q_c), _as_columns(k), _as_columns(v)))
  out, lse = kernels.flash_finish(fold(stats, k_blk, v_blk, n - 1))
  return out.reshape(q.shape).astype(q.dtype), lse


def _ring_bwd_body(q, k, v, out, lse, do, *, seq_axis, window, block_size):
  """Gradients (dq, dk, dv) of this device's block, flash-style.

  The key/value blocks go round the ring again, each with its dK/dV
  accumulator: at step s this device holds device me-s's block, recomputes
  its probabilities from lse, adds its share of that block's dK/dV and
  passes both on; after n steps plus one last shift every accumulator is back
  on the device that owns its block. dQ stays local.
  """
  n = jax.lax.axis_size(seq_axis)
  me = jax.lax.axis_index(seq_axis)
  t = q.shape[1]
  q_c, do_c = _as_columns(q), _as_columns(do)
  delta = kernels.flash_delta(do_c, _as_columns(out))
  q_pos = me * t + jnp.arange(t)
  ring = [(i, (i + 1) % n) for i in range(n)]
  shift = lambda x: jax.lax.ppermute(x, seq_axis, ring)

  def grads(dq, k_blk, v_blk, dk_acc, dv_acc, s):
    return kernels.flash_backward(
        (dq, dk_acc, dv_acc), q_c, k_blk, v_blk, do_c, lse, delta, q_pos=q_pos,
        k_pos=_ring_positions(me, n, t, s), window=window, block_size=block_size)

  def body(s, carry):
    dq, k_blk, v_blk, dk_acc, dv_acc = carry
    k_next, v_next = shift(k_blk), shift(v_blk)
    dq, dk_acc, dv_acc = grads(dq, k_blk, v_blk, dk_acc, dv_acc, s)
    return dq, k_next, v_next, shift(dk_acc), shift(dv_acc)

  zeros = jnp.zeros_like(q_c, jnp.float32)
  dq, k_blk, v_blk, dk_acc, dv_acc = jax.lax.fori_loop(
      0, n - 1, body, (zeros, _as_columns(k), _as_columns(v), zeros, zeros))
  dq, dk_acc, dv_acc = grads(dq, k_blk, v_blk, dk_acc, dv_acc, n - 1)
  dk, dv = shift(dk_acc), shift(dv_acc)             # home to their owner
  return (dq.reshape(q.shape).astype(q.dtype),
          dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype))


def _lay_out(x, mesh, spec):
  """Explicit-typed meshes (jax.make_mesh's default) make shard_map demand
  inputs already laid out as in_specs; Auto meshes reshard by themselves."""
  if jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return x
  return jax.reshard(x, jax.sharding.NamedSharding(mesh, spec)
                     if isinstance(mesh, jax.sharding.Mesh) else spec)


def _ring(q, k, v, *, mesh, spec, lse_spec, **kw):
  """Ring attention with a flash-style VJP: the forward saves q, k, v, the
  output and the log-sum-exp (all T/n-sized per device), not the K/V blocks
  received from the other devices; the backward runs the ring again."""
  fwd = jax.shard_map(functools.partial(_ring_fwd_body, **kw), mesh=mesh,
                      in_specs=(spec,) * 3, out_specs=(spec, lse_spec))
  bwd = jax.shard_map(functools.partial(_ring_bwd_body, **kw), mesh=mesh,
                      in_specs=(spec,) * 4 + (lse_spec, spec),
                      out_specs=(spec,) * 3)

  @jax.custom_vjp
  def attend(q, k, v):
    return fwd(q, k, v)[0]

  def attend_fwd(q, k, v):
    out, lse = fwd(q, k, v)
    return out, (q, k, v, out, lse)

  def attend_bwd(res, do):
    # The cotangent arrives laid out however the caller's gradient is.
    return bwd(*res, _lay_out(do, mesh, spec))

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(q, k, v)


def _all_to_all_body(q, k, v, *, seq_axis, window, block_size):
  """Swap time-sharding for column-sharding, attend locally, swap back."""
  b, t, n_tok, h, d = q.shape
  # Columns are (token, head) pairs, token-major: with N divisible by the seq
  # size this splits token positions; otherwise it splits within tokens.
  def to_cols(x):  # [b, T/n, N, H, Dh] -> [b, T, N*H/n, Dh]: whole clip
    return jax.lax.all_to_all(_as_columns(x), seq_axis, split_axis=2,
                              concat_axis=1, tiled=True)
  # Local flash attention over the whole clip (its own custom VJP; autodiff
  # transposes the all_to_alls): scores stay [T, block_size], not [T, T].
  out = kernels.blockwise_attention(to_cols(q), to_cols(k), to_cols(v),
                                      window=window, block_size=block_size)
  out = jax.lax.all_to_all(out, seq_axis, split_axis=1, concat_axis=2, tiled=True)
  return out.reshape(b, t, n_tok, h, d)


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
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {sorted(IMPLS)}, got {impl!r}')
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
  q, k, v = (_lay_out(x, mesh, spec) for x in (q, k, v))
  kw = dict(seq_axis=seq_axis, window=int(window), block_size=int(block_size))
  if impl == 'ring':
    return _ring(q, k, v, mesh=mesh, spec=spec,
                 lse_spec=P(batch_axes or None, None, seq_axis), **kw)
  body = jax.shard_map(functools.partial(_all_to_all_body, **kw), mesh=mesh,
                       in_specs=(spec, spec, spec), out_specs=spec)
  return body(q, k, v)
