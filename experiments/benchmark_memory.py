"""Training memory of a network with and without model.remat (and training.microbatch).

    python experiments/benchmark_memory.py --model=DiT-S/2 [--batch=8] [--microbatch=0]
    python experiments/benchmark_memory.py --model=cifar10 --remat    # one row, remat on

The program measured is one gradient of a scalar loss of the network (train=True, dropout on)
w.r.t. all parameters, computed as the train step does (train.accumulate_gradients: the whole
batch, or `--microbatch` examples at a time), compiled for the first device. Two figures:

- peak_mib: XLA's memory_analysis of the compiled program, arguments + outputs - aliased +
  temporaries: what the backend would allocate (the start-up line of a training run,
  "estimated peak memory per device", is the same sum for the whole train step).
- residual_mib: what JAX keeps from the forward pass for the backward pass
  (jax.ad_checkpoint.saved_residuals, the parameters themselves excluded): the memory remat
  trades for recomputation, before the backend's scheduler places anything.

Prints one JSON line per configuration (remat off and on unless --remat/--no-remat is given).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import re
import sys
import time

import jax
import jax.ad_checkpoint  # noqa: F401  (print_saved_residuals)
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # for configs/
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchmark_model import MODELS, make_inputs  # noqa: E402
from diffusion_jax import models, train  # noqa: E402


_RESIDUAL = re.compile(r'^(bf16|f16|f32|f64|i8|i16|i32|i64|u8|u16|u32|u64|bool)\[([\d,]*)\] (.*)$')
_ITEMSIZE = {'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 'i8': 1, 'i16': 2, 'i32': 4, 'i64': 8,
             'u8': 1, 'u16': 2, 'u32': 4, 'u64': 8, 'bool': 1}


def residual_bytes(fn, *args) -> int:
    """Bytes of what JAX keeps from fn's forward pass for its backward pass (the residuals
    jax.ad_checkpoint.print_saved_residuals lists), fn's arguments themselves excluded: the
    activation memory that remat trades for recomputation, before any backend schedules it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    total = 0
    for line in out.getvalue().splitlines():
        match = _RESIDUAL.match(line.strip())
        if match and not match.group(3).startswith('from the argument'):
            dims = [int(d) for d in match.group(2).split(',') if d]
            total += int(np.prod(dims, dtype=np.int64)) * _ITEMSIZE[match.group(1)]
    return total


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', choices=sorted(MODELS), default='cifar10')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--microbatch', type=int, default=0)
    parser.add_argument('--remat', action=argparse.BooleanOptionalAction, default=None,
                        help='only this setting (default: both)')
    return parser.parse_args(argv)


def measure(model_name: str, batch: int, remat: bool, microbatch: int = 0) -> dict:
    config = MODELS[model_name]()
    config.remat = remat
    model = models.get_model(config)
    params = models.init_params(model, jax.random.key(0))['params']
    x, t, y = make_inputs(model, batch, jax.random.key(1))
    examples = dict(x=x, t=t, y=y)

    def loss_fn(p, ex, key):
        extra = {} if ex['y'] is None else {'y': ex['y']}
        out = model.apply({'params': p}, ex['x'], ex['t'], train=True, rngs={'dropout': key},
                          **extra)
        return jnp.mean(out ** 2), {'loss': jnp.mean(out ** 2, axis=tuple(range(1, out.ndim)))}

    def grads(p, ex, key):
        return train.accumulate_gradients(loss_fn, p, ex, key, microbatch)

    start = time.perf_counter()
    compiled = jax.jit(grads).lower(params, examples, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    residual = residual_bytes(lambda p: loss_fn(p, examples, jax.random.key(2))[0], params)
    return {'model': model_name, 'batch': batch, 'microbatch': microbatch, 'remat': remat,
            'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
            'params': models.count_params(params),
            'peak_mib': peak / 2**20, 'temp_mib': stats.temp_size_in_bytes / 2**20,
            'argument_mib': stats.argument_size_in_bytes / 2**20,
            'residual_mib': residual / 2**20, 'compile_s': compile_s}


def main(argv=None):
    args = parse_args(argv)
    for remat in ((False, True) if args.remat is None else (args.remat,)):
        print(json.dumps(measure(args.model, args.batch, remat, args.microbatch)), flush=True)


if __name__ == '__main__':
    main()
