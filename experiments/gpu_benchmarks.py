"""All throughput figures of issue #14 in one run, for the few minutes an accelerator is lent:

    python experiments/gpu_benchmarks.py --out=experiments/results/gpu_$(date +%F).json
    python experiments/gpu_benchmarks.py --smoke          # a CPU: tiny shapes, checks the script

Prints, one JSON line each (and writes them all to --out):
  matmul_peak     measured bf16 matmul TFLOP/s (an N×N×N jnp.dot, the best of a few sizes):
                  the denominator of every share of peak below
  train           configs/cifar10.py's real train step (benchmark_train.benchmark), bfloat16,
                  at 128 images per device and at --large_batch per device: img/s, achieved
                  TFLOP/s (XLA's count) and its share of the measured matmul peak
  steps_per_call  the same step with training.steps_per_call = 1, 4, 16 (a lax.scan over K
                  steps per call; benchmark_steps_per_call), 128 images per device: steps/s
  sampling        DDPM-1000, DDIM-50 and DPM-Solver++(2M)-20 (benchmark_sampling.run), bf16,
                  with the time 50,000 CIFAR-10 samples take at that rate
  fid_features    FID-Inception features (pool + logits) of 32x32 uint8 images resized to 299
                  (random weights: speed does not depend on them), img/s, and the FID-50k time
  input_pipeline  host images/s of CIFAR-10 from the prepared tfds files (--data_dir), with 0,
                  1, 2, 4 decoding threads; mock examples when none are prepared
  timestep_update the loss-aware sampler's history update, scan vs vectorised, T=1000/4000,
                  B=128/2048 (benchmark_timestep_sampling.run)
  dit_train       the DiT train step (issue #20) of DiT-S/2, B/2 and XL/2 on 32x32x4 latents,
                  1000 classes, learned Σ (L_hybrid), bfloat16, cuDNN attention where it
                  applies ('auto'), 32 images per device; XL/2 also with model.remat: img/s,
                  TFLOP/s, share of the measured peak
Targets (issue #14, one H100/H200): train ≥ 10,000 img/s and ≥ 45% of peak; DDIM-50 50k < 2
min, DDPM-1000 50k < 30 min; FID-50k features < 1 min; input ≥ 3× the training rate per host.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
# pylint: disable=wrong-import-position
import benchmark_input_pipeline  # noqa: E402
import benchmark_sampling  # noqa: E402
import benchmark_steps_per_call  # noqa: E402
import benchmark_timestep_sampling  # noqa: E402
import benchmark_train  # noqa: E402
from configs import model_configs  # noqa: E402
# pylint: enable=wrong-import-position

FID_SAMPLES = 50_000  # Ho et al. 2020, Sec. 4


def matmul_peak(sizes, repeats: int) -> dict:
    """Best measured TFLOP/s of a bf16 [N, N] @ [N, N] over sizes (2·N³ FLOPs per call)."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        dot = jax.jit(lambda a, b: (a @ b).astype(jnp.bfloat16))
        dot(a, b).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = dot(a, b)
        out.block_until_ready()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return dict(what='matmul_peak', dtype='bfloat16', sizes=list(sizes), tflops=best)


def train(per_device_batches, steps: int, peak_tflops: float, smoke: bool) -> list[dict]:
    out = []
    for per_device in per_device_batches:
        config = benchmark_train.load_config('configs/cifar10.py')
        config.training.batch_size = per_device * jax.local_device_count()
        if smoke:
            config.model = model_configs.tiny_unet(image_size=32, in_channels=3)
        config.model.dtype = 'bfloat16'
        result = benchmark_train.benchmark(config, steps, warmup=2)
        result['achieved_tflops'] = result['achieved_flops_per_s'] / 1e12
        result['share_of_measured_peak'] = result['achieved_tflops'] / peak_tflops
        out.append(dict(what='train', per_device_batch=per_device, **result))
    return out


def dit_train(per_device: int, steps: int, peak_tflops: float, smoke: bool) -> list[dict]:
    cases = ([('tiny', {})] if smoke else
             [('DiT-S/2', {}), ('DiT-B/2', {}), ('DiT-XL/2', {}), ('DiT-XL/2', {'remat': True})])
    out = []
    for preset, extra in cases:
        config = benchmark_train.load_config('configs/cifar10.py')
        config.model = (model_configs.tiny_dit(image_size=32, num_classes=1000) if smoke
                        else model_configs.dit(preset))
        config.model.dtype = 'bfloat16'
        config.model.remat = bool(extra.get('remat', False))
        config.data.update(image_size=32, channels=4, num_classes=1000)
        config.diffusion.update(model_var_type='learned_range', loss_type='hybrid')
        config.training.batch_size = per_device * jax.local_device_count()
        result = benchmark_train.benchmark(config, steps, warmup=2)
        result['achieved_tflops'] = result['achieved_flops_per_s'] / 1e12
        result['share_of_measured_peak'] = result['achieved_tflops'] / peak_tflops
        out.append(dict(what='dit_train', model=preset, per_device_batch=per_device,
                        **extra, **result))
    return out


