"""Ahead-of-time compile of the train step for a named topology (aot_compile).

The CPU pseudo-topology always works (8 fake devices from conftest); TPU
topologies need the optional libtpu and are skipped without it.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fixtures import fixture_builder as fb
from tavlo_jax import aot_compile, config_lib
from tavlo_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = 'configs/avatar_synth.py:runlocal'
HAS_LIBTPU = (importlib.util.find_spec('libtpu') is not None
              or bool(os.environ.get('TPU_LIBRARY_PATH')))


def _config(spec=RUNLOCAL):
  return config_lib.load_config_file(str(ROOT / spec))


@pytest.fixture(scope='module')
def cpu4():
  """runlocal's train step compiled for cpu:4 (its batch of 4 splits over 4)."""
  topology = aot_compile.get_topology('cpu:4')
  compiled, mesh, seconds = aot_compile.compile_train_step(_config(), topology.devices)
  return topology, compiled, mesh, seconds


@pytest.mark.slow
def test_cpu_topology_compiles_runlocal_and_reports_memory_and_flops(cpu4):
  topology, compiled, mesh, seconds = cpu4
  assert len(topology.devices) == 4 and topology.memory_bytes > 0
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'seq': 1}
  report = aot_compile.measure(compiled, mesh, topology, compile_s=seconds)
  # The state is an argument (and, donated, an aliased output).
  assert report.argument_bytes > 0 and report.output_bytes > 0
  assert 0 < report.alias_bytes <= min(report.argument_bytes, report.output_bytes)
  assert report.temp_bytes > 0
  assert report.total_bytes > 0
  assert report.flops > 0 and np.isfinite(report.flops)
  assert report.fits and aot_compile.exit_code(report) == aot_compile.EXIT_FITS
  text = aot_compile.format_report(report, RUNLOCAL, _config())
  for row in ('arguments', 'outputs', 'temporaries', 'generated code', 'total',
              'device memory', 'FLOPs per step'):
    assert row in text
  assert text.splitlines()[-1].startswith('verdict: fits (')


@pytest.mark.slow
def test_tiny_capacity_does_not_fit_and_exits_3(cpu4):
  topology, compiled, mesh, _ = cpu4
  report = aot_compile.measure(compiled, mesh, topology,
                               hbm_bytes=int(0.0001 * aot_compile.GIB))
  assert not report.fits
  assert aot_compile.exit_code(report) == 3
  verdict = aot_compile.format_report(report, RUNLOCAL, _config()).splitlines()[-1]
  assert verdict.startswith('verdict: DOES NOT FIT (needs ')
  assert 'GiB of 0.0001 GiB per device' in verdict


@pytest.mark.parametrize('features_on,stride', [('device', 1), ('host', 2)])
def test_train_batch_spec_is_what_the_iterator_yields(tmp_path, features_on, stride):
  c = config_lib.base_config()
  c.input.num_frames, c.input.frame_stride, c.input.image_size = 4, stride, 16
  c.input.batch_size = 4
  c.input.audio.sample_rate, c.input.audio.columns_per_frame = fb.SAMPLE_RATE, 4
  c.input.audio.n_mels, c.input.audio.fmax = 16, fb.SAMPLE_RATE / 2
  c.input.audio.features_on = features_on
  source = fb.build(tmp_path).as_data_source('train')
  batch = next(pipeline.make_train_iterator(c, source, process_index=0, process_count=1))
  spec = pipeline.train_batch_spec(c, fb.FPS)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}


def test_unknown_topology_is_one_clear_line():
  with pytest.raises(aot_compile.TopologyError, match='unknown topology; known: cpu:N'):
    aot_compile.get_topology('h100:8')
  with pytest.raises(aot_compile.TopologyError, match=r'v5e slices are AxB chips'):
    aot_compile.get_topology('v5e:2x2x2')
  with pytest.raises(aot_compile.TopologyError, match='this process has 8 CPU devices'):
    aot_compile.get_topology('cpu:64')


@pytest.mark.slow
def test_cli_unknown_topology_exits_2_without_traceback():
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.aot_compile', f'--config={RUNLOCAL}',
       '--topology=tpu9000:2x2'], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 2, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr
  assert 'error: --topology=tpu9000:2x2: unknown topology; known: cpu:N, v4:AxBxC' in r.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is installed: the missing-libtpu message cannot show')
def test_tpu_topology_without_libtpu_names_the_pip_command():
  with pytest.raises(aot_compile.TopologyError) as e:
    aot_compile.get_topology('v5e:2x2')
  assert "pip install 'jax[tpu]==0.10.2'" in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_cli_tiny_capacity_prints_the_table_and_exits_3():
  r = subprocess.run(
      [sys.executable, '-m', 'tavlo_jax.aot_compile', f'--config={RUNLOCAL}',
       '--topology=cpu:4', '--hbm_gib=0.0001'], cwd=ROOT, capture_output=True,
      text=True, timeout=900, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith(f'AOT train step: {RUNLOCAL} on cpu:4 (4 x cpu)')
  assert any(l.strip().startswith('temporaries') for l in lines)
  assert lines[-1].startswith('verdict: DOES NOT FIT (needs ')


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (optional extra: "
                    "pip install 'jax[tpu]==0.10.2'); TPU topologies cannot compile")
def test_tpu_topology_compiles_runlocal():
  topology = aot_compile.get_topology('v5e:2x2')
  assert len(topology.devices) == 4
  assert topology.devices[0].device_kind == 'TPU v5 lite'
  assert topology.memory_bytes == 16 * aot_compile.GIB
  report = aot_compile.analyse(_config(), topology)
  assert report.fits, aot_compile.format_report(report, RUNLOCAL, _config())
  assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.flops > 0


def test_compiler_out_of_memory_message_is_a_does_not_fit_verdict():
  # What libtpu says when a program needs more HBM than the chip has.
  message = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
             'memory in memory space hbm. Used 17.52G of 15.75G hbm. Exceeded '
             'hbm capacity by 1.77G.')
  report = aot_compile.Report('v5e:2x2', 'TPU v5 lite', 4, {}, 16 * aot_compile.GIB,
                              'TPU v5 lite HBM', compiler_oom=message,
                              argument_bytes=aot_compile._compiler_oom_bytes(message))
  assert not report.fits and aot_compile.exit_code(report) == 3
  assert report.verdict() == 'DOES NOT FIT (needs 17.52 GiB of 16 GiB per device)'
