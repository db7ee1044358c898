"""Train-step throughput: images/s, and achieved FLOP/s from XLA's cost analysis of the compiled
step, as a share of a device's peak.

    python experiments/benchmark_train.py                                  # configs/cifar10.py
    python experiments/benchmark_train.py --batch=8 --steps=3              # a CPU
    python experiments/benchmark_train.py --bfloat16 --peak_tflops=989     # H100 SXM bf16 dense

The step is the real one (diffusion_jax.train: forward, backward, Adam, EMA, sampler update),
compiled for all local devices with the batch sharded over them, fed a fixed synthetic batch so
the input pipeline is not measured. FLOPs are XLA's count for the whole compiled step, so the
share of peak is the model FLOP utilisation of training.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion_jax import diffusion as diffusion_lib, models, sharding, train  # noqa: E402


def load_config(spec: str):
    """'configs/cifar10.py[:arg]' -> its get_config(arg)."""
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled program (XLA's cost analysis; per device for SPMD)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))


def synthetic_batch(config, model, seed: int = 0) -> dict:
    """A fixed host batch of config.training.batch_size random images in [-1, 1] and labels."""
    rng = np.random.default_rng(seed)
    batch_size = config.training.batch_size
    shape = (batch_size, *models.example_shape(model))
    return dict(image=rng.uniform(-1, 1, shape).astype(np.float32),
                label=rng.integers(0, max(config.data.num_classes, 1), batch_size).astype(np.int32))


def benchmark(config, steps: int, warmup: int) -> dict:
    model = models.get_model(config.model)
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    mesh = sharding.make_mesh(jax.local_devices())
    batch_size = config.training.batch_size
    sharding.check_global_batch(batch_size, mesh, '--batch')
    state = sharding.replicate(
        train.create_train_state(config, model, optimizer, jax.random.key(0)), mesh)
    batch = sharding.shard_batch(synthetic_batch(config, model), mesh)
    t0 = time.perf_counter()
    step = train.compile_train_step(
        train.make_train_step(config, model, diffusion, optimizer, schedule),
        mesh, state, batch, jax.random.key(1))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, _ = step(state, batch, jax.random.key(1))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    # XLA's count is for the per-device SPMD program; the step runs it on every device.
    flops = step_flops(step) * mesh.devices.size
    return dict(config=config.name, dtype=config.model.dtype, batch_size=batch_size,
                params=models.count_params(state.params), devices=mesh.devices.size,
                device_kind=jax.local_devices()[0].device_kind, compile_s=compile_s,
                step_s=step_s, images_per_s=batch_size / step_s, flops_per_step=flops,
                achieved_flops_per_s=flops / step_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--batch', type=int, default=0, help='global batch (0: the config\'s)')
    parser.add_argument('--bfloat16', action='store_true', help='bfloat16 compute')
    parser.add_argument('--steps', type=int, default=10, help='timed steps')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
    parser.add_argument('--peak_tflops', type=float, default=0.0,
                        help='device peak TFLOP/s (all local devices together) for the share')
    parser.add_argument('--json', default='', help='also write the result to this file')
    args = parser.parse_args()
    config = load_config(args.config)
    if args.batch:
        config.training.batch_size = args.batch
    if args.bfloat16:
        config.model.dtype = 'bfloat16'
    result = benchmark(config, args.steps, args.warmup)
    if args.peak_tflops:
        result['peak_flops_per_s'] = args.peak_tflops * 1e12
        result['share_of_peak'] = result['achieved_flops_per_s'] / result['peak_flops_per_s']
    for key, value in result.items():
        print(f'{key:>22}: {value:.4g}' if isinstance(value, float) else f'{key:>22}: {value}')
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
