r"""Ahead-of-time compile of the train step for a named topology, on a CPU box.

  python -m tavlo_jax.aot_compile --config=configs/paper.py:synth --topology=v5e:2x2
  python -m tavlo_jax.aot_compile --config=configs/avatar_synth.py:runlocal --topology=cpu:8
  python -m tavlo_jax.aot_compile --config=configs/paper.py:long_clip --topology=v5p:2x2x2 \
      --config.mesh.seq=4 --config.mesh.fsdp=-1

Builds the train state and a global batch as `jax.ShapeDtypeStruct`s carrying
their shardings (no data, no weights, no devices of that kind), lowers the
REAL train step (`train.compile_steps`, the one `main` runs) on the named
topology's devices and compiles it with that platform's compiler. Prints one
table: per-device memory from `compiled.memory_analysis()` against the
device's memory, FLOPs from `cost_analysis()`, and a verdict line. Exit code
0: fits; 3: does not fit; 2: bad flags / unknown topology / libtpu missing.

Topologies:
  cpu:N              N host devices (always available; the CI-testable path).
                     "Device memory" = the host's RAM / N (they share it).
  v4:AxBxC  v5p:AxBxC  v5e:AxB  v6e:AxB
                     TPU slices, compiled by libtpu. Optional extra, never in
                     requirements.txt:  pip install 'jax[tpu]==0.10.2'
                     (= libtpu 0.0.42.*). If libtpu refuses a program for
                     lack of HBM (RESOURCE_EXHAUSTED), that is reported as
                     DOES NOT FIT with its message.

The config flags are main's (`--config=file.py:variant`, locked, the same
one-line errors for a bad `--config.x=y`), so the command that checks a job is
the command that runs it with `aot_compile` for `main`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

EXIT_FITS = 0
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3
GIB = 1024 ** 3


class TopologyError(ValueError):
  """A topology name we cannot compile for; the message is one line."""


@dataclasses.dataclass(frozen=True)
class _TpuGeneration:
  libtpu_name: str        # how libtpu spells the generation in `gen:AxB[xC]`
  chip_config: str        # 'megacore': one JAX device per chip (2 TensorCores)
  dims: int               # 2-D (v5e, v6e) or 3-D torus (v4, v5p)
  hbm_gib: float          # HBM of ONE JAX device


TPU_GENERATIONS = {
    'v4': _TpuGeneration('v4', 'megacore', 3, 32.0),
    'v5p': _TpuGeneration('v5', 'megacore', 3, 95.0),
    'v5e': _TpuGeneration('v5e', 'default', 2, 16.0),
    'v6e': _TpuGeneration('v6e', 'default', 2, 32.0),
}
LIBTPU_PIP = "pip install 'jax[tpu]==0.10.2'"
KNOWN = 'cpu:N, ' + ', '.join(
    f'{g}:{"AxBxC" if t.dims == 3 else "AxB"}' for g, t in TPU_GENERATIONS.items())


@dataclasses.dataclass
class Topology:
  name: str
  devices: list
  memory_bytes: int       # per device
  memory_source: str      # where memory_bytes comes from, for the table


def _host_ram_bytes() -> int:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _cpu_topology(name: str, count: str) -> Topology:
  """The first N host devices (the program asks jax for exactly N first)."""
  import jax  # pylint: disable=g-import-not-at-top
  if not count.isdigit() or int(count) < 1:
    raise TopologyError(f'--topology={name}: cpu:N needs a positive device count N')
  n = int(count)
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise TopologyError(
        f'--topology={name}: this process has {len(devices)} CPU devices; start it '
        f'with XLA_FLAGS=--xla_force_host_platform_device_count={n}')
  ram = _host_ram_bytes()
  return Topology(name, devices[:n], ram // n,
                  f'host RAM {ram / GIB:.1f} GiB / {n} devices')


def _tpu_topology(name: str, gen: str, shape: str, num_slices: int) -> Topology:
  spec = TPU_GENERATIONS[gen]
  dims = shape.split('x')
  if len(dims) != spec.dims or not all(d.isdigit() and int(d) > 0 for d in dims):
    raise TopologyError(
        f'--topology={name}: {gen} slices are {"AxBxC" if spec.dims == 3 else "AxB"} '
        f'chips, e.g. {gen}:{"2x2x2" if spec.dims == 3 else "2x2"}')
  if importlib.util.find_spec('libtpu') is None and not os.environ.get('TPU_LIBRARY_PATH'):
    raise TopologyError(
        f'--topology={name} needs libtpu (TPU compiler), which is not installed: '
        f'{LIBTPU_PIP}   (an optional extra; or use --topology=cpu:N)')
  # Off a TPU VM libtpu prints warnings about the TPU metadata it cannot
  # find (accelerator type, worker hostnames); they do not affect compiling.
  # libtpu also takes a lock file per machine, so a second process (another
  # check, a job) would fail with "Internal error when accessing libtpu
  # multi-process lockfile"; compiling never opens the chips, so allow it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chips = [int(d) for d in dims] + [1] * (3 - len(dims))
  per_host = tuple(min(c, b) for c, b in zip(chips, (2, 2, 1)))
  try:
    desc = topologies.get_topology_desc(
        f'{spec.libtpu_name}:{shape}', 'tpu', chip_config_name=spec.chip_config,
        chips_per_host_bounds=per_host, num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f'--topology={name}: libtpu cannot make this topology: {first}') from None
  return Topology(name, list(desc.devices), int(spec.hbm_gib * GIB),
                  f'{desc.devices[0].device_kind} HBM')


def get_topology(name: str, num_slices: int = 1) -> Topology:
  """The compile-only devices of a named topology (see the module docstring)."""
  gen, sep, shape = name.partition(':')
  gen = gen.strip().lower()
  if gen == 'cpu' and sep:
    return _cpu_topology(name, shape)
  if gen in TPU_GENERATIONS and sep:
    return _tpu_topology(name, gen, shape, num_slices)
  raise TopologyError(f'--topology={name}: unknown topology; known: {KNOWN}')


# ---------------------------------------------------------------------------
# Abstract inputs and the compile
# ---------------------------------------------------------------------------

def abstract_inputs(config, model, mesh):
  """(state, batch, step rng) of the train step as sharded ShapeDtypeStructs."""
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax import sharding, train, trained_run  # pylint: disable=g-import-not-at-top
  from tavlo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  init_rng, step_rng = train.base_rngs(config)
  state, state_shardings = train.abstract_state(config, model, mesh, init_rng)
  stored_fps = trained_run.model_fps(config) * int(config.input.frame_stride)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=sharding.batch_sharding(mesh, v.ndim))
           for k, v in pipeline.train_batch_spec(config, stored_fps).items()}
  rng = jax.ShapeDtypeStruct(step_rng.shape, step_rng.dtype,
                             sharding=sharding.replicated(mesh))
  return state, state_shardings, batch, rng


def compile_train_step(config, devices):
  """Lowers and compiles `train.compile_steps`' train step on `devices`.

  Returns (compiled, mesh, seconds). Raises what the compiler raises (e.g.
  RESOURCE_EXHAUSTED from libtpu when the step does not fit in HBM).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from tavlo_jax import models, sharding, train  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh, devices)
  shards = math.prod(mesh.shape[a] for a in sharding.DATA_AXES)
  if config.input.batch_size % shards:
    raise ValueError(
        f'config.input.batch_size={config.input.batch_size} does not split over '
        f'the {shards} data shards of mesh {dict(mesh.shape)} (data x fsdp): '
        'change --config.input.batch_size or --config.mesh.*')
  model = models.build_model(config)
  state, state_shardings, batch, rng = abstract_inputs(config, model, mesh)
  train_fn, _ = train.compile_steps(config, model, mesh, state_shardings)
  # The same contexts as train.run's loop.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = train_fn.lower(state, batch, rng)
  compiled = lowered.compile()
  return compiled, mesh, time.perf_counter() - t0


