"""The device mesh and THE table of logical-axis rules.

The model names every parameter and activation dimension with a logical name
('batch', 'time', 'embed', ...). This file alone decides which mesh axis each
name is split over, so scaling a run is a config change, never a model edit.

Mesh axes:
  data  pure data parallelism: params replicated, batch split.
  fsdp  batch split AND parameters/optimizer state split (ZeRO-3 style);
        XLA inserts the all-gathers before use.
  seq   the time axis of activations split (long clips); temporal attention
        then runs as ring / all-to-all attention across this axis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'seq')
DATA_AXES = ('data', 'fsdp')   # the batch dimension is split over both

# (logical name, mesh axis or axes or None). First match wins; a mesh axis is
# used at most once per tensor (flax drops later duplicates).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ('batch', DATA_AXES),     # every example lives on one data shard
    ('time', 'seq'),          # long clips: frames split over `seq`
    ('space', None),          # h*w tokens of a frame stay together (spatial attn)
    ('height', None),
    ('width', None),
    ('audio_time', 'seq'),    # spectrogram columns follow their frames
    ('mel', None),
    ('heads', None),          # small models: heads are not worth splitting
    ('head_dim', None),
    # Parameters: the largest dimension of each matrix goes to fsdp.
    ('embed', 'fsdp'),
    ('mlp', None),
    ('channels', 'fsdp'),     # conv output channels
    ('in_channels', None),
    ('kernel_h', None),
    ('kernel_w', None),
)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, seq) from `config.mesh`; -1 fills the rest.

  On several processes the devices are ordered process-major by
  `jax.make_mesh`, so `data` (the outermost axis) is the one that crosses hosts
  (DCN) while `fsdp`/`seq` stay inside a host (ICI/NVLink) where collectives
  are cheap. Multi-slice TPU jobs: put the slice count in `data`.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f'config.mesh: {len(devices)} devices do not split into '
          f'{dict(zip(MESH_AXES, sizes))} (fixed axes multiply to {known})')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
        f'devices, have {len(devices)}')
  # Auto axes: shardings flow from the rules table and jit's in/out shardings.
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_sharding(mesh: Mesh, logical_axes) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch dimension over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a (boxed) abstract train state from the rules table.

  Leaves that carry logical names (nn.LogicallyPartitioned) follow the table;
  everything else (step counter, optimizer scalars) is replicated.
  """
  specs = nn.get_partition_spec(abstract_state)
  mesh_specs = nn.logical_to_mesh(specs, LOGICAL_AXIS_RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P))


def sharding_report(params, shardings, mesh: Mesh) -> dict:
  """How parameters are split: counts and bytes replicated vs sharded."""
  leaves = jax.tree.leaves(params)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = replicated_bytes = 0
  per_device = 0
  n_rep = 0
  for x, s in zip(leaves, shards):
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    total += nbytes
    shard_shape = s.shard_shape(x.shape)
    per_device += int(np.prod(shard_shape)) * np.dtype(x.dtype).itemsize
    if tuple(shard_shape) == tuple(x.shape):
      replicated_bytes += nbytes
      n_rep += 1
  report = dict(num_arrays=len(leaves), replicated_arrays=n_rep,
                total_bytes=total, replicated_bytes=replicated_bytes,
                bytes_per_device=per_device, mesh=dict(mesh.shape))
  logging.info('Parameter sharding: %d arrays, %d replicated; %.2f MB total, '
               '%.2f MB replicated, %.2f MB per device on mesh %s',
               len(leaves), n_rep, total / 1e6, replicated_bytes / 1e6,
               per_device / 1e6, dict(mesh.shape))
  return report
