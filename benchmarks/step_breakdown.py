r"""Where a CPU training step's time goes, by kind of work, for JAX and PyTorch.

  PYTHONPATH=~/torch_site python benchmarks/torch_step.py --one_core --notavlo --breakdown

(used by `torch_step.py --breakdown`; nothing to run on its own.) Both sides
are profiled over the same few steps after the timed rounds and their time
is put in the same rows, so that a gap between the two steps can be pinned
on one kind of work:

  convolutions, forward
  convolutions, backward      input and weight gradients (JAX: also apart)
  layout transposes           copies that reorder a tensor's dimensions
  batch norm                  statistics, normalisation and their gradients
  max pool                    the stems' pools and their gradients
  optimizer update            Adam and what runs after the gradients
  other                       ReLU, residual adds, the loss, ...

JAX: a `jax.profiler` trace of the compiled step; each XLA:CPU thunk is one
instruction of the optimized HLO, named by its `hlo_op`, and is classified
by what the instruction computes (a convolution; a transpose-and-copy) or
else by the model path in its metadata (`.../stage1_block1/norm1/...`,
`.../max_pool/...`; `transpose(jvp(...))` marks the backward pass). A fused
instruction counts under its root's path, so an element-wise op that XLA
fused into a transpose counts as a transpose.
PyTorch: `torch.profiler` self CPU time per ATen op; everything under
`Optimizer.step` / `Optimizer.zero_grad` counts as the optimizer update.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

ROWS = ('convolutions, forward', 'convolutions, backward',
        'layout transposes', 'batch norm', 'max pool', 'optimizer update',
        'other')
INPUT_GRAD, WEIGHT_GRAD = 'input gradients', 'weight gradients'

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$')
_COMPUTATION = re.compile(r'^%?([\w.\-]+) .*\{$')
_NORM_PATH = re.compile(r'/\w*norm\d*/')


def hlo_instructions(hlo_text: str):
  """{name: (op, line, [lines of its fused computation])} of the ENTRY
  computation's instructions: the thunks XLA:CPU runs."""
  computations, current, entry = {}, None, []
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(' '):
      current = entry if line.startswith('ENTRY') else computations.setdefault(
          head.group(1), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)
  out = {}
  for line in entry:
    m = _INSTRUCTION.match(line)
    if m:
      calls = re.search(r'calls=%([\w.\-]+)', line)
      out[m.group(1)] = (m.group(3), line,
                         computations.get(calls.group(1), []) if calls else [])
  return out


def _is_weight_gradient(conv_line: str) -> bool:
  """A convolution whose output is spatially smaller than its window: the
  weight gradient, where the 'kernel' is the output's gradient (a forward or
  input-gradient convolution's output is larger than its 1x1-7x7 window)."""
  window = re.search(r'window=\{size=([\dx]+)', conv_line)
  labels = re.search(r'dim_labels=\w+_\w+->(\w+)', conv_line)
  shape = re.search(r'= \w+\[([\d,]+)\]', conv_line)
  if not (window and labels and shape):
    return False
  sizes = [int(s) for s in window.group(1).split('x')]
  dims = [int(d) for d in shape.group(1).split(',')]
  spatial = [dims[labels.group(1).index(str(i))] for i in range(len(sizes))]
  return all(o < w for o, w in zip(spatial, sizes))


def classify_hlo(op: str, line: str, body: list[str]) -> str:
  """The row of one top-level HLO instruction (`ROWS`, or a convolution
  gradient as 'convolutions, backward/<input|weight> gradients')."""
  ops = {m.group(3) for m in map(_INSTRUCTION.match, body) if m} or {op}
  op_name = (re.search(r'op_name="([^"]*)"', line) or
             re.search(r'op_name="([^"]*)"', ' '.join(body)))
  path = op_name.group(1) if op_name else ''
  conv = next((b for b in body if ' convolution(' in b),
              line if op == 'convolution' else None)
  if conv is not None:
    if _is_weight_gradient(conv):
      return f'{ROWS[1]}/{WEIGHT_GRAD}'
    if 'transpose(' in path or 'lhs_dilate' in conv:
      return f'{ROWS[1]}/{INPUT_GRAD}'
    return ROWS[0]
  if 'transpose' in ops and not ops & {'reduce', 'dot', 'convolution'}:
    return ROWS[2]
  if 'max_pool' in path:
    return ROWS[4]
  if _NORM_PATH.search(path):
    return ROWS[3]
  if path and 'jvp(' not in path:
    return ROWS[5]
  return ROWS[6]


def jax_breakdown(compiled, step, steps: int = 2) -> dict[str, float]:
  """CPU ms per step by row, from a trace of `steps` calls of `step` (which
  runs `compiled`, the XLA:CPU executable of the train step)."""
  import jax  # pylint: disable=g-import-not-at-top
  row_of = {name: classify_hlo(*entry)
            for name, entry in hlo_instructions(compiled.as_text()).items()}
  totals = collections.Counter()
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(steps):
        step()
    trace_file, = glob.glob(os.path.join(folder, '**', '*.trace.json.gz'),
                            recursive=True)
    with gzip.open(trace_file) as f:
      events = json.load(f)['traceEvents']
  for event in events:
    hlo_op = event.get('args', {}).get('hlo_op')
    if event.get('ph') != 'X' or not hlo_op or event['name'].startswith('end:'):
      continue
    # Library thunks (XLA's own convolutions) can carry the op's name
    # without its numeric suffix; they share one kind.
    row = row_of.get(hlo_op) or row_of.get(hlo_op.split('.')[0], ROWS[6])
    totals[row] += event['dur'] / 1e3 / steps
  return dict(totals)


def torch_category(name: str) -> str:
  if 'convolution_backward' in name or 'conv2d_backward' in name:
    return ROWS[1]
  if 'convolution' in name or 'conv2d' in name:
    return ROWS[0]
  if 'batch_norm' in name:
    return ROWS[3]
  if 'max_pool' in name:
    return ROWS[4]
  return ROWS[6]


def torch_breakdown(step, steps: int = 2) -> dict[str, float]:
  """CPU ms per step by row: torch.profiler's self time of every op."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  totals = collections.Counter()
  for event in prof.events():
    root = event
    while root.cpu_parent is not None:
      root = root.cpu_parent
    row = (ROWS[5] if root.name.startswith('Optimizer.')
           else torch_category(event.name))
    totals[row] += event.self_cpu_time_total / 1e3 / steps
  return dict(totals)


def table(jax_rows: dict[str, float], torch_rows: dict[str, float]) -> str:
  """Markdown: ms per step on each side, by row; the convolution gradients
  apart on the JAX side, where they are separate ops."""
  def jax_ms(row):
    return sum(v for k, v in jax_rows.items() if k.split('/')[0] == row)
  lines = ['| work | jax ms/step | torch ms/step | jax - torch ms |',
           '|---|---|---|---|']
  for row in ROWS:
    j, t = jax_ms(row), torch_rows.get(row, 0.0)
    lines.append(f'| {row} | {j:.0f} | {t:.0f} | {j - t:+.0f} |')
    if row == ROWS[1]:
      for part in (INPUT_GRAD, WEIGHT_GRAD):
        lines.append(f'| - of which {part} | '
                     f'{jax_rows.get(f"{row}/{part}", 0.0):.0f} | (one op) | |')
  j_total, t_total = sum(jax_rows.values()), sum(torch_rows.values())
  lines.append(f'| total (profiled) | {j_total:.0f} | {t_total:.0f} | '
               f'{j_total - t_total:+.0f} |')
  return '\n'.join(lines)