@dataclasses.dataclass
class Report:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict
  capacity_bytes: int
  capacity_source: str
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops: float = float('nan')
  compile_s: float = 0.0
  compiler_oom: str = ''      # the compiler's own out-of-memory message

  @property
  def total_bytes(self) -> int:
    """Peak per device: arguments and outputs (the donated state counted
    once), temporaries and the program."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes + self.code_bytes)

  @property
  def fits(self) -> bool:
    return not self.compiler_oom and self.total_bytes <= self.capacity_bytes

  def verdict(self) -> str:
    need, have = self.total_bytes / GIB, self.capacity_bytes / GIB
    if self.fits:
      return f'fits ({need:.4g} GiB of {have:.4g} GiB per device)'
    if self.compiler_oom and not self.total_bytes:
      return f'DOES NOT FIT (needs more than {have:.4g} GiB per device; see above)'
    return f'DOES NOT FIT (needs {need:.4g} GiB of {have:.4g} GiB per device)'


def _compiler_oom_bytes(message: str) -> int | None:
  """'Used 20.31G of 15.75G hbm' in a RESOURCE_EXHAUSTED message -> bytes."""
  m = re.search(r'Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm', message)
  if not m:
    return None
  scale = {'': 1, 'K': 1024, 'M': 1024 ** 2, 'G': GIB, 'T': 1024 * GIB}
  return int(float(m.group(1)) * scale[m.group(2)])


def _empty_report(topology: Topology, hbm_bytes: int | None, mesh_shape) -> Report:
  capacity = hbm_bytes if hbm_bytes is not None else topology.memory_bytes
  source = '--hbm_gib' if hbm_bytes is not None else topology.memory_source
  return Report(topology.name, topology.devices[0].device_kind,
                len(topology.devices), mesh_shape, capacity, source)


def measure(compiled, mesh, topology: Topology, hbm_bytes: int | None = None,
            compile_s: float = 0.0) -> Report:
  """Per-device memory and FLOPs of a compiled step against the capacity."""
  report = _empty_report(topology, hbm_bytes, dict(mesh.shape))
  report.compile_s = compile_s
  mem = compiled.memory_analysis()
  if mem is not None:
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per program
    cost = cost[0] if cost else {}
  report.flops = float((cost or {}).get('flops', float('nan')))
  return report


def analyse(config, topology: Topology, hbm_bytes: int | None = None) -> Report:
  """Compiles the train step on `topology` and measures it.

  A compiler that refuses the program for lack of memory (libtpu's
  RESOURCE_EXHAUSTED) gives a report that does not fit, with its message.
  """
  try:
    compiled, mesh, seconds = compile_train_step(config, topology.devices)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
      raise
    report = _empty_report(topology, hbm_bytes, {})
    report.compiler_oom = ' '.join(text.split())[:600]
    report.argument_bytes = _compiler_oom_bytes(text) or 0
    return report
  return measure(compiled, mesh, topology, hbm_bytes, seconds)


def exit_code(report: Report) -> int:
  return EXIT_FITS if report.fits else EXIT_DOES_NOT_FIT


def _size(num_bytes: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 1024 ** 2), ('KiB', 1024)):
    if abs(num_bytes) >= scale:
      return f'{num_bytes / scale:.2f} {unit}'
  return f'{num_bytes:.0f} B'


def format_report(report: Report, config_name: str, config) -> str:
  """The table and the verdict line."""
  cap = report.capacity_bytes
  lines = [
      f'AOT train step: {config_name} on {report.topology} '
      f'({report.num_devices} x {report.device_kind}), mesh {report.mesh or "-"}, '
      f'global batch {config.input.batch_size}, model dtype {config.model.dtype}',
  ]
  if report.compiler_oom:
    lines.append(f'  the compiler ran out of memory: {report.compiler_oom}')
  else:
    pct = 100.0 * report.total_bytes / cap if cap else float('inf')
    rows = [
        ('arguments (state + batch + rng)', _size(report.argument_bytes)),
        ('outputs (new state + metrics)', _size(report.output_bytes)),
        ('  aliased (donated state, once)', '-' + _size(report.alias_bytes)),
        ('temporaries (activations, grads)', _size(report.temp_bytes)),
        ('generated code', _size(report.code_bytes)),
        ('total', _size(report.total_bytes)),
        ('device memory', f'{_size(cap)}  ({report.capacity_source}; {pct:.1f}% used)'),
        ('FLOPs per step, per device',
         f'{report.flops:.4g}  (x{report.num_devices} devices = '
         f'{report.flops * report.num_devices:.4g})'),
        ('compile time', f'{report.compile_s:.1f} s'),
    ]
    lines.append('  per device')
    lines += [f'  {name:34s} {value:>12s}' if i < 6 else f'  {name:34s} {value}'
              for i, (name, value) in enumerate(rows)]
  lines.append(f'verdict: {report.verdict()}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# The program (flags defined only when run as one)
# ---------------------------------------------------------------------------

def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USAGE)


def run():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  # main's --config flag (locked) and its one-line errors for bad overrides.
  from tavlo_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from tavlo_jax import cli  # pylint: disable=g-import-not-at-top
  topology_flag = flags.DEFINE_string(
      'topology', None, f'Target to compile for: {KNOWN}.', required=True)
  hbm_flag = flags.DEFINE_float(
      'hbm_gib', None, 'Per-device memory to judge against, GiB (default: the '
      "topology's HBM; cpu:N: host RAM / N).")
  slices_flag = flags.DEFINE_integer(
      'num_slices', 1, 'TPU: number of slices (multi-slice over DCN; put the '
      'slice count in --config.mesh.data).')

  @cli.user_errors()
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    import jax  # pylint: disable=g-import-not-at-top
    if not os.environ.get('JAX_PLATFORMS'):
      # The host only compiles: never probe (or hold) a local accelerator.
      jax.config.update('jax_platforms', 'cpu')
    kind, _, count = topology_flag.value.partition(':')
    if kind.strip().lower() == 'cpu' and count.isdigit() and int(count) > 0:
      jax.config.update('jax_num_cpu_devices', int(count))  # before jax starts
    config = main_lib._CONFIG.value  # pylint: disable=protected-access
    config_name = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')),
                       '?')
    try:
      topology = get_topology(topology_flag.value, slices_flag.value)
    except TopologyError as e:
      _fail(str(e))
    hbm = None if hbm_flag.value is None else int(hbm_flag.value * GIB)
    try:
      report = analyse(config, topology, hbm)
    except ValueError as e:   # e.g. a mesh that does not match the device count
      _fail(str(e).strip().splitlines()[0])
    print(format_report(report, config_name, config), flush=True)
    sys.exit(exit_code(report))

  app.run(_main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access


if __name__ == '__main__':
  run()
