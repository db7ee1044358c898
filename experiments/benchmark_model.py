"""Parameter count, forward FLOPs and throughput of a network on the present device.

    python experiments/benchmark_model.py --model=cifar10 [--batch=64] [--dtype=bfloat16]
    python experiments/benchmark_model.py --model=DiT-S/2      # 32x32x4 latents, 1000 classes

FLOPs per image come from XLA's cost analysis of the compiled forward pass (a multiply-add
counts as 2). XLA leaves out the multiply-adds with a convolution's zero padding, so it reports
less than the usual convention of a full k·k·C_in·C_out per output pixel (Ho et al.'s CIFAR-10
model: about 12.4 GFLOP); that convention is reported too, counted from the layers' shapes by
intercepting every Conv, Dense and attention call during an abstract (eval_shape) forward pass.
Throughput is images/s of the jitted forward pass (train=False) and of
a forward+backward pass (train=True, dropout on, gradient of a scalar loss w.r.t. all parameters),
timed after one warm-up call. Prints one JSON line with everything.

DiT rows also give the paper's count (Peebles & Xie 2023, Table 4: "Gflops" that count
multiply-accumulates, S/2 6.06, B/2 23.01, L/2 80.71, XL/2 118.64 at 256x256, i.e. 32x32x4
latents) doubled into FLOPs, and our full-kernel count adds the attention products q·kᵀ and
weights·v (2·N²·d multiply-adds per block), which the Dense intercept does not see.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # for configs/
from configs import model_configs  # noqa: E402
from diffusion_jax import models  # noqa: E402
from diffusion_jax.models import layers  # noqa: E402
from diffusion_jax.models.classifier import AttentionPool  # noqa: E402

MODELS = {
    'cifar10': model_configs.ddpm_cifar10,
    'improved_cifar10': model_configs.improved_ddpm_cifar10,
    'classifier64': lambda: model_configs.adm_classifier(64),
    'tiny': model_configs.tiny_unet,
    'swissroll': model_configs.swissroll_mlp,
    'DiT-S/2': lambda: model_configs.dit('DiT-S/2'),
    'DiT-B/2': lambda: model_configs.dit('DiT-B/2'),
}
# Peebles & Xie 2023, Table 4: forward multiply-accumulates per 256x256 image (32x32x4 latents).
DIT_PAPER_GMACS = {'DiT-S/2': 6.06, 'DiT-B/2': 23.01, 'DiT-L/2': 80.71, 'DiT-XL/2': 118.64}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', choices=sorted(MODELS), default='cifar10')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
    parser.add_argument('--iters', type=int, default=3, help='timed calls after one warm-up')
    return parser.parse_args(argv)


def flops_of(compiled) -> float:
    """Total FLOPs of a compiled executable from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax versions return one dict per device
        analysis = analysis[0]
    return float(analysis['flops'])


def dense_convention_flops(model, params, x, t, **kwargs) -> float:
    """2 x multiply-adds of every Conv / Dense (full kernels, padding included) and attention."""
    macs = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != '__call__':
            return out
        if isinstance(module, nn.Conv):
            c_in, c_out = args[0].shape[-1], out.shape[-1]
            macs.append(np.prod(out.shape[:-1]) * np.prod(module.kernel_size) * c_in * c_out)
        elif isinstance(module, nn.Dense):
            macs.append(np.prod(out.shape[:-1]) * args[0].shape[-1] * out.shape[-1])
        elif isinstance(module, layers.AttentionBlock):  # q·k^T and weights·v
            b, h, w, c = args[0].shape
            macs.append(2 * b * (h * w) ** 2 * c)
        elif type(module).__name__ == 'DiTBlock':  # q·k^T and weights·v over the N tokens
            b, n, d = args[0].shape
            macs.append(2 * b * n * n * d)
        elif isinstance(module, AttentionPool):  # one query over the H·W + 1 tokens
            b, h, w, c = args[0].shape
            macs.append(2 * b * (h * w + 1) * c)
        return out

    with nn.intercept_methods(count):
        jax.eval_shape(lambda p, x, t: model.apply(p, x, t, **kwargs), params, x, t)
    return 2.0 * float(sum(macs))


def images_per_second(fn, args, batch: int, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: first-call overheads stay out of the timing
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return batch * iters / (time.perf_counter() - start)


def make_inputs(model, batch: int, key):
    kx, kt, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch, *models.example_shape(model)), jnp.float32)
    t = jax.random.randint(kt, (batch,), 0, 1000)
    classes = getattr(model, 'num_classes', 0) if model.__class__.__name__ == 'DiT' else 0
    y = jax.random.randint(ky, (batch,), 0, classes) if classes else None
    return x, t, y


def benchmark(model_name: str, batch: int, dtype: str, iters: int) -> dict:
    config = MODELS[model_name]()
    config.dtype = dtype
    model = models.get_model(config)
    params = models.init_params(model, jax.random.key(0))
    x, t, y = make_inputs(model, batch, jax.random.key(1))
    extra = {} if y is None else {'y': y}

    def forward(params, x, t):
        return model.apply(params, x, t, **extra)

    def loss(params, x, t, key):
        out = model.apply(params, x, t, train=True, rngs={'dropout': key}, **extra)
        return jnp.mean(out ** 2)

    start = time.perf_counter()
    fwd = jax.jit(forward).lower(params, x, t).compile()
    compile_s = time.perf_counter() - start
    grad = jax.jit(jax.grad(loss)).lower(params, x, t, jax.random.key(2)).compile()
    row = {
        'model': model_name, 'dtype': dtype, 'batch': batch,
        'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
        'params': models.count_params(params),
        'forward_gflops_per_image_xla': flops_of(fwd) / batch / 1e9,
        'forward_gflops_per_image_full_kernels': dense_convention_flops(
            model, params, x, t, **extra) / batch / 1e9,
        'forward_compile_s': compile_s,
        'forward_images_per_s': images_per_second(fwd, (params, x, t), batch, iters),
        'train_images_per_s': images_per_second(
            grad, (params, x, t, jax.random.key(2)), batch, iters),
    }
    if model_name in DIT_PAPER_GMACS:
        row['forward_gflops_per_image_paper'] = 2.0 * DIT_PAPER_GMACS[model_name]
    return row


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(benchmark(args.model, args.batch, args.dtype, args.iters), indent=1))


if __name__ == '__main__':
    main()
