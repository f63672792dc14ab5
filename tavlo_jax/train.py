"""train_and_evaluate: sharded state, a pure jitted train step, the loop.

Data flow per step: grain (host-local numpy) -> global jax.Array batch (batch
dim over ('data','fsdp')) -> `train_step` (jit, donated state) -> metrics.
Everything that touches devices runs on every process in the same order, so
multi-host jobs never hang on a collective that one process skipped.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils

from tavlo_jax import checkpointing, input_data, losses, run_io, sharding
from tavlo_jax import models
from tavlo_jax.data import audio as audio_lib
from tavlo_jax.data import augment as augment_lib
from tavlo_jax.data import pipeline


class TrainState(train_state.TrainState):
  batch_stats: Any = None


# ---------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------

def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  total = max(int(config.train.total_steps), 1)
  warmup = min(int(o.warmup_steps), total - 1) if total > 1 else 0
  if o.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
        decay_steps=total, end_value=o.learning_rate * o.end_learning_rate_factor)
  elif o.schedule == 'constant':
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
         optax.constant_schedule(o.learning_rate)], [max(warmup, 1)])
  else:
    raise ValueError(f'config.optimizer.schedule: unknown {o.schedule!r}; '
                     'expected cosine or constant')
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=o.weight_decay))
  elif o.name == 'sgd':  # momentum SGD; also what the sharding tests compare with
    parts.append(optax.sgd(schedule, momentum=0.9))
  else:
    raise ValueError(f'config.optimizer.name: unknown {o.name!r}; expected adamw or sgd')
  tx = optax.chain(*parts)
  if o.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.accumulate_steps))
  return tx, schedule


# ---------------------------------------------------------------------------
# State: abstract first, then materialised directly into its shardings
# ---------------------------------------------------------------------------

def base_rngs(config):
  """(init_rng, step_rng) from `config.seed`."""
  # rbg keys: same guarantees for our use, and ~4x faster to compile on CPU.
  return jax.random.split(jax.random.key(config.seed, impl='rbg'))


def _boxed_state_init(config, model, mesh, rng):
  """(init_boxed, abstract boxed state, state shardings); allocates nothing."""
  tx, _ = make_optimizer(config)

  def init_boxed(rng):
    frames, audio = models.dummy_inputs(config, 2)
    variables = model.init(rng, frames, audio, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             tx=tx, batch_stats=variables.get('batch_stats', {}))

  # No logical-axis-rules context here: the rules are applied explicitly by
  # state_shardings, and flax's DenseGeneral cannot constrain its reshaped
  # kernel at init time under active rules.
  with jax.set_mesh(mesh):
    abstract_boxed = jax.eval_shape(init_boxed, rng)
    shardings = sharding.state_shardings(abstract_boxed, mesh)
  return init_boxed, abstract_boxed, shardings


def abstract_state(config, model, mesh, rng):
  """(state as ShapeDtypeStructs carrying their shardings, state shardings).

  No device memory and no real devices needed: what the AOT compile
  (`tavlo_jax.aot_compile`) lowers the train step with.
  """
  _, abstract_boxed, shardings = _boxed_state_init(config, model, mesh, rng)
  return (checkpointing.abstract_with_shardings(nn.meta.unbox(abstract_boxed), shardings),
          shardings)


def create_state(config, model, mesh, rng):
  """Returns (state, state_shardings, abstract_state)."""
  init_boxed, _, shardings = _boxed_state_init(config, model, mesh, rng)
  with jax.set_mesh(mesh):
    init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
    state = init(rng)
  abstract = jax.eval_shape(lambda: state)
  return state, shardings, abstract


# ---------------------------------------------------------------------------
# Pure steps
# ---------------------------------------------------------------------------

def _model_audio(config, batch):
  # Host log-mel, or log-mel (+ SpecAugment masks) from the waveform on device.
  return audio_lib.audio_features(batch, config)


def _audio_shifts(config, frames, rng):
  """{'audio_shifts': int [K, B]} for out-of-sync negatives, or {}.

  Each shift is at least the temporal window + 1 frames away from 0 on the
  circle of T frames, so an out-of-sync copy never lines up with its clip
  within what temporal attention sees.
  """
  k = config.loss.shifted_audio_negatives
  if not k:
    return {}
  b, t = frames.shape[:2]
  window = config.model.temporal_window
  lo = window + 1 if 0 <= window < t // 2 else max(1, t // 4)
  if t - 2 * lo < 0:
    raise ValueError(f'clips of {t} frames are too short for out-of-sync '
                     f'negatives with temporal_window={window}')
  shifts = jax.random.randint(jax.random.fold_in(rng, 1), (k, b), lo, t - lo + 1)
  return dict(audio_shifts=shifts)


def train_step(state: TrainState, batch, base_rng, *, config, model):
  """One update. Pure: everything random comes from fold_in(rng, step)."""
  rng = jax.random.fold_in(base_rng, state.step)
  audio = _model_audio(config, batch)
  # Scaled, converted and colour-jittered here where the config says so.
  frames = augment_lib.frames_for_model(batch, config.input.image_size)

  def loss_fn(params):
    variables = {'params': params}
    mutable = []
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      mutable = ['batch_stats']
    out, updates = model.apply(variables, frames, audio, train=True,
                               mutable=mutable, rngs={'dropout': rng},
                               **_audio_shifts(config, frames, rng))
    loss, aux = losses.make_loss(config)(out)
    return loss, (aux, updates)

  (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.apply_gradients(grads=grads)
  if updates:
    new_state = new_state.replace(batch_stats=updates['batch_stats'])
  # What must stay finite, checked on the NEW state (an overflowing update
  # can poison the parameters from a finite loss and gradient). One pass
  # over the state, small beside the step's forward and backward passes.
  finite_checks = {name: _all_finite(value) for name, value in (
      ('loss', loss), ('grad_norm', grad_norm), ('params', new_state.params),
      ('opt_state', new_state.opt_state), ('batch_stats', new_state.batch_stats))}
  finite = functools.reduce(jnp.logical_and, finite_checks.values())
  # A non-finite step never changes the state: in `stop` mode the host then
  # stops with the step named; in `skip` mode training simply goes on. The
  # step counter still advances: that batch was consumed, and the counter,
  # the data iterator and the checkpoint's step number must agree.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  new_state = new_state.replace(step=state.step + 1)
  metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite, **aux,
                 **{f'finite_{k}': v for k, v in finite_checks.items()})
  return new_state, metrics


def _all_finite(tree):
  """True iff every float in `tree` is finite (counters are ints: skipped)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return functools.reduce(jnp.logical_and, leaves, jnp.array(True))


