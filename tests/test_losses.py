"""MIL contrastive losses against a float64 numpy reference, and the collapse."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tavlo_jax import losses

# One compiled program per argument combination instead of dozens of eagerly
# dispatched (and individually compiled) small ops.
mil_loss = jax.jit(losses.temporal_mil_loss, static_argnames=(
    'temperature', 'negatives', 'symmetric', 'positives'))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_batch(b=5, t=3, n=6, d=4, seed=0):
  rng = np.random.default_rng(seed)
  visual = unit(rng.normal(size=(b, t, 2, n // 2, d)))
  audio = unit(rng.normal(size=(b, t, d)))
  return visual.astype(np.float32), audio.astype(np.float32)


def reference(visual, audio, temperature, negatives, symmetric, mask=None,
              positives='max', extra=None):
  """Loops over frames, anchors and candidates, float64. extra [K, B, T, D]:
  more audio candidates for each visual bag (v->a only)."""
  b, t = visual.shape[:2]
  v = np.asarray(visual, np.float64).reshape(b, t, -1, visual.shape[-1])
  a = np.asarray(audio, np.float64)
  valid = np.ones((b, t), bool) if mask is None else np.broadcast_to(
      np.asarray(mask).reshape(b, -1), (b, t))
  pool = {'max': np.max, 'mean': np.mean,
          'peak': lambda x: np.max(x) - np.mean(x)}
  terms = np.zeros((b, t))
  for f in range(t):
    logits = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        sims = v[j, f] @ a[i, f]
        logits[i, j] = pool[positives if i == j else negatives](sims)
    logits /= temperature
    members = [k for k in range(b) if valid[k, f]]
    for i in members:
      row = logits[i, members]
      col = logits[members, i]
      if extra is not None:
        col = np.concatenate([col, [
            pool[negatives](v[i, f] @ np.asarray(extra[k, m, f], np.float64))
            / temperature for k in range(len(extra)) for m in members]])
      a2v = np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i]
      v2a = np.log(np.exp(col - col.max()).sum()) + col.max() - logits[i, i]
      terms[i, f] = (a2v + v2a) / 2 if symmetric else a2v
  loss = terms[valid].mean()
  per_example = np.array([terms[i, valid[i]].mean() if valid[i].any() else 0.0
                          for i in range(b)])
  return loss, per_example


@pytest.mark.parametrize('positives,negatives',
                         [('max', 'max'), ('max', 'mean'), ('peak', 'peak')])
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('masked', [False, True])
def test_matches_float64_reference(positives, negatives, symmetric, masked):
  visual, audio = random_batch()
  mask = None
  if masked:   # one padding clip, one missing frame
    mask = np.ones((5, 3), bool)
    mask[2] = False
    mask[0, 1] = False
  loss, aux = mil_loss(visual, audio, 0.1, negatives=negatives,
                       symmetric=symmetric, mask=mask, positives=positives)
  ref_loss, ref_per_example = reference(visual, audio, 0.1, negatives,
                                        symmetric, mask, positives)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(aux['per_example'], ref_per_example, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('masked', [False, True])
def test_out_of_sync_negatives_match_float64_reference(masked):
  visual, audio = random_batch(seed=3)
  extra = unit(np.random.default_rng(4).normal(size=(2,) + audio.shape))
  extra = extra.astype(np.float32)
  mask = None
  if masked:
    mask = np.ones((5, 3), bool)
    mask[1] = False
    mask[3, 2] = False
  loss, aux = mil_loss(visual, audio, 0.1, negatives='peak', positives='peak',
                       mask=mask, extra_audio=extra)
  ref_loss, ref_per_example = reference(visual, audio, 0.1, 'peak', True,
                                        mask, 'peak', extra=extra)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(aux['per_example'], ref_per_example, rtol=1e-5,
                             atol=1e-6)
  assert np.isfinite(jax.grad(lambda x: mil_loss(
      visual, audio, 0.1, mask=mask, extra_audio=x)[0])(extra)).all()


def test_sync_accuracy_tells_in_sync_from_out_of_sync_audio():
  visual, audio = random_batch(seed=5)
  # A copy of the in-sync audio scores the same: never strictly preferred.
  _, aux = mil_loss(visual, audio, 0.1, extra_audio=audio[None])
  assert float(aux['sync_accuracy']) == 0.0
  # Another clip's audio as the "shifted" copy: compare with a direct count.
  other = np.roll(audio, 1, axis=0)
  _, aux = mil_loss(visual, audio, 0.1, extra_audio=other[None])
  v = visual.reshape(5, 3, -1, visual.shape[-1]).astype(np.float64)
  wins = [(v[i, f] @ audio[i, f]).max() > (v[i, f] @ other[i, f]).max()
          for i in range(5) for f in range(3)]
  assert 0 < np.mean(wins) < 1
  np.testing.assert_allclose(aux['sync_accuracy'], np.mean(wins), rtol=1e-6)


def test_directions_are_separately_right():
  visual, audio = random_batch(seed=1)
  _, aux = mil_loss(visual, audio, 0.07)
  a2v, _ = reference(visual, audio, 0.07, 'max', symmetric=False)
  # v->a of (visual, audio) is a->v with the roles of i and j swapped:
  # the reference's 'symmetric' total minus its a->v half.
  both, _ = reference(visual, audio, 0.07, 'max', symmetric=True)
  np.testing.assert_allclose(aux['loss_a2v'], a2v, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_v2a'], 2 * both - a2v, rtol=1e-5)


def test_global_audio_and_image_level_shapes():
  visual, audio = random_batch(t=1)
  loss_tiled, _ = losses.ezvsl_loss(visual, audio, 0.03)
  loss_global, _ = losses.ezvsl_loss(visual[:, 0], audio[:, 0], 0.03)
  ref, _ = reference(visual, audio, 0.03, 'max', True)
  np.testing.assert_allclose([loss_tiled, loss_global], [ref, ref], rtol=1e-5)


@pytest.mark.parametrize('negatives', ['max', 'mean'])
def test_gradient_is_finite_even_with_padding(negatives):
  visual, audio = random_batch()
  mask = np.array([True, True, False, True, False])
  grads = jax.jit(jax.grad(
      lambda v, a: mil_loss(v, a, 0.07, negatives=negatives, mask=mask)[0],
      argnums=(0, 1)))(visual, audio)
  for g in grads:
    assert np.isfinite(g).all()
  # Padding clips get no gradient at all.
  assert np.abs(grads[0][2]).max() == 0 and np.abs(grads[1][4]).max() == 0


def test_permuting_the_batch_permutes_per_example_terms():
  visual, audio = random_batch(b=6, seed=2)
  perm = np.random.default_rng(0).permutation(6)
  loss, aux = mil_loss(visual, audio, 0.1)
  loss_p, aux_p = mil_loss(visual[perm], audio[perm], 0.1)
  np.testing.assert_allclose(aux_p['per_example'], aux['per_example'][perm],
                             rtol=1e-5)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)


def test_sharded_global_batch_gives_the_same_loss():
  visual, audio = random_batch(b=8, seed=3)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  fn = jax.jit(lambda v, a: losses.temporal_mil_loss(v, a, 0.1)[0])
  sharded = fn(jax.device_put(visual, spec), jax.device_put(audio, spec))
  # Every clip's negatives are the other 7 clips, not just its own shard.
  np.testing.assert_allclose(sharded, reference(visual, audio, 0.1, 'max',
                                                True)[0], rtol=1e-5)


# --- the collapse of max-positive / mean-negative pooling --------------------------


def peaky_maps(b=8, t=2, n=16, d=8, seed=0):
  """Every frame: one token = u, the rest = -u; every audio token = u.

  The audio carries no information about which clip it belongs to.
  """
  u = unit(np.random.default_rng(seed).normal(size=d))
  visual = np.broadcast_to(-u, (b, t, n, d)).copy()
  visual[:, :, 0] = u
  return visual.astype(np.float32), np.broadcast_to(u, (b, t, d)).astype(
      np.float32)


def test_mean_negatives_reach_zero_loss_without_audio_information():
  visual, audio = peaky_maps()
  mean_loss, mean_aux = mil_loss(visual, audio, 0.07,
                                                 negatives='mean')
  max_loss, _ = mil_loss(visual, audio, 0.07, negatives='max')
  assert mean_loss < 1e-6
  np.testing.assert_allclose(max_loss, math.log(8), rtol=1e-5)
  # The detectors: audio is not matched to its clip.
  assert mean_aux['max_margin'] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('pooling', ['max', 'mean', 'peak'])
def test_consistent_pooling_cannot_beat_chance_with_identical_audio(pooling):
  rng = np.random.default_rng(4)
  b = 6
  for _ in range(5):
    visual = unit(rng.normal(size=(b, 2, 5, 4)) * rng.uniform(0.1, 5))
    audio = np.broadcast_to(unit(rng.normal(size=4)), (b, 2, 4))
    loss, _ = mil_loss(visual, audio, 0.05, negatives=pooling,
                                       positives=pooling)
    assert loss >= math.log(b) - 1e-5


def test_training_with_mean_negatives_collapses_on_uninformative_audio():
  """Free visual tokens + one shared audio token, trained with Adam.

  With mean negatives the loss falls to ~0 within tens of steps although the
  audio is identical for every clip; with max negatives it cannot go below
  log(B) (see the docstring of tavlo_jax.losses).
  """
  b, t, n, d = 8, 2, 16, 8
  rng = np.random.default_rng(0)
  params0 = dict(visual=jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32),
                 audio=jnp.asarray(rng.normal(size=(d,)), jnp.float32))

  def train(negatives, steps=60):
    def objective(p):
      visual = p['visual'] / jnp.linalg.norm(p['visual'], axis=-1,
                                             keepdims=True)
      audio = jnp.broadcast_to(p['audio'] / jnp.linalg.norm(p['audio']),
                               (b, t, d))
      return mil_loss(visual, audio, 0.07,
                                      negatives=negatives)[0]
    tx = optax.adam(0.1)

    @jax.jit
    def step(p, s):
      loss, g = jax.value_and_grad(objective)(p)
      u, s = tx.update(g, s)
      return optax.apply_updates(p, u), s, loss
    p, s = params0, tx.init(params0)
    for _ in range(steps):
      p, s, loss = step(p, s)
    return float(loss)

  assert train('mean') < 1e-2
  assert train('max') >= math.log(b) - 1e-4


# --- other helpers ------------------------------------------------------------------------


def test_map_polarity_detects_inverted_maps():
  mask = np.zeros((4, 4), bool)
  mask[1:3, 1:3] = True
  good = np.where(mask, 0.9, -0.2)
  assert losses.map_polarity(good, mask) > 0
  assert losses.map_polarity(-good, mask) < 0


def test_peak_pooling_tells_a_hot_source_from_an_inverted_map():
  """Max pooling scores a map with one hot token (the source) and the same
  map inverted and shifted (source coldest, everything else as hot) alike, so
  it cannot fix the sign; 'peak' (max - mean) prefers the hot source, because
  the source is a small part of the frame."""
  n, s = 16, 0.6
  hot = np.zeros((1, 1, n), np.float32)
  hot[..., 3] = s                      # one location at +s, the rest at 0
  inverted = s - hot                   # that location at 0, the rest at +s
  pool = lambda x, how: float(losses._pool(jnp.asarray(x), how)[0, 0])  # pylint: disable=protected-access
  assert pool(hot, 'max') == pytest.approx(pool(inverted, 'max'))
  assert pool(hot, 'peak') == pytest.approx(s * (n - 1) / n)
  assert pool(inverted, 'peak') == pytest.approx(s / n)


def test_make_loss_from_config():
  from configs import avatar_synth  # pylint: disable=g-import-not-at-top
  visual, audio = random_batch()
  out = dict(visual=visual, audio=audio)
  for variant, positives, negatives in (('', 'peak', 'peak'),
                                        ('mean_neg', 'max', 'mean'),
                                        ('ezvsl', 'peak', 'peak')):
    c = avatar_synth.get_config(variant)
    loss, _ = losses.make_loss(c)(out)
    ref, _ = reference(visual, audio, c.model.temperature, negatives, True,
                       positives=positives)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
