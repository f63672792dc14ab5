"""Orbax checkpoints: model state and grain iterator state, saved together.

Why both: a resumed run must see exactly the batches it would have seen, so
the data iterator's position is part of the checkpoint, written in the same
step directory as the model (grain ships the Orbax handler for it).

What is trusted: Orbax writes a step into a temporary directory, writes its
commit marker (`commit_success.txt`) into it once every item (and every
process) is done, and then renames it to the step number. A step directory
without that marker (an emptied folder, a copy cut short) is not a step.

What happens to a damaged step: it is never deleted. It is renamed to
`<step>.damaged-<n>`, a name outside Orbax's step naming, with a warning
naming it, and training resumes from the newest step that restores. A rename
is atomic, so a kill during it leaves either the step (set aside again on the
next start) or the renamed folder; never half of one. A step that is complete
but does not read back (a truncated or missing file) is set aside only when an
older step restores: if none does, the cause is more likely this program or
this config than the disk, so nothing is moved and the run stops with one line.
A checkpoint of a different model or optimizer (other array names or shapes
in its metadata) is refused before any array is read, and a save that cannot
fit on the disk is refused before Orbax writes anything.

Every step Orbax finished gets a list of its files and their sizes
(`tavlo_files.json`, written by process 0 at the next save, wait or close),
and a restore checks it first: a file missing or cut short is found before
Orbax reads anything (its restore, failing half-way, would leave reads in
flight that print tracebacks of their own).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import path as ocp_path

COMMIT_MARKER = ocp_path.atomicity.COMMIT_SUCCESS_FILE
DAMAGED_INFIX = '.damaged-'
FILE_LIST = 'tavlo_files.json'


class CheckpointError(RuntimeError):
  """The workdir's checkpoints cannot be used by this run; str() is one line."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the project's policy."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      for step in incomplete_steps(self.directory):
        set_aside(self.directory, step, f'has no Orbax commit marker ({COMMIT_MARKER})')
    _sync('tavlo_jax.checkpointing:set_aside_incomplete')
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
    _ensure_space(self.directory, state, step)
    args = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    self._list_finished_steps()   # Orbax finished the previous save first
    return saved

  def _list_finished_steps(self):
    if jax.process_index() == 0:
      for step in complete_steps(self.directory):
        write_file_list(os.path.join(self.directory, str(step)))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable step into `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding`
    set, so a checkpoint written on one mesh restores onto any other.
    Returns (step, state) or (None, None) when there is nothing to restore.
    Raises CheckpointError for another model's checkpoint, or when no step
    restores.
    """
    unreadable = []   # (step, one-line reason), newest first
    for step in reversed(self.all_steps()):
      # The file list first: even reading Orbax's metadata of a step with a
      # missing file leaves reads in flight.
      reason = (file_list_mismatch(os.path.join(self.directory, str(step)))
                or state_mismatch(self.directory, step, abstract_state))
      if reason is None:
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # pylint: disable=broad-except
          reason = _one_line(e)
      if reason is None:
        if unreadable and jax.process_index() == 0:
          for bad, why in unreadable:
            set_aside(self.directory, bad, f'does not restore ({why})')
        if unreadable:
          _sync('tavlo_jax.checkpointing:set_aside_unreadable')
          self.manager.reload()
        return step, restored['state']
      if reason.startswith(_MISMATCH):
        raise CheckpointError(f'checkpoint step {step} in {self.directory} {reason}')
      logging.warning('Checkpoint step %d in %s does not restore (%s); trying the '
                      'previous one.', step, self.directory, reason)
      unreadable.append((step, reason))
    if unreadable:
      step, why = unreadable[0]
      raise CheckpointError(
          f'no checkpoint in {self.directory} restores (newest, step {step}: {why}); '
          'nothing was moved. If the files are damaged, rename the step folders '
          f'(e.g. {step} -> {step}{DAMAGED_INFIX}1) to start over')
    return None, None

  def wait(self):
    self.manager.wait_until_finished()
    self._list_finished_steps()

  def close(self):
    self.manager.wait_until_finished()
    self._list_finished_steps()
    self.manager.close()


_MISMATCH = 'holds '   # how every reason of state_mismatch starts
_WHAT_DIFFERS = {'params': 'holds a different model',
                 'batch_stats': 'holds a different model (batch statistics)',
                 'opt_state': 'holds the state of another optimizer'}


def state_mismatch(directory: str, step: int, abstract_state,
                   parts=('params', 'batch_stats', 'opt_state')) -> str | None:
  """Why the step cannot fill `abstract_state` (its `parts`), or None.

  Read from the step's metadata alone: restoring arrays of the wrong shape
  fails half-way through Orbax's asynchronous reads, and those still in
  flight then complete on a closed event loop, each printing an 'Event loop
  is closed' traceback (some 1,200 lines for a small model).
  """
  path = os.path.join(directory, str(step), 'state')
  try:
    stored = dict(ocp.StandardCheckpointHandler().metadata(epath.Path(path)))
  except Exception as e:  # pylint: disable=broad-except
    return f'metadata unreadable: {_one_line(e)}'
  for part in parts:
    want = _shapes(getattr(abstract_state, part))
    have = _shapes(stored.get(part) or {})
    if want != have:
      return f'{_WHAT_DIFFERS[part]}: {_describe_difference(want, have)}'
  return None


def _describe_difference(want: dict, have: dict) -> str:
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  if missing or extra:
    names = (missing or extra)[:3]
    return (f'{"lacks" if missing else "has extra"} arrays {", ".join(names)}'
            + (' ...' if len(missing or extra) > 3 else ''))
  name = next(k for k in sorted(want) if want[k] != have[k])
  return f'{name} is {have[name]}, this config makes {want[name]}'


def init_params_from(directory: str, state, abstract_state):
  """`state` with params (and batch statistics) from another run's newest
  complete step; its optimiser state and step are left as they are (fresh).
  Reads only: the other run's folder is never changed."""
  directory = os.path.abspath(directory)
  steps = complete_steps(directory)
  if not steps:
    raise CheckpointError(f'--init_from: no complete checkpoint in {directory}')
  step = steps[-1]
  path = os.path.join(directory, str(step), 'state')
  mismatch = (file_list_mismatch(os.path.join(directory, str(step)))
              or state_mismatch(directory, step, abstract_state,
                                parts=('params', 'batch_stats')))
  if mismatch:
    raise CheckpointError(f'--init_from: checkpoint step {step} in {directory} {mismatch}')
  target = {'params': abstract_state.params}
  if abstract_state.batch_stats:
    target['batch_stats'] = abstract_state.batch_stats
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  logging.info('Initialised the parameters from step %d of %s (optimiser fresh, '
               'step 0).', step, directory)
  return state.replace(**restored)