def predict_step(state: TrainState, batch, *, config, model):
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  out = model.apply(variables, batch['frames'], _model_audio(config, batch), train=False)
  return out['heatmap']


def compile_steps(config, model, mesh, state_shardings):
  """jit with explicit shardings; the state is donated (updated in place)."""
  rep = sharding.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, config=config, model=model),
      in_shardings=(state_shardings, None, rep),
      out_shardings=(state_shardings, rep),
      donate_argnums=(0,))
  predict = jax.jit(functools.partial(predict_step, config=config, model=model),
                    in_shardings=(state_shardings, None))
  return train, predict


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------

def run(config, workdir: str, mode: str = 'train_and_eval', init_from: str | None = None):
  """Trains and/or evaluates in `workdir`, resuming from its newest checkpoint.

  `init_from`: another run's workdir; when this one has no checkpoint yet,
  training starts from that run's newest parameters (fresh optimiser, step 0).
  """
  mesh = sharding.make_mesh(config.mesh)
  logging.info('Mesh: %s over %d devices', dict(mesh.shape), mesh.size)
  data = input_data.prepare(config, workdir)
  model = models.build_model(config)
  init_rng, step_rng = base_rngs(config)
  state, state_shardings, abstract = create_state(config, model, mesh, init_rng)
  sharding.sharding_report(state.params, state_shardings.params, mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=config.train.max_to_keep)
  train_iter = data.train_iterator() if mode != 'eval' else None
  target = checkpointing.abstract_with_shardings(abstract, state_shardings)
  step, restored = ckpt.restore_latest(target, train_iter)
  if restored is not None:
    state = restored
    logging.info('Resumed from step %d (%s)', step, ckpt.directory)
  elif mode == 'eval':
    raise checkpointing.CheckpointError(f'--mode=eval: no checkpoint in {ckpt.directory}')
  elif init_from:
    state = checkpointing.init_params_from(os.path.join(init_from, 'checkpoints'),
                                           state, target)
  else:
    state = _initial_weights(config, state)

  train_fn, predict_fn = compile_steps(config, model, mesh, state_shardings)
  writer = run_io.MetricWriter(workdir, config.train.total_steps,
                        resumed_step=None if mode == 'eval' else (step or 0))
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      if mode != 'eval':
        state = _train_loop(config, workdir, state, train_fn, predict_fn, train_iter,
                            data, ckpt, writer, mesh, step_rng)
      if mode != 'train':
        from tavlo_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
        runner.evaluate(config, workdir, state, predict_fn, data, mesh, writer,
                        step=int(jax.device_get(state.step)), final=True)
  finally:
    ckpt.close()
    writer.close()
    multihost_utils.sync_global_devices('tavlo_jax.train.run:end')
  return state


