"""Sampling throughput of Ho et al.'s CIFAR-10 UNet: samples/s and FLOPs per sample for DDPM-1000,
DDIM-50 and DDIM-10 on the devices at hand (random parameters: speed does not depend on them).

    python experiments/benchmark_sampling.py --schedules=ddim10 --batch=4          # a CPU
    python experiments/benchmark_sampling.py --batch=256 --bf16                    # an accelerator

For each schedule: one call compiles (reported), then --repeats timed calls of the whole jitted
sampler (x_T drawn inside, batch sharded over every device). FLOPs come from XLA's cost analysis
of one network evaluation on the same batch, times the network evaluations per sample (one per
step for 'ancestral', 'ddim' and 'dpmpp_2m'); the sampler's own arithmetic is negligible next to the UNet's.
Estimates for schedules not run are scaled from the measured per-step time (--estimate).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from anywhere: the repository root holds `configs` and `diffusion_jax`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from configs import cifar10, model_configs  # noqa: E402
from diffusion_jax import diffusion as diffusion_lib  # noqa: E402
from diffusion_jax import guidance, models, samplers, sharding  # noqa: E402
from diffusion_jax.respace import space_timesteps  # noqa: E402
# pylint: enable=wrong-import-position

# name -> (method, respacing): Ho et al.'s 1000-step ancestral sampler and DDIM's strided ones.
SCHEDULES = {'ddpm1000': ('ancestral', ''), 'ddim50': ('ddim', 'ddim50'),
             'ddim10': ('ddim', 'ddim10'),
             # DPM-Solver++(2M) (Lu et al. 2022) at 20 evenly spaced steps, one network call each.
             'dpmpp2m20': ('dpmpp_2m', 'ddim20')}


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get('flops', float('nan')))


def forward_flops(model, variables, batch: int, mesh) -> float:
    """FLOPs of one network evaluation on a batch (XLA's count of the compiled program)."""
    x = jax.device_put(jnp.zeros((batch, *models.example_shape(model)), jnp.float32),
                       sharding.data_sharding(mesh))
    t = jax.device_put(jnp.zeros((batch,), jnp.int32), sharding.data_sharding(mesh))
    compiled = jax.jit(model.apply).lower(variables, x, t).compile()
    # On a mesh the analysis is of one device's shard of the program.
    return _flops(compiled) * mesh.devices.size


def run(args) -> list[dict]:
    config = cifar10.get_config()
    # --tiny: a small UNet so that the script itself can be checked on a CPU in seconds.
    model_config = (model_configs.tiny_unet(image_size=32, in_channels=3)
                    if getattr(args, 'tiny', False)
                    else model_configs.ddpm_cifar10())
    model_config.dtype = 'bfloat16' if args.bf16 else 'float32'
    model = models.get_model(model_config)
    mesh = sharding.make_mesh()
    sharding.check_global_batch(args.batch, mesh, '--batch')
    variables = sharding.replicate(models.init_params(model, jax.random.key(0)), mesh)
    model_fn = guidance.bind_model(model.apply, variables)
    base = diffusion_lib.create_diffusion(config.diffusion)
    shape = (args.batch, *models.example_shape(model))
    flops_per_eval = forward_flops(model, variables, args.batch, mesh) / args.batch
    results = []
    for name in args.schedules.split(','):
        method, spacing = SCHEDULES[name]
        diffusion = base if not spacing else base.respace(space_timesteps(1000, spacing))
        steps = diffusion.num_timesteps

        def call(i, diffusion=diffusion, method=method):
            out = samplers.sample(diffusion, model_fn, jax.random.key(i), shape, method=method,
                                  mesh=mesh)['samples']
            return out.block_until_ready()

        start = time.perf_counter()
        call(0)
        first = time.perf_counter() - start
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            samples = call(i + 1)
            times.append(time.perf_counter() - start)
        assert np.all(np.isfinite(np.asarray(samples)))
        seconds = float(np.median(times))
        results.append(dict(
            schedule=name, method=method, steps=steps, batch=args.batch,
            dtype=model_config.dtype, device=str(jax.devices()[0].device_kind),
            num_devices=mesh.devices.size, seconds_per_batch=seconds,
            samples_per_second=args.batch / seconds, seconds_per_step=seconds / steps,
            compile_seconds=first - seconds, gflops_per_sample=flops_per_eval * steps / 1e9,
            measured=True))
    for name in (args.estimate.split(',') if args.estimate else []):
        if name in {r['schedule'] for r in results} or not results:
            continue
        method, spacing = SCHEDULES[name]
        steps = 1000 if not spacing else len(space_timesteps(1000, spacing))
        per_step = results[0]['seconds_per_step']
        results.append(dict(
            schedule=name, method=method, steps=steps, batch=args.batch,
            dtype=model_config.dtype, device=results[0]['device'],
            num_devices=mesh.devices.size, seconds_per_batch=per_step * steps,
            samples_per_second=args.batch / (per_step * steps), seconds_per_step=per_step,
            gflops_per_sample=flops_per_eval * steps / 1e9,
            measured=False))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--schedules', default='ddpm1000,ddim50,ddim10',
                        help=f'comma list of {sorted(SCHEDULES)} to run')
    parser.add_argument('--estimate', default='',
                        help='comma list of schedules to estimate from the first measured one')
    parser.add_argument('--batch', type=int, default=128, help='global batch (x device count)')
    parser.add_argument('--repeats', type=int, default=2, help='timed calls after the compile')
    parser.add_argument('--bf16', action='store_true', help='bfloat16 compute in the UNet')
    parser.add_argument('--out', default='', help='also write the results as JSON here')
    parser.add_argument('--tiny', action='store_true', help='a tiny UNet (checks the script)')
    args = parser.parse_args(argv)
    results = run(args)
    for r in results:
        print(f"{r['schedule']:>9} {'measured' if r['measured'] else 'estimated':>9}  "
              f"{r['steps']:4d} steps  batch {r['batch']}  {r['dtype']}  "
              f"{r['samples_per_second']:.4g} samples/s  {r['seconds_per_batch']:.3g} s/batch  "
              f"{r['gflops_per_sample']:.4g} GFLOP/sample"
              + (f"  compile {r['compile_seconds']:.1f} s" if r['measured'] else ''))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == '__main__':
    main()
