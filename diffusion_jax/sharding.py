"""Data parallelism over every device of every host with jax.jit on a device Mesh.

One mesh axis, 'data', spans all devices (jax.devices() across hosts). Batches are sharded along
their leading axis; parameters, optimiser state and other state are replicated. The same code runs
on one CPU, 8 GPUs or a TPU pod: XLA's SPMD partitioner inserts the gradient all-reduce that pmap
code writes by hand.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over the given devices (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch_size: int, mesh: Mesh, field: str = 'batch_size') -> None:
    """Raise if the global batch cannot be split evenly over the mesh's devices."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f'{field}={global_batch_size} is not divisible by the {n} devices; set '
                         f'{field} to a multiple of {n}.')


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The part of the global batch this host reads: global / process_count."""
    check_global_batch(global_batch_size, mesh)
    return global_batch_size // jax.process_count()


def shard_batch(batch, mesh: Mesh):
    """Host-local numpy arrays (leading axis = this host's share) -> global jax.Arrays sharded
    over 'data'. On one host this is a device_put with the data sharding."""
    sharding = data_sharding(mesh)
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh: Mesh):
    """Place a pytree on every device of the mesh (parameters, optimiser state)."""
    return jax.device_put(tree, replicated(mesh))


def to_host(tree):
    """Fetch a (possibly multi-host) global pytree to numpy on this host."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
