"""Device mesh, the logical-axis rules table, and shardings derived from it.

Parameters and activations name their axes logically (`embed`, `mlp`, ...); RULES maps each
onto the mesh axes (data, fsdp, tensor). Flax skips a mesh axis already taken by an earlier
dimension, so activations `(batch, length, embed)` shard batch over data x fsdp and leave
embed whole, while a parameter `(embed, mlp)` is sharded over fsdp x tensor.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lm.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('experts', None),
    ('inner', 'tensor'),  # a scan layer's channels
    ('state', None),  # its states per channel (N)
    ('conv', None),  # Mamba's convolution taps
    ('dt_rank', None),  # Mamba's time step rank
    ('layers', None),  # the stacked axis of scan_layers
    ('cache_rows', ('data', 'fsdp')),  # a KV cache's rows: batch rows, each with its heads
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; `shape` already resolved (see config.mesh_shape)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, RULES)


def check_even(abstract_tree: Any, mesh: Mesh) -> None:
  """Every sharded dimension must split evenly over its mesh axes; says which does not."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    for dim, axes in zip(leaf.shape, leaf.sharding.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        raise ConfigError(
            f'mesh.shape={tuple(mesh.shape.values())}: {jax.tree_util.keystr(path)} of shape '
            f'{leaf.shape} has a dimension of {dim} split {ways} ways over {axes}; choose a '
            f'mesh whose {"x".join(axes)} size divides {dim}, or resize the model')


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over data x fsdp: a [B, T] array (ndim 2) or a [B] one (ndim 1)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length')[:ndim], RULES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray],
                 sharding: NamedSharding | dict[str, NamedSharding]) -> dict[str, jax.Array]:
  """This host's rows of the batch -> global arrays laid out by `sharding` (one per key)."""
  pick = (lambda k: sharding[k]) if isinstance(sharding, dict) else (lambda k: sharding)
  return {k: jax.make_array_from_process_local_data(pick(k), v) for k, v in local.items()}
