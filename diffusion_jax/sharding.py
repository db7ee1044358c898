"""Data parallelism and FSDP over every device of every host with jax.jit on a device Mesh.

The mesh has two axes, ('data', 'fsdp'), of sizes (devices / N, N) with N = config.sharding.fsdp.
Batches are sharded along their leading axis over both axes (every device holds a slice).
N = 1 is plain data parallelism: the state is replicated. N > 1 shards each array of the train
state (parameters, EMA, optimiser moments) over 'fsdp' along its largest dimension that N divides
(state_shardings; arrays smaller than FSDP_MIN_SIZE or with no such dimension stay replicated),
so parameters + optimiser state per device shrink ~1/N. XLA's SPMD partitioner inserts the
gradient reduction and the parameter all-gathers (no hand-written collectives); the same code
runs on one CPU, 8 GPUs or a TPU pod.

Several processes (hosts) join through `initialize_distributed` (the --coordinator_address,
--num_processes and --process_id flags of diffusion_jax.main, or JAX's cluster detection);
`any_process` ORs a host-side flag over them (the agreed stop of a preempted run).

Compilation: `use_compile_cache` turns on JAX's persistent compilation cache (config field
`compile_cache_dir`: 'auto' = <user cache folder>/diffusion_jax/xla, '' = off), so a second
command over the same programs loads them instead of compiling; `CompileClock` measures the
time spent tracing, lowering and compiling (or loading), so a report can state compile and run
time apart. `peak_memory_per_device` estimates what a compiled program needs on one device.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # a batch is split over every device
# Arrays with fewer elements stay replicated under FSDP: biases and norms weigh nothing, and
# gathering them would cost a collective each.
FSDP_MIN_SIZE = 1024


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
    """The ('data', 'fsdp') mesh of shape (devices / fsdp, fsdp) over the given devices (default:
    all devices of all hosts), laid out by jax.make_mesh (which orders devices for the
    interconnect on GPU/TPU; the 'fsdp' groups are neighbours). Auto axes: XLA's partitioner
    places the collectives, as with a plain Mesh (make_mesh's default of Explicit axes would put
    shardings into the types of every traced array)."""
    devices = jax.devices() if devices is None else list(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f'sharding.fsdp={fsdp!r} must be a positive integer that divides the '
                         f'{len(devices)} devices (1: data parallelism only).')
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, devices=devices,
                         axis_types=(auto, auto))


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP_AXIS, 1))


def param_spec(shape, fsdp: int) -> P:
    """The rule for one array: its largest dimension that fsdp divides goes over 'fsdp' (the
    first such dimension on ties); replicated when fsdp is 1, the array is smaller than
    FSDP_MIN_SIZE elements or no dimension is divisible."""
    shape = tuple(shape)
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return P(*([None] * axis), FSDP_AXIS)


def state_shardings(mesh: Mesh, tree):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (a train state) by param_spec."""
    fsdp = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def shard_state(tree, mesh: Mesh):
    """Place a pytree (a train state) on the mesh by state_shardings: replicated for fsdp = 1."""
    return jax.device_put(tree, state_shardings(mesh, tree))


def bytes_per_device(tree) -> int:
    """The largest number of bytes of `tree`'s arrays that any one device holds."""
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


MEMORY_ANALYSIS = 'memory_analysis'  # the sources of peak_memory_per_device's estimate
ARRAYS = 'arrays'


def peak_memory_per_device(compiled=None, arrays=None) -> tuple[int, str]:
    """(estimated peak bytes on one device while `compiled` runs, the estimate's source).

    MEMORY_ANALYSIS where the backend reports it: XLA's compiled.memory_analysis() (per device
    for a program partitioned over a mesh),
        peak = arguments + outputs - aliased + temporaries,
    aliased being the donated inputs whose buffers the outputs reuse and temporaries every
    intermediate (activations kept for the backward pass, gradients, optimiser updates) at
    buffer assignment's peak. ARRAYS otherwise: the bytes per device of `arrays` (the train
    state and batch), a lower bound that omits the activations.
    """
    stats = None
    if compiled is not None:
        try:
            stats = compiled.memory_analysis()
        except Exception:  # pylint: disable=broad-except  (backends without it raise)
            stats = None
    if stats is not None and getattr(stats, 'temp_size_in_bytes', None) is not None:
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
        return int(total), MEMORY_ANALYSIS
    return bytes_per_device(arrays), ARRAYS


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
    """The batch axis (default: the leading one) split over all devices ('data' and 'fsdp'), the
    rest whole. batch_axis=1 is for stacked batches [K, B, ...] (K train steps per call:
    train.make_multi_step)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(*([None] * batch_axis), axes))


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


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------
AUTO_CACHE = 'auto'
# JAX's duration events of turning a function into an executable (dispatch.py), and the
# persistent cache's hit event (compiler.py).
_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def default_compile_cache_dir() -> str:
    """<user cache folder>/diffusion_jax/xla: $XDG_CACHE_HOME if set, else ~/.cache."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'diffusion_jax', 'xla')


def use_compile_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path` (config.compile_cache_dir): 'auto'
    for default_compile_cache_dir() on this machine, '' or None for off. Returns the folder
    used (None: off). Programs that compile in under jax_persistent_cache_min_compile_time_secs
    (JAX's default 1 s) are not stored: loading them would cost about as much."""
    path = default_compile_cache_dir() if path == AUTO_CACHE else (
        os.path.expanduser(path) if path else None)
    if jax.config.jax_compilation_cache_dir != path:
        # pylint: disable-next=import-outside-toplevel
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()  # else a folder set earlier in this process stays in use
        jax.config.update('jax_compilation_cache_dir', path)
    return path


class CompileClock:
    """with CompileClock() as clock: ... -> clock.seconds spent turning functions into
    executables (tracing, lowering, compiling or loading from the persistent cache) inside the
    block, on this thread and any other, and clock.cache_hits, the programs the persistent
    cache served. The rest of a block's wall time is running (and dispatching)."""

    def __init__(self):
        self.seconds, self.cache_hits, self.start = 0.0, 0, 0.0

    def _duration(self, event, duration, **kwargs):  # pylint: disable=unused-argument
        if event in _COMPILE_EVENTS:
            self.seconds += duration

    def _event(self, event, **kwargs):  # pylint: disable=unused-argument
        if event == _CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self):
        self.start = time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)

    def report(self) -> str:
        """'compile 12.3s (2 programs from the persistent cache), run 4.5s' so far."""
        total = time.perf_counter() - self.start
        cached = f' ({self.cache_hits} from the persistent cache)' if self.cache_hits else ''
        return f'compile {self.seconds:.1f}s{cached}, run {max(total - self.seconds, 0.0):.1f}s'
