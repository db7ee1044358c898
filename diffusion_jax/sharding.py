"""Data parallelism over every device of every host with jax.jit on a device Mesh.

One mesh axis, 'data', spans all devices (jax.devices() across hosts). Batches are sharded along
their leading axis; parameters, optimiser state and other state are replicated. The same code runs
on one CPU, 8 GPUs or a TPU pod: XLA's SPMD partitioner inserts the gradient all-reduce that pmap
code writes by hand.

Several processes (hosts) join through `initialize_distributed` (the --coordinator_address,
--num_processes and --process_id flags of diffusion_jax.main, or JAX's cluster detection);
`any_process` ORs a host-side flag over them (the agreed stop of a preempted run).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over the given devices (default: all devices of all hosts), laid
    out by jax.make_mesh (which orders devices for the interconnect on GPU/TPU). Auto axes:
    XLA's partitioner places the collectives, as with a plain Mesh (make_mesh's default of
    Explicit axes would put shardings into the types of every traced array)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def cluster_detected() -> bool:
    """Whether JAX's cluster auto-detection (TPU pod, SLURM, ...) finds an environment: then
    jax.distributed.initialize() needs no arguments. (Reads JAX's private cluster list; a JAX
    that moves it makes this False, so nothing is initialised without flags.)"""
    try:
        from jax._src import clusters  # pylint: disable=import-outside-toplevel
        return any(not env.opt_in_only_method and env.is_env_present()
                   for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
        return False


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """jax.distributed.initialize for a multi-process run; returns whether it was called.

    With coordinator_address=HOST:PORT, num_processes=N and process_id=I (all three, or none),
    process I of N joins the coordinator that process 0 serves on HOST:PORT. With none, it
    initialises only where JAX detects a cluster (TPU pod, SLURM) and fills the three in
    itself; otherwise this is a single-process run. Must run before anything touches a
    device. CPU collectives go through gloo (XLA:CPU has no other cross-process transport).
    """
    given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
             '--process_id': process_id}
    missing = [k for k, v in given.items() if v is None]
    if len(missing) == len(given):
        if not cluster_detected():
            return False
    elif missing:
        raise ValueError(f'{", ".join(missing)} missing: a multi-process run needs all of '
                         '--coordinator_address=HOST:PORT, --num_processes=N and '
                         '--process_id=I (0 <= I < N), the same address and N on every process.')
    elif not 0 <= process_id < num_processes:
        raise ValueError(f'--process_id={process_id} is not in [0, --num_processes='
                         f'{num_processes}): number the processes 0..N-1.')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if missing:  # nothing given: JAX's auto-detection fills everything in
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def any_process(flag: bool) -> bool:
    """True if `flag` is True on any process (an all-gather; every process must call it at the
    same point of the program). Just `flag` in a single-process run."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def data_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """The batch axis (default: the leading one) split over 'data', the rest whole. batch_axis=1
    is for stacked batches [K, B, ...] (K train steps per call: train.make_multi_step)."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


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


def shard_batch(batch, mesh: Mesh, batch_axis: int = 0):
    """Host-local numpy arrays (axis batch_axis = this host's share) -> global jax.Arrays
    sharded over 'data' along that axis. On one host this is a device_put with the data
    sharding."""
    sharding = data_sharding(mesh, batch_axis)
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
