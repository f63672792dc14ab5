"""What a training run writes as it goes, and how it hears that it must stop.

`MetricWriter`: console + TensorBoard + metrics.jsonl (process 0), each step
logged once across resumes. `Preemption`: SIGTERM -> save and stop at the
next step boundary, agreed by every process.
"""

from __future__ import annotations

import json
import os
import re
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tavlo_jax import workdir as workdir_lib


_TAG_ILLEGAL = re.compile(r'[^-/\w.]')


def tensorboard_tag(name: str) -> str:
  """A metric name as a TensorBoard tag: characters outside [-/\\w.] become
  '_' ('eval/total/fixed@0.1/ciou' -> 'eval/total/fixed_0.1/ciou'), the rule
  TensorBoard would otherwise apply itself with one console line per name.
  metrics.jsonl keeps the names as they are."""
  return _TAG_ILLEGAL.sub('_', name).lstrip('/')


class MetricWriter:
  """Console + TensorBoard (tensorboardX) + JSON lines; process 0 writes.

  `resumed_step`: the step training (re)starts from. What an earlier launch
  logged after it is replayed by this one, so each step is logged once with
  the value of the run that continues: `metrics.jsonl` drops its records past
  that step (rewritten whole, then renamed over), and TensorBoard gets a
  purge marker at the next step, which makes it discard the older events
  from there on when it reads the log directory.
  """

  def __init__(self, workdir: str, total_steps: int, resumed_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.tb = None
    self.jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      path = os.path.join(workdir, 'metrics.jsonl')
      if resumed_step is not None:
        _drop_records_after(path, resumed_step)
      self.tb = SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=None if resumed_step is None else resumed_step + 1)
      self.jsonl = open(path, 'a')

  def scalars(self, step: int, values: dict[str, float]):
    if not self.enabled:
      return
    for k, v in values.items():
      self.tb.add_scalar(tensorboard_tag(k), v, step)
    self.jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self.jsonl.flush()

  def images(self, step: int, images: dict[str, np.ndarray]):
    if not self.enabled:
      return
    for k, img in images.items():
      self.tb.add_image(tensorboard_tag(k), img, step, dataformats='HWC')

  def close(self):
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def _drop_records_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass   # a line cut short by a kill
  if len(kept) != len(lines):
    workdir_lib.write_atomically(path, ''.join(kept))


class Preemption:
  """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some test runners)
      pass

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def agreed(self) -> bool:
    # Every process must stop at the same step or the next collective hangs.
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array(self.requested))
    return bool(np.any(flags))
