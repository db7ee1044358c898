"""Ho et al.'s CIFAR-10 UNet in JAX (ours) against the same network in PyTorch (diffusers'
UNet2DModel with google/ddpm-cifar10-32's configuration: the same layers, 35.7M parameters,
the same FLOPs), forward pass and training step, interleaved in one process so that drift of a
shared machine hits both alike.

    python experiments/benchmark_torch_cpu.py                   # batch 8, 5 interleaved rounds
    python experiments/benchmark_torch_cpu.py --batch=8 --rounds=3 --json=out.json

Forward: eval mode, no gradients (JAX: the jitted apply; torch: torch.inference_mode()).
Training step: ε-prediction MSE on a fixed batch with dropout 0.1, backward, Adam update
(JAX: one jitted function of params, Adam state, batch; torch: zero_grad, forward, backward,
step). Each round times --iters calls of each of the four in turn after one warm-up call;
reported are the medians over rounds, in images/s, and JAX/torch ratios (> 1: JAX faster).
Both use every host core (torch.get_num_threads() is printed). Needs torch and diffusers
(`pip install -e ".[torch]" diffusers`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import model_configs  # noqa: E402
from diffusion_jax import models  # noqa: E402

# google/ddpm-cifar10-32's config.json (diffusers' port of Ho et al.'s CIFAR-10 network).
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    norm_num_groups=32, norm_eps=1e-6, act_fn='silu', dropout=0.1, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_type='positional',
    attention_head_dim=None, center_input_sample=False)
LEARNING_RATE = 2e-4  # Ho et al. 2020, App. B (the rate does not change the cost)


def jax_functions(batch: int, seed: int = 0):
    model = models.get_model(model_configs.ddpm_cifar10())
    variables = models.init_params(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    optimizer = optax.adam(LEARNING_RATE)
    state = {'variables': variables, 'opt': optimizer.init(variables)}

    forward = jax.jit(lambda v, x, t: model.apply(v, x, t))

    @jax.jit
    def train_step(state, x, t, eps, key):
        def loss_fn(v):
            out = model.apply(v, x, t, train=True, rngs={'dropout': key})
            return jnp.mean(jnp.square(out - eps))
        loss, grads = jax.value_and_grad(loss_fn)(state['variables'])
        updates, opt = optimizer.update(grads, state['opt'], state['variables'])
        return {'variables': optax.apply_updates(state['variables'], updates), 'opt': opt}, loss

    def run_forward():
        jax.block_until_ready(forward(variables, x, t))

    holder = {'state': state, 'i': 0}

    def run_train():
        holder['i'] += 1
        holder['state'], loss = train_step(holder['state'], x, t, eps,
                                           jax.random.key(holder['i']))
        jax.block_until_ready(loss)

    return run_forward, run_train, models.count_params(variables)


def torch_functions(batch: int, seed: int = 0):
    try:
        import torch  # pylint: disable=import-outside-toplevel
        from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise SystemExit(f'error: this benchmark needs torch and diffusers ({err}): '
                         'pip install -e ".[torch]" diffusers') from err
    torch.manual_seed(seed)
    net = UNet2DModel(**DIFFUSERS_CIFAR10)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    eps = torch.randn(batch, 3, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)

    def run_forward():
        net.eval()
        with torch.inference_mode():
            net(x, t).sample.sum().item()

    def run_train():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean(torch.square(net(x, t).sample - eps))
        loss.backward()
        optimizer.step()
        loss.item()

    return run_forward, run_train, sum(p.numel() for p in net.parameters()), torch


def _seconds(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def benchmark(batch: int, rounds: int, iters: int) -> dict:
    jax_fwd, jax_train, jax_params = jax_functions(batch)
    torch_fwd, torch_train, torch_params, torch = torch_functions(batch)
    runs = {'jax_forward': jax_fwd, 'torch_forward': torch_fwd,
            'jax_train': jax_train, 'torch_train': torch_train}
    start = time.perf_counter()
    jax_fwd()
    jax_train()
    compile_s = time.perf_counter() - start
    torch_fwd()
    torch_train()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(_seconds(fn, iters))
    median = {name: statistics.median(v) for name, v in times.items()}
    result = dict(batch=batch, rounds=rounds, iters=iters, jax=jax.__version__,
                  torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  jax_params=jax_params, torch_params=torch_params, jax_compile_s=compile_s)
    for name, seconds in median.items():
        result[f'{name}_images_per_s'] = batch / seconds
        result[f'{name}_ms'] = seconds * 1e3
    result['forward_ratio_jax_over_torch'] = median['torch_forward'] / median['jax_forward']
    result['train_ratio_jax_over_torch'] = median['torch_train'] / median['jax_train']
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--iters', type=int, default=1, help='calls of each per round')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    result = benchmark(args.batch, args.rounds, args.iters)
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
