"""Test set-up: 8 fake CPU devices, absl flags parsed (grain workers read them);
`benchmark_module` for the tests of benchmarks/ scripts."""
import importlib.util
import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  del config
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def benchmark_module():
  """benchmark_module('torch_step') -> benchmarks/torch_step.py as a module
  (benchmarks/ is a folder of scripts, not a package)."""
  def load(name: str):
    path = (pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
            / f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'{name}_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return load
