"""Sharded training = single-device training; checkpoints move between meshes."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from tavlo_jax import checkpointing, config_lib, models, sharding, train


def _config(**mesh):
  config = config_lib.load_config_file('configs/avatar_synth.py:runlocal')
  config.input.batch_size = 8
  config.input.audio.features_on = 'host'
  # SGD, not Adam: Adam rescales near-zero gradients to +-lr, which turns
  # float summation-order noise into visible parameter differences.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  # Off here (the synthetic default has it on) so that the test below can
  # check that turning it on changes the loss; motion features stay on.
  config.loss.shifted_audio_negatives = 0
  for k, v in mesh.items():
    config.mesh[k] = v
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  t, s = config.input.num_frames, config.input.image_size
  cols = t * config.input.audio.columns_per_frame
  return {
      'frames': rng.integers(0, 255, (8, t, s, s, 3), dtype=np.uint8),
      'audio': rng.normal(size=(8, cols, config.input.audio.n_mels)).astype(np.float32),
  }


def _one_step(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  model = models.build_model(config)
  state, shardings, _ = train.create_state(config, model, mesh, jax.random.key(0, impl='rbg'))
  step_fn, _ = train.compile_steps(config, model, mesh, shardings)
  batch = _batch(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    rng = jax.device_put(jax.random.key(1, impl='rbg'), sharding.replicated(mesh))
    for _ in range(2):
      state, metrics = step_fn(state, batch, rng)
  return jax.device_get(state.params), jax.device_get(metrics)


@functools.cache
def _reference():
  # Computed once for all mesh shapes (each compile costs a minute on 2 cores).
  return _one_step(_config(data=1, fsdp=1, seq=1), jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize('mesh,impl', [
    (dict(data=8, fsdp=1, seq=1), 'xla'),
    (dict(data=2, fsdp=4, seq=1), 'xla'),
    (dict(data=2, fsdp=1, seq=4), 'ring'),
])
def test_sharded_step_matches_single_device(mesh, impl):
  ref_params, ref_metrics = _reference()
  config = _config(**mesh)
  config.model.attention_impl = impl
  params, metrics = _one_step(config, jax.devices())
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               params, ref_params)


@pytest.mark.slow
def test_out_of_sync_negatives_step_sharded_matches_single_device():
  """The shifted-audio path (random rolls along time) under a time-sharded
  ring-attention mesh gives the single-device loss and reports sync_accuracy."""
  config = _config(data=1, fsdp=1, seq=1)
  config.loss.shifted_audio_negatives = 1
  ref_params, ref_metrics = _one_step(config, jax.devices()[:1])
  assert 0.0 <= float(ref_metrics['sync_accuracy']) <= 1.0
  assert ref_metrics['loss'] != _reference()[1]['loss']   # the term is there
  config = _config(data=2, fsdp=1, seq=4)
  config.loss.shifted_audio_negatives = 1
  config.model.attention_impl = 'ring'
  params, metrics = _one_step(config, jax.devices())
  np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['sync_accuracy'], ref_metrics['sync_accuracy'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               params, ref_params)


@pytest.mark.slow
def test_sharding_report_counts_replicated_bytes():
  config = _config(data=2, fsdp=4, seq=1)
  mesh = sharding.make_mesh(config.mesh)
  model = models.build_model(config)
  state, shardings, _ = train.create_state(config, model, mesh, jax.random.key(0, impl='rbg'))
  report = sharding.sharding_report(state.params, shardings.params, mesh)
  leaves = jax.tree.leaves(state.params)
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  assert report['total_bytes'] == total
  # Independent count: an array is replicated iff its sharding spans no mesh axis.
  rep = sum(x.size * x.dtype.itemsize for x in leaves if x.sharding.is_fully_replicated)
  assert report['replicated_bytes'] == rep
  assert 0 < report['bytes_per_device'] < total  # fsdp really split something


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match='do not split'):
    sharding.make_mesh(dict(data=-1, fsdp=3, seq=1))
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.make_mesh(dict(data=4, fsdp=4, seq=1))


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  config = _config(data=8, fsdp=1, seq=1)
  mesh_a = sharding.make_mesh(config.mesh)
  model = models.build_model(config)
  state, shardings_a, _ = train.create_state(config, model, mesh_a, jax.random.key(0, impl='rbg'))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  ckpt.save(3, state, None, force=True)
  ckpt.close()

  config_b = _config(data=2, fsdp=4, seq=1)
  mesh_b = sharding.make_mesh(config_b.mesh)
  other, shardings_b, abstract_b = train.create_state(config_b, model, mesh_b, jax.random.key(9, impl='rbg'))
  target = checkpointing.abstract_with_shardings(abstract_b, shardings_b)
  ckpt_b = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
  step, restored = ckpt_b.restore_latest(target, None)
  ckpt_b.close()
  assert step == 3
  for a, b, s in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params),
                     jax.tree.leaves(shardings_b.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == s
  del other


@pytest.mark.slow
def test_unreadable_checkpoint_falls_back_to_previous(tmp_path):
  config = _config(data=8, fsdp=1, seq=1)
  mesh = sharding.make_mesh(config.mesh)
  model = models.build_model(config)
  state, shardings, abstract = train.create_state(config, model, mesh, jax.random.key(0, impl='rbg'))
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=3)
  ckpt.save(1, state, None, force=True)
  ckpt.save(2, state, None, force=True)
  ckpt.close()
  # Corrupt every file of step 2's model state.
  for f in (tmp_path / 'ckpt' / '2' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  target = checkpointing.abstract_with_shardings(abstract, shardings)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=3)
  step, restored = ckpt.restore_latest(target, None)
  ckpt.close()
  assert step == 1 and restored is not None
  # The damaged step is kept under a name Orbax never takes for a step.
  assert (tmp_path / 'ckpt' / '2.damaged-1').is_dir() and not (tmp_path / 'ckpt' / '2').exists()
