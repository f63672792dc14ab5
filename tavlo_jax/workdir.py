"""A workdir belongs to one run: checks made before any data or compile work.

`check_usable` turns a workdir that is a file, cannot be created or is not
writable into one line. `claim` stores the run's config at its first start
(`config.json`, never overwritten once a checkpoint exists) and refuses a
relaunch whose config differs in a field that shapes what is trained: the
checkpoints would be another model's, or the same model trained on other
data or with another optimiser. Branching is explicit: `--init_from=<run>`
into a new workdir starts a new run from that run's parameters.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import tempfile

CONFIG_FILE = 'config.json'

# Fields a relaunch may change without making it another run. Everything
# else (seed, dataset identity and splits, input and augmentation, model,
# loss, optimiser) is fixed at the first start.
MAY_CHANGE_ON_RESUME = (
    'train.total_steps',          # extend or shorten; the schedule follows the new total
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.max_to_keep',
    'train.eval_every_steps',
    'train.on_nonfinite',
    'input.num_workers',          # how batches are made, not which
    'input.prefetch',
    'input.eval_batch_size',
    'input.max_instances',        # eval batches only
    'dataset.data_dir',           # the same records may move
    'dataset.manual_dir',
    'dataset.build_if_missing',
    'dataset.build_workers',
    'dataset.eval_name',          # what the run is evaluated on, not trained on
    'dataset.eval_builder_config',
    'dataset.val_split',
    'dataset.eval_split',
    'model.attention_impl',       # how attention is computed, not what
    'model.attention_block',
    'mesh.*',                     # checkpoints restore onto any mesh
    'eval.*',
    'evals.*',
)

# Errors of the disk rather than of the program: one line, not a traceback.
DISK_ERRNOS = {errno.ENOSPC: 'no space left on the device',
               errno.EDQUOT: 'disk quota exceeded',
               errno.EROFS: 'the file system is read-only',
               errno.EACCES: 'permission denied',
               errno.EIO: 'input/output error'}


class WorkdirError(RuntimeError):
  """str() is the one line for the user; `exit_code` 2 for usage errors."""

  def __init__(self, line: str, exit_code: int = 2):
    super().__init__(line)
    self.exit_code = exit_code


def check_usable(path: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={path}: is a file; expected a directory')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'--workdir={path}: cannot create it ({e.strerror})') from None
  try:  # os.access is no answer for root or read-only mounts: try a write
    with tempfile.TemporaryFile(dir=path) as f:
      f.write(b'probe')
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(f'--workdir={path}: not writable ({e.strerror})') from None


def has_checkpoints(path: str) -> bool:
  ckpt = os.path.join(path, 'checkpoints')
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def flat_json(config) -> dict:
  """{dotted field: JSON value} of a ConfigDict (tuples become lists)."""
  return flat_json_dict(json.loads(config.to_json_best_effort()))


def flat_json_dict(tree: dict) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update({f'{k}.{kk}': vv for kk, vv in flat_json_dict(v).items()})
    else:
      out[k] = v
  return out


def differing_fields(stored: dict, current: dict, defaults: dict) -> list[str]:
  """'field (stored -> current)' for fixed fields that differ. A field the
  stored run predates counts as its default; one since removed is ignored."""
  out = []
  for field, now in current.items():
    if any(fnmatch.fnmatchcase(field, p) for p in MAY_CHANGE_ON_RESUME):
      continue
    before = stored.get(field, defaults.get(field, now))
    if before != now:
      out.append(f'{field} ({json.dumps(before)} -> {json.dumps(now)})')
  return out


def claim(path: str, config, *, write: bool = True) -> None:
  """Stores the config at the first start; refuses a different run's config."""
  from tavlo_jax import config_lib  # pylint: disable=g-import-not-at-top
  stored_path = os.path.join(path, CONFIG_FILE)
  current = flat_json(config)
  if os.path.exists(stored_path) and has_checkpoints(path):
    try:
      with open(stored_path) as f:
        stored = flat_json_dict(json.load(f))
    except (OSError, ValueError) as e:
      raise WorkdirError(f'{stored_path}: cannot read the stored config ({e})') from None
    diffs = differing_fields(stored, current, flat_json(config_lib.base_config()))
    if diffs:
      raise WorkdirError(
          f'--workdir={path} holds checkpoints of a run with another config: '
          f'{"; ".join(diffs)}. Use a new --workdir (with --init_from={path} to '
          f'start from its parameters), or relaunch with the config in {stored_path}')
    return
  if write:
    # No checkpoint yet: nothing was trained under a stored config, so this
    # launch's config becomes the run's. Written whole or not at all.
    write_atomically(stored_path, config.to_json_best_effort(indent=2))


def write_atomically(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def disk_error(e: BaseException) -> OSError | None:
  """The disk-side OSError that caused `e` (also through wrapping), or None.

  TensorStore (Orbax's array writer) reports the OS error inside a
  ValueError's text: `... [os_error_code='28']`.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code and int(code.group(1)) in DISK_ERRNOS:
      n = int(code.group(1))
      return OSError(n, os.strerror(n))
    e = e.__cause__ or e.__context__
  return None


def describe_disk_error(e: OSError) -> str:
  where = f' writing {e.filename}' if e.filename else ''
  return f'{DISK_ERRNOS[e.errno]}{where} ({e.strerror or e})'
