"""training.steps_per_call: train steps/s with K steps per jitted call (a lax.scan over K
stacked batches, train.make_multi_step) against one step per call, interleaved in one process.

    python experiments/benchmark_steps_per_call.py                      # swiss roll MLP, digits UNet
    python experiments/benchmark_steps_per_call.py --configs=configs/swissroll.py --ks=1,4,16,64
    python experiments/benchmark_steps_per_call.py --loop --configs=configs/swissroll.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark_steps_per_call.py

Each K's program is the real train step (forward, backward, Adam, EMA, sampler update) compiled
for all local devices, fed a fixed synthetic stacked batch so that the input pipeline is not
measured; each round times --calls calls of every K in turn (≈ the same number of steps for each
K), and the table reports the median steps/s over rounds and the speed-up over K = 1. What K
saves is the per-call dispatch and host round trip, so it matters where a step is short (small
models, CPU, many devices); for the CIFAR-10 UNet on an accelerator a step is milliseconds of
device work and K = 1 loses little.

--loop times the whole training loop instead (train.train_and_evaluate in a temporary workdir:
input pipeline, host-to-device copies, the per-call finite check and logging included), K by K in
turn for --rounds rounds of --steps steps, from the steps_per_sec it logs over the run's last
half (compilation excluded).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'experiments'))
from benchmark_train import load_config, synthetic_batch  # noqa: E402
from diffusion_jax import diffusion as diffusion_lib, input_pipeline, models, sharding  # noqa: E402
from diffusion_jax import train  # noqa: E402


def compiled_calls(config, ks):
    """{K: (compiled K-step call, state, stacked batch)} for the config's model and batch."""
    model = models.get_model(config.model)
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    mesh = sharding.make_mesh(jax.local_devices())
    sharding.check_global_batch(config.training.batch_size, mesh, 'training.batch_size')
    step_fn = train.make_train_step(config, model, diffusion, optimizer, schedule)
    one = synthetic_batch(config, model)
    out = {}
    for k in ks:
        state = sharding.replicate(
            train.create_train_state(config, model, optimizer, jax.random.key(0)), mesh)
        axis = 0 if k == 1 else 1  # stack_batches adds the [K] axis only for K > 1
        batch = sharding.shard_batch(
            next(input_pipeline.stack_batches(itertools.repeat(one), k)), mesh, axis)
        call = train.compile_train_step(train.make_multi_step(step_fn, k), mesh, state, batch,
                                        jax.random.key(1), batch_axis=axis)
        state, _ = call(state, batch, jax.random.key(1))  # warm-up
        out[k] = [call, state, batch]
    return out, mesh


def measure(spec: str, ks, rounds: int, steps: int) -> list[dict]:
    return measure_config(load_config(spec), ks, rounds, steps, spec)


def measure_config(config, ks, rounds: int, steps: int, label: str) -> list[dict]:
    """Rows {config, model, batch_size, devices, steps_per_call, steps_per_s, speedup}."""
    calls, mesh = compiled_calls(config, ks)
    times = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            call, state, batch = calls[k]
            n = max(1, steps // k)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for _ in range(n):
                state, metrics = call(state, batch, jax.random.key(1))
            jax.block_until_ready((state, metrics))
            times[k].append(n * k / (time.perf_counter() - t0))
            calls[k][1] = state
    base = statistics.median(times[ks[0]])
    return [dict(config=label, model=config.model.name, batch_size=config.training.batch_size,
                 devices=mesh.devices.size, steps_per_call=k,
                 steps_per_s=statistics.median(times[k]),
                 speedup=statistics.median(times[k]) / base) for k in ks]


def measure_loop(spec: str, ks, rounds: int, steps: int) -> list[dict]:
    """steps/s of train_and_evaluate for each K (median over rounds, K by K in turn)."""
    rates = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            config = load_config(spec)
            config.training.update(num_train_steps=steps, steps_per_call=k,
                                   log_every_steps=steps // 2, checkpoint_every_steps=steps,
                                   sample_every_steps=0)
            with tempfile.TemporaryDirectory() as workdir:
                train.train_and_evaluate(config, workdir)
                with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
                    rows = [json.loads(line) for line in f]
            rates[k].append(rows[-1]['steps_per_sec'])
    base = statistics.median(rates[ks[0]])
    config = load_config(spec)
    return [dict(config=spec + ' (loop)', model=config.model.name,
                 batch_size=config.training.batch_size, devices=len(jax.devices()),
                 steps_per_call=k, steps_per_s=statistics.median(rates[k]),
                 speedup=statistics.median(rates[k]) / base) for k in ks]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--configs', default='configs/swissroll.py,configs/digits.py')
    parser.add_argument('--ks', default='1,4,16', help='steps per call to compare (first: base)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=64, help='train steps timed per K and round')
    parser.add_argument('--loop', action='store_true',
                        help='time train_and_evaluate (the whole loop) instead of the calls')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(',')]
    print(f'JAX {jax.__version__}, {jax.default_backend()}, '
          f'{jax.local_devices()[0].device_kind}')
    print('| config | model | global batch | devices | steps/call | steps/s | vs K=1 |')
    print('|---|---|---|---|---|---|---|', flush=True)
    rows = []
    for spec in args.configs.split(','):
        for r in (measure_loop if args.loop else measure)(spec, ks, args.rounds, args.steps):
            rows.append(r)
            print(f"| {r['config']} | {r['model']} | {r['batch_size']} | {r['devices']} | "
                  f"{r['steps_per_call']} | {r['steps_per_s']:.1f} | {r['speedup']:.2f}× |",
                  flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == '__main__':
    main()
