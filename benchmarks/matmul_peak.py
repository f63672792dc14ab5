"""The matmul rate every benchmark here calls the peak (imported by
train_step.py and torch_step.py, which run from this folder)."""

from __future__ import annotations

import time


def measured_matmul_tflops(dtype, n: int = 2048, reps: int = 5) -> float:
  """Best-of-reps n x n matmul rate on the default device, TFLOP/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    n = 8192   # big enough to saturate an accelerator
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e12