def steps_per_call(per_device: int, smoke: bool) -> list[dict]:
    config = benchmark_train.load_config('configs/cifar10.py')
    config.training.batch_size = per_device * jax.local_device_count()
    if smoke:
        config.model = model_configs.tiny_unet(image_size=32, in_channels=3)
    config.model.dtype = 'bfloat16'
    rows = benchmark_steps_per_call.measure_config(
        config, (1, 4) if smoke else (1, 4, 16), 1 if smoke else 3, 4 if smoke else 64,
        'configs/cifar10.py')
    return [dict(what='steps_per_call', **r) for r in rows]


def sampling(batch: int, smoke: bool) -> list[dict]:
    schedules = 'ddim10,dpmpp2m20' if smoke else 'ddpm1000,ddim50,dpmpp2m20'
    args = types.SimpleNamespace(schedules=schedules, estimate='', batch=batch, repeats=1,
                                 bf16=True, tiny=smoke)
    out = []
    for r in benchmark_sampling.run(args):
        out.append(dict(what='sampling', **r,
                        minutes_for_50k=FID_SAMPLES / r['samples_per_second'] / 60))
    return out


def fid_features(batch: int, repeats: int) -> dict:
    from diffusion_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
    shapes = inception.variable_shapes()
    # Random weights of the right shapes (speed does not depend on the values).
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    variables = jax.tree.unflatten(tree, [0.01 * jax.random.normal(k, s.shape, s.dtype)
                                          for k, s in zip(keys, leaves)])
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3),
                                                           dtype=np.uint8))
    fn = jax.jit(inception._features_batch)  # pylint: disable=protected-access
    jax.block_until_ready(fn(variables, images))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(variables, images)
    jax.block_until_ready(out)
    rate = batch * repeats / (time.perf_counter() - start)
    return dict(what='fid_features', batch=batch, images_per_s=rate,
                seconds_for_50k=FID_SAMPLES / rate)


def input_pipeline(data_dir: str, batch: int, batches: int, workers) -> list[dict]:
    config = benchmark_train.load_config('configs/cifar10.py')
    mock = not data_dir
    out = []
    for w in workers:
        with config.data.unlocked():
            config.data.num_workers = w
            config.data.data_dir = data_dir
        rate = benchmark_input_pipeline.rate(config.data, batch, batches, 2, mock)
        out.append(dict(what='input_pipeline', mock=mock, workers=w, batch=batch,
                        images_per_s=rate))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smoke', action='store_true', help='tiny shapes on any device')
    parser.add_argument('--large_batch', type=int, default=512, help='per-device train batch')
    parser.add_argument('--data_dir', default='', help='prepared tfds CIFAR-10 (else mocked)')
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    smoke = args.smoke
    results = []

    def report(items):
        for item in items if isinstance(items, list) else [items]:
            item.setdefault('device', jax.devices()[0].device_kind)
            print(json.dumps(item), flush=True)
            results.append(item)

    print(json.dumps(dict(jax=jax.__version__, backend=jax.default_backend(),
                          devices=[d.device_kind for d in jax.devices()])), flush=True)
    peak = matmul_peak((256,) if smoke else (4096, 8192, 16384), 2 if smoke else 20)
    report(peak)
    report(train((2,) if smoke else (128, args.large_batch), 2 if smoke else 20,
                 peak['tflops'], smoke))
    report(steps_per_call(2 if smoke else 128, smoke))
    report(dit_train(2 if smoke else 32, 2 if smoke else 10, peak['tflops'], smoke))
    report(sampling(2 if smoke else 256 * jax.local_device_count(), smoke))
    report(fid_features(2 if smoke else 500, 1 if smoke else 20))
    report(input_pipeline(args.data_dir, 16 if smoke else 512, 2 if smoke else 20,
                          (0, 2) if smoke else (0, 1, 2, 4)))
    report([dict(what='timestep_update', **benchmark_timestep_sampling.run(t, b, 3 if smoke
                                                                           else 100))
            for t in (1000, 4000) for b in (128, 2048)])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