def write_file_list(step_dir: str) -> None:
  """Records the files of a step Orbax finished and their sizes, once.

  Atomic (a temporary file renamed), so a kill leaves either no list (the
  step is then checked by Orbax alone, as before lists existed) or a whole
  one. A step that disappears meanwhile (Orbax dropping old steps in the
  background) is skipped.
  """
  target = os.path.join(step_dir, FILE_LIST)
  if os.path.exists(target):
    return
  try:
    files = {}
    for root, _, names in os.walk(step_dir):
      for name in names:
        path = os.path.join(root, name)
        rel = os.path.relpath(path, step_dir)
        if not rel.startswith(FILE_LIST):
          files[rel] = os.path.getsize(path)
    tmp = target + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(dict(sorted(files.items())), f, indent=0)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except OSError as e:
    logging.info('No file list for %s (%s)', step_dir, _one_line(e))


def file_list_mismatch(step_dir: str) -> str | None:
  """Why a step's files differ from the list written when it was finished
  (one line), or None when they match or the step has no list."""
  path = os.path.join(step_dir, FILE_LIST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)
  except (OSError, ValueError) as e:
    return f'has an unreadable {FILE_LIST} ({_one_line(e)})'
  for rel, size in files.items():
    where = os.path.join(step_dir, rel)
    if not os.path.exists(where):
      return f'is missing its file {rel}'
    if os.path.getsize(where) != size:
      return f'has {rel} at {os.path.getsize(where)} bytes, {size} when it was saved'
  return None


def complete_steps(directory: str) -> list[int]:
  """Steps Orbax committed (its marker present): the only ones to trust."""
  return [s for s in _step_folders(directory) if _committed(directory, s)]


def incomplete_steps(directory: str) -> list[int]:
  """Step folders (a number as name) without Orbax's commit marker."""
  return [s for s in _step_folders(directory) if not _committed(directory, s)]


def _step_folders(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _committed(directory: str, step: int) -> bool:
  return os.path.exists(os.path.join(directory, str(step), COMMIT_MARKER))


def set_aside(directory: str, step: int, why: str) -> str:
  """Renames step folder `step` to `<step>.damaged-<n>` (first free n)."""
  n = 1
  while os.path.exists(os.path.join(directory, f'{step}{DAMAGED_INFIX}{n}')):
    n += 1
  target = os.path.join(directory, f'{step}{DAMAGED_INFIX}{n}')
  # One rename: atomic on a POSIX file system, so a kill leaves the step
  # either where it was (set aside again next start) or set aside.
  os.rename(os.path.join(directory, str(step)), target)
  logging.warning('Checkpoint step %d in %s %s: moved it aside to %s (kept, not '
                  'deleted).', step, directory, why, os.path.basename(target))
  return target


def _ensure_space(directory: str, state, step: int) -> None:
  """Raises OSError(ENOSPC) before a save that cannot fit on the disk.

  Orbax would find out half-way, in background threads, each logging its
  own traceback; the step would never be committed (so never trusted), but
  the user would read pages instead of one line. Needed: the whole state
  (every process writes its shards to the same file system) plus a margin
  for metadata and the iterator state.
  """
  need = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
  need = int(need * 1.1) + (1 << 20)
  free = shutil.disk_usage(directory if os.path.isdir(directory)
                           else os.path.dirname(directory)).free
  if free < need:
    raise OSError(errno.ENOSPC, f'checkpoint step {step} needs about {need / 2**20:.1f} MB, '
                  f'{free / 2**20:.1f} MB free', directory)


def _shapes(tree) -> dict[str, tuple]:
  """{'a/b/0': shape}: the same names for a live pytree and Orbax's metadata."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(name(k) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:300] if text else ""}'


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


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
  is still training. Raises KeyError when the step holds no params, and
  CheckpointError when its files differ from its file list (before Orbax
  reads anything).
  """
  damaged = file_list_mismatch(step_dir)
  if damaged:
    raise CheckpointError(f'checkpoint {step_dir} {damaged}')
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
