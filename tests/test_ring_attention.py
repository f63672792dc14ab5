"""Sharded temporal attention (ring / all-to-all) against a float64 numpy reference.

Runs on the 8 fake CPU devices from conftest.py. Each sharded case is compiled
once (values and gradients together) to keep the file fast.
"""

import functools

import jax
import numpy as np
import pytest

from tavlo_jax.models import ring_attention as ra

SHAPE = (2, 16, 4, 2, 8)   # B, T, N, H, Dh


def np_attention(q, k, v, window):
  """Independent float64 reference: softmax over time per (batch, token, head)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum('btnhd,bsnhd->bnhts', q, k) / np.sqrt(q.shape[-1])
  if window >= 0:
    t = np.arange(q.shape[1])
    s = np.where(np.abs(t[:, None] - t[None, :]) <= window, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnhts,bsnhd->btnhd', p, v)


def np_attention_vjp(q, k, v, ct, window):
  """float64 (dq, dk, dv) of <ct, np_attention(q, k, v)>: the softmax Jacobian."""
  q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
  scale = 1 / np.sqrt(q.shape[-1])
  s = np.einsum('btnhd,bsnhd->bnhts', q, k) * scale
  if window >= 0:
    t = np.arange(q.shape[1])
    s = np.where(np.abs(t[:, None] - t[None, :]) <= window, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dv = np.einsum('bnhts,btnhd->bsnhd', p, ct)
  dp = np.einsum('btnhd,bsnhd->bnhts', ct, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum('bnhts,bsnhd->btnhd', ds, k) * scale
  dk = np.einsum('bnhts,btnhd->bsnhd', ds, q) * scale
  return dq, dk, dv


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=SHAPE).astype(np.float32) for _ in range(4)]  # q k v ct


def directional_derivative_np(q, k, v, ct, window, which, direction, eps=1e-5):
  """d/de <ct, attn(.. x + e*dir ..)> by central differences in float64."""
  def loss(e):
    args = [np.asarray(x, np.float64) for x in (q, k, v)]
    args[which] = args[which] + e * direction
    return np.sum(np_attention(*args, window) * ct)
  return (loss(eps) - loss(-eps)) / (2 * eps)


@functools.partial(jax.jit, static_argnums=4)
def dense_grads(q, k, v, ct, window):
  _, vjp = jax.vjp(lambda *a: ra.dense_temporal_attention(*a, window), q, k, v)
  return vjp(ct)


def check_values_and_grads(attn, window, seed=0):
  """attn(q, k, v, ct) -> (out, (dq, dk, dv)) for cotangent ct; checks both.

  The ring's gradients come from its flash-style custom VJP (a second trip
  round the ring), all_to_all's from blockwise_attention's custom VJP.
  """
  q, k, v, ct = inputs(seed=seed)
  out, grads = attn(q, k, v, ct)
  np.testing.assert_allclose(out, np_attention(q, k, v, window), atol=1e-5)
  # Gradients: elementwise against JAX's dense path and the float64 analytic
  # VJP, and along a random direction against float64 finite differences
  # (independent of any backward formula).
  for which, (g, g_dense, g_np) in enumerate(zip(
      grads, dense_grads(q, k, v, ct, window), np_attention_vjp(q, k, v, ct, window))):
    np.testing.assert_allclose(g, g_dense, atol=1e-5)
    np.testing.assert_allclose(g, g_np, atol=1e-5)
    direction = np.random.default_rng(seed + 1 + which).normal(size=SHAPE)
    expected = directional_derivative_np(q, k, v, ct, window, which, direction)
    np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * direction),
                               expected, rtol=1e-4, atol=1e-4)


def sharded_fn(mesh, window, impl, block_size):
  """One compiled function giving the sharded output and its VJP."""
  def f(q, k, v, ct):
    out, vjp = jax.vjp(lambda *a: ra.ring_temporal_attention(
        *a, mesh=mesh, window=window, impl=impl, block_size=block_size), q, k, v)
    return out, vjp(ct)
  with jax.set_mesh(mesh):
    return jax.jit(f).lower(*inputs()).compile()


# Each case costs a compile (seconds on a loaded CPU), so the fast set covers
# both meshes, both impls and with/without window once; the rest are slow.
@pytest.mark.parametrize('mesh_shape,axis_names,impl,window,block_size', [
    ((2, 4), ('data', 'seq'), 'ring', -1, 2),       # 2 key sub-blocks per ring step
    ((2, 4), ('data', 'seq'), 'all_to_all', 3, 3),  # 3 does not tile 16: blocks of 2
    ((1, 8), ('data', 'seq'), 'ring', 2, 128),      # 2 frames per device: far blocks skipped
    ((1, 8), ('data', 'seq'), 'all_to_all', -1, 4),
    pytest.param((2, 4), ('data', 'seq'), 'ring', 3, 128, marks=pytest.mark.slow),
    pytest.param((8,), ('seq',), 'ring', 1, 1, marks=pytest.mark.slow),  # no batch axis
])
def test_sharded_matches_reference(mesh_shape, axis_names, impl, window, block_size):
  mesh = jax.make_mesh(mesh_shape, axis_names)
  compiled = sharded_fn(mesh, window, impl, block_size)
  hlo = compiled.as_text()
  # The point of both paths: the clip is never gathered on one device.
  assert 'all-gather' not in hlo
  assert ('collective-permute' if impl == 'ring' else 'all-to-all') in hlo

  def attn(q, k, v, ct):
    out, grads = compiled(q, k, v, ct)
    # The time axis stays sharded on the way out and for the gradients.
    for x in (out, *grads):
      assert x.sharding.shard_shape(x.shape)[1] == SHAPE[1] // mesh.shape['seq']
    return out, grads
  check_values_and_grads(attn, window)


@pytest.mark.parametrize('window', [-1, 3])
def test_dense_reference_matches_numpy(window):
  q, k, v, _ = inputs()
  dense = jax.jit(ra.dense_temporal_attention, static_argnums=3)
  np.testing.assert_allclose(dense(q, k, v, window), np_attention(q, k, v, window),
                             atol=1e-5)


def test_mesh_from_context():
  """mesh=None uses the mesh of `jax.set_mesh`, as inside the train step."""
  mesh = jax.make_mesh((2, 4), ('data', 'seq'))
  q, k, v, _ = inputs()
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: ra.ring_temporal_attention(*a, impl='all_to_all'))(q, k, v)
  np.testing.assert_allclose(out, np_attention(q, k, v, -1), atol=1e-5)


def test_bad_inputs_fail_clearly():
  mesh = jax.make_mesh((2, 4), ('data', 'seq'))
  q = np.zeros((2, 10, 4, 2, 8), np.float32)   # T=10 does not split over 4
  with pytest.raises(ValueError, match='T=10.*multiple of 4'):
    ra.ring_temporal_attention(q, q, q, mesh=mesh)
  q = np.zeros((2, 16, 1, 2, 8), np.float32)   # N*H=2 columns for 4 devices
  with pytest.raises(ValueError, match='N\\*H.*multiple of 4'):
    ra.ring_temporal_attention(q, q, q, mesh=mesh, impl='all_to_all')
  q = np.zeros((3, 16, 4, 2, 8), np.float32)
  with pytest.raises(ValueError, match='batch B=3'):
    ra.ring_temporal_attention(q, q, q, mesh=mesh)
  q = np.zeros(SHAPE, np.float32)
  with pytest.raises(ValueError, match='window'):
    ra.ring_temporal_attention(q, q, q, mesh=mesh, window=-2)
  with pytest.raises(ValueError, match='impl'):
    ra.ring_temporal_attention(q, q, q, mesh=mesh, impl='gather')
  with pytest.raises(ValueError, match="no axis 'seq'"):
    ra.ring_temporal_attention(q, q, q, mesh=jax.make_mesh((8,), ('data',)))
  with pytest.raises(ValueError, match='needs a mesh'):
    ra.ring_temporal_attention(q, q, q)
  with pytest.raises(ValueError, match='same shape'):
    ra.ring_temporal_attention(q, q[:, :8], q, mesh=mesh)