def _initial_weights(config, state):
  """A fresh state, with the visual encoder's pretrained weights if the
  config names a file (a resumed run keeps its checkpoint instead)."""
  path = config.model.visual.init_from
  if not path:
    logging.info('Visual encoder: trained from scratch '
                 '(config.model.visual.init_from is empty).')
    return state
  from tavlo_jax.models import convert_torch  # pylint: disable=g-import-not-at-top
  params, batch_stats = convert_torch.init_visual_encoder(
      state.params, state.batch_stats, path)
  logging.info('Visual encoder: initialised from %s (torchvision ResNet '
               'weights, fc layer unused).', os.path.abspath(path))
  return state.replace(params=params, batch_stats=batch_stats)


def _train_loop(config, workdir, state, train_fn, predict_fn, train_iter, data,
                ckpt, writer, mesh, step_rng):
  _, schedule = make_optimizer(config)
  total = int(config.train.total_steps)
  start = int(jax.device_get(state.step))
  preemption = run_io.Preemption()
  # Made by a jitted function, not device_put: on several processes a global
  # replicated array cannot be built from one host's value by device_put.
  rng = jax.jit(lambda: step_rng, out_shardings=sharding.replicated(mesh))()
  if start >= total:
    logging.info('Already trained %d/%d steps.', start, total)
    return state
  logging.info('Training steps %d..%d, global batch %d', start, total,
               config.input.batch_size)
  t_last, step_last = time.perf_counter(), start
  t_start = t_last
  pending = []
  last_saved = start or None
  input_wait = 0.0   # seconds blocked on the input pipeline since the last log
  for step in range(start + 1, total + 1):
    t_wait = time.perf_counter()
    host_batch = next(train_iter)
    input_wait += time.perf_counter() - t_wait
    batch = pipeline.make_global_batch(host_batch, mesh)
    state, metrics = train_fn(state, batch, rng)
    pending.append(metrics)
    is_last = step == total
    if step % config.train.log_every_steps == 0 or is_last:
      metrics = jax.device_get(pending)
      pending = []
      _check_finite(config, metrics, step - len(metrics) + 1, last_saved)
      now = time.perf_counter()
      steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
      eta = (total - step) / max(steps_per_s, 1e-9)
      last = metrics[-1]
      values = {k: float(np.mean([m[k] for m in metrics]))
                for k in last if not k.startswith('finite')}
      # The share of the interval this loop sat waiting for a host batch
      # (steps are dispatched asynchronously, so the device waits then too):
      # near 0 when the accelerator is the bottleneck; high means the input
      # pipeline is (more grain workers or host cores).
      values.update(steps_per_s=steps_per_s,
                    clips_per_s=steps_per_s * config.input.batch_size,
                    learning_rate=float(schedule(step)),
                    input_wait=min(input_wait / max(now - t_last, 1e-9), 1.0))
      writer.scalars(step, {f'train/{k}': v for k, v in values.items()})
      logging.info('step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s '
                   '(%.1f clips/s, input wait %.0f%%)  elapsed %s  ETA %s',
                   step, total, values['loss'], values['grad_norm'],
                   values['learning_rate'], steps_per_s, values['clips_per_s'],
                   100 * values['input_wait'], _hms(now - t_start), _hms(eta))
      t_last, step_last, input_wait = now, step, 0.0
    stop = preemption.agreed()
    if stop or is_last or step % config.train.checkpoint_every_steps == 0:
      if pending:  # never save a state that a pending non-finite step poisoned
        metrics = jax.device_get(pending)
        _check_finite(config, metrics, step - len(metrics) + 1, last_saved)
        pending = []
      ckpt.save(step, state, train_iter, force=True)
      last_saved = step
    if stop:
      ckpt.wait()
      logging.warning('Stopped at step %d after SIGTERM; checkpoint saved.', step)
      raise SystemExit(0)
    every = config.train.eval_every_steps
    if every and step % every == 0 and not is_last:
      from tavlo_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
      runner.evaluate(config, workdir, state, predict_fn, data, mesh, writer,
                      step=step, final=False)
  return state


class NonFiniteError(RuntimeError):
  pass


FINITE_CHECKS = ('loss', 'grad_norm', 'params', 'opt_state', 'batch_stats')


def _check_finite(config, metrics, first_step, last_saved=None):
  for i, m in enumerate(metrics):
    if bool(m['finite']):
      continue
    step = first_step + i
    what = next(k for k in FINITE_CHECKS if not bool(m[f'finite_{k}']))
    what = {'params': 'the updated parameters', 'opt_state': 'the updated optimizer state',
            'batch_stats': 'the updated batch statistics'}.get(what, what)
    msg = (f'step {step}: {what} went non-finite (loss={float(m["loss"])}, '
           f'grad_norm={float(m["grad_norm"])}); the update was not applied')
    if config.train.on_nonfinite == 'stop':
      saved = (f'the newest checkpoint is step {last_saved}' if last_saved
               else 'no checkpoint was written')
      raise NonFiniteError(f'training stopped at {msg}; {saved} '
                           '(config.train.on_nonfinite=stop)')
    logging.warning('%s; skipping it (config.train.on_nonfinite=skip).', msg)


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
