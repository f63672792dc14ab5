"""Orbax checkpoints: model state and grain iterator state, saved together.

Why both: a resumed run must see exactly the batches it would have seen, so
the data iterator's position is part of the checkpoint, written in the same
step directory as the model (grain ships the Orbax handler for it).

Why it is safe to kill at any moment: Orbax writes a step into a temporary
directory and renames it only when every item (and every process) is done, and
`all_steps()` lists finalised steps only. A step that is finalised but does not
restore (a disk fault, a truncated file) is skipped with a warning and the
previous one used.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the project's policy."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            # Leftover tmp dirs of a killed save are never trusted; drop them.
            cleanup_tmp_directories=True,
        ),
        item_names=('state', 'data'),
    )

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    args = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable step into `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding`
    set, so a checkpoint written on one mesh restores onto any other.
    Returns (step, state) or (None, None) when there is nothing to restore.
    """
    for step in reversed(self.all_steps()):
      args = {'state': ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint step %d in %s is unreadable (%s: %s); '
                        'trying the previous one.', step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:300])
        continue
      return step, restored['state']
    return None, None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore target)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, shardings)


def restore_weights(step_dir: str, sharding) -> dict:
  """params, batch_stats and step of one saved step, for inference.

  Read from the checkpoint's own metadata (no target state), so it loads
  whatever mesh or device kind it was saved from, onto `sharding`; the
  optimizer state and the data iterator stay on disk. Reads only: unlike a
  `Checkpointer` it never cleans up the folder, so it is safe on a run that
  is still training. Raises KeyError when the step holds no params.
  """
  path = os.path.join(step_dir, 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path).item_metadata.tree
  wanted = {k: meta[k] for k in ('params', 'batch_stats', 'step') if k in meta}
  if 'params' not in wanted:
    raise KeyError('the checkpoint has no params')
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), wanted)
  restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=sharding), wanted)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
