"""Test set-up: 8 fake CPU devices, absl flags parsed (grain workers read them)."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # noqa: E402


def pytest_configure(config):
  del config
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
