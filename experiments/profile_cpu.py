"""Profile of Ho et al.'s CIFAR-10 UNet on XLA:CPU and A/B timings of the changes tried for it
(issue #14: layouts, fusion around the convolutions, GroupNorm, attention).

    python experiments/profile_cpu.py profile                # share of time per op kind
    python experiments/profile_cpu.py ops --rounds=7         # isolated ops, old vs new
    python experiments/profile_cpu.py unet --rounds=5        # the whole UNet, old vs new
    python experiments/profile_cpu.py all --json=out.json    # all three, results as JSON

profile: for the replaced implementations ('old') and the library ('new'), jits the forward
(eval, batch --batch) and the training step (value_and_grad of the ε-MSE with dropout 0.1, then
Adam: experiments/benchmark_torch_cpu.py's), runs each once under
jax.profiler.trace(create_perfetto_trace=True) and sums the duration of every XLA:CPU thunk in
the trace by op kind. A thunk's kind comes from its HLO (compiled.as_text()): the opcodes of its
fused computation and the op_name metadata (the flax module path: conv, dense = 1x1 convs, qkv,
proj_out and the timestep MLP, attention = the batched q·k and weights·v matmuls and the
softmax, split and transposes of dot_product_attention, groupnorm = statistics and the
normalisation with what XLA fuses into it: the swish and the preceding bias adds; bwd = under
transpose(jvp(...))). Shares are of the summed thunk time, which exceeds the wall time when
XLA runs independent thunks on both cores.

ops: each change against the implementation it replaces, at the UNet's shapes, forward and
forward+backward (jax.grad of a random projection of the output w.r.t. every input), after
checking that both give the same values (max |a - b| / max |b| < 1e-5). The two are called
alternately, --rounds times, each timing --min_ms or more of back-to-back calls; reported are the
medians and old/new (> 1: the new one is faster).

unet: the whole UNet with every replaced implementation put back (the reference classes below,
patched into diffusion_jax.models.layers while tracing) against the library as it is, interleaved
the same way; checks that the parameter trees are identical and the outputs and gradients equal.

Only meaningful as ratios on a shared machine: the A/B pairs are interleaved in one process so
that load from other jobs hits both alike. CPU only (JAX_PLATFORMS=cpu is set).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import glob
import gzip
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import Counter

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import model_configs  # noqa: E402
from diffusion_jax import models  # noqa: E402
from diffusion_jax.models import layers  # noqa: E402

TOLERANCE = 1e-5
BATCH = 8
GROUPS = 32
EPS = layers.GROUPNORM_EPSILON


# --- the implementations that were replaced (the reference for the A/Bs) ----------------------

class RefGroupNorm(layers.GroupNorm):
    """layers.GroupNorm before issue #14: flax's nn.GroupNorm on float32, then (scale, shift)."""

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, dtype=jnp.float32,
                         param_dtype=jnp.float32, name='norm')(x.astype(jnp.float32))
        if scale is not None:
            h = h * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
        return h.astype(self.dtype)


class RefUpsample(layers.Upsample):
    """layers.Upsample before issue #14: nearest x2 (two jnp.repeat), then the 3x3 conv."""

    @nn.compact
    def __call__(self, x):
        return layers.conv3x3(x.shape[-1], self.dtype, 'conv')(ref_upsample_nearest(x))


def ref_upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


REFERENCE = {'GroupNorm': RefGroupNorm, 'Upsample': RefUpsample}


@contextlib.contextmanager
def reference_layers():
    """Puts the replaced implementations back into diffusion_jax.models.layers (trace inside)."""
    saved = {name: getattr(layers, name) for name in REFERENCE}
    try:
        for name, impl in REFERENCE.items():
            setattr(layers, name, impl)
        yield
    finally:
        for name, impl in saved.items():
            setattr(layers, name, impl)


# --- variants that were tried and not kept ----------------------------------------------------

def group_norm_centred(x, gamma, beta, num_groups, epsilon):
    """layers.group_norm with the mean subtracted first: y = (x - mean)·a + β."""
    b, c = x.shape[0], x.shape[-1]
    per = c // num_groups
    x3 = x.reshape(b, -1, c)
    n = x3.shape[1] * per
    mean = jnp.sum(x3, 1).reshape(b, num_groups, per).sum(-1) / n
    mean2 = jnp.sum(jnp.square(x3), 1).reshape(b, num_groups, per).sum(-1) / n
    inv = jax.lax.rsqrt(jnp.maximum(0.0, mean2 - jnp.square(mean)) + epsilon)
    a = jnp.repeat(inv, per, -1) * gamma
    return (x - jnp.repeat(mean, per, -1)[:, None, None, :]) * a[:, None, None, :] + beta


def group_norm_grouped(x, gamma, beta, num_groups, epsilon):
    """Statistics over [B, H, W, G, C/G]'s axes (1, 2, 4) (flax's layout), affine folded."""
    b, h, w, c = x.shape
    x5 = x.reshape(b, h, w, num_groups, c // num_groups)
    mean = jnp.mean(x5, (1, 2, 4))
    inv = jax.lax.rsqrt(jnp.maximum(0.0, jnp.mean(jnp.square(x5), (1, 2, 4))
                                    - jnp.square(mean)) + epsilon)
    a = inv[:, :, None] * gamma.reshape(num_groups, -1)
    d = beta.reshape(num_groups, -1) - mean[:, :, None] * a
    return (x5 * a[:, None, None] + d[:, None, None]).reshape(x.shape)


def flax_group_norm(x, gamma, beta, num_groups, epsilon):
    return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon).apply(
        {'params': {'scale': gamma, 'bias': beta}}, x)


def upsample_broadcast(x):
    """Nearest x2 by broadcast + reshape instead of two jnp.repeat."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
        b, 2 * h, 2 * w, c)


def attention_einsum(q, k, v):
    """Single-pass einsum attention with a float32 softmax: q, k, v [B, T, N, D]."""
    logits = jnp.einsum('btnd,bsnd->bnts', q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum('bnts,bsnd->btnd', weights, v)


def attention_xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def kernel_grad_xla(x, kernel, g):
    return jax.vjp(lambda k: conv3x3(x, k), kernel)[1](g)[0]


def kernel_grad_dots(x, kernel, g):
    """The 3x3 conv's kernel gradient as 9 matmuls of shifted windows of x with g."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.stack([jnp.einsum('bhwi,bhwo->io', xp[:, i:i + h, j:j + w], g)
                                 for j in range(3)]) for i in range(3)])


# --- timing -----------------------------------------------------------------------------------

def _ready(fn, args):
    return lambda: jax.block_until_ready(fn(*args))


def interleaved(calls: dict, rounds: int, min_ms: float) -> dict:
    """Median seconds per call of each callable, timed alternately round by round."""
    reps = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        reps[name] = max(1, int(math.ceil(min_ms / 1e3 / max(once, 1e-6))))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                call()
            times[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(v) for name, v in times.items()}


def rel_err(a, b) -> float:
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - y))
                                           / max(float(jnp.max(jnp.abs(y))), 1e-30)), a, b)
    return max(jax.tree.leaves(errs))


def _random(rng, shape, scale=1.0, offset=0.0):
    return jnp.asarray(offset + scale * rng.standard_normal(shape), jnp.float32)


# --- ops: isolated A/Bs at the UNet's shapes ----------------------------------------------------

def op_cases(rng):
    """(kind, shape label, old fn, {variant: fn}, args); fns take args positionally."""
    cases = []
    for hw, c in [(32, 128), (32, 256), (32, 384), (16, 256), (16, 512), (8, 512), (4, 256)]:
        x = _random(rng, (BATCH, hw, hw, c), 2.0, 0.5)
        gamma, beta = _random(rng, (c,), 0.1, 1.0), _random(rng, (c,), 0.1)
        # As in ResBlock: GroupNorm then swish, so that what XLA fuses into the norm is counted.
        def wrap(f):
            return lambda x, g, b: nn.swish(f(x, g, b, GROUPS, EPS))
        cases.append(('groupnorm+swish', f'{hw}x{hw}x{c}', wrap(flax_group_norm),
                      {'new (layers.group_norm)': wrap(layers.group_norm),
                       'centred (x-mean)*a+b': wrap(group_norm_centred),
                       'grouped [B,H,W,G,C/G]': wrap(group_norm_grouped)}, (x, gamma, beta)))
    for hw, c in [(16, 256), (8, 256), (4, 256)]:
        x = _random(rng, (BATCH, hw, hw, c))
        kernel = _random(rng, (3, 3, c, c), 0.05)
        cases.append(('upsample', f'{hw}x{hw}x{c}', ref_upsample_nearest,
                      {'broadcast+reshape': upsample_broadcast}, (x,)))
        cases.append(('upsample+conv3x3', f'{hw}x{hw}x{c}',
                      lambda x, k: conv3x3(ref_upsample_nearest(x), k),
                      {'new (layers.upsample_conv3x3)': layers.upsample_conv3x3,
                       'broadcast, then conv': lambda x, k: conv3x3(upsample_broadcast(x), k)},
                      (x, kernel)))
    for hw, c in [(16, 256), (4, 256)]:
        q, k, v = (_random(rng, (BATCH, hw * hw, 1, c)) for _ in range(3))
        cases.append(('attention (1 head)', f'{hw * hw}x{c}', attention_xla,
                      {'einsum': attention_einsum}, (q, k, v)))
    for hw, ci, co in [(32, 128, 128), (16, 256, 256)]:
        x, g = _random(rng, (BATCH, hw, hw, ci)), _random(rng, (BATCH, hw, hw, co))
        kernel = _random(rng, (3, 3, ci, co), 0.05)
        cases.append(('conv3x3 kernel grad', f'{hw}x{hw}x{ci}->{co}', kernel_grad_xla,
                      {'9 shifted matmuls': kernel_grad_dots}, (x, kernel, g)))
    return cases


def run_ops(rounds: int, min_ms: float, seed: int = 0, only: str = '') -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for kind, label, old, variants, args in op_cases(rng):
        if only and only not in kind:
            continue
        out_shape = jax.eval_shape(old, *args)
        probe = _random(rng, out_shape.shape)
        passes = {('kernel grad' if kind == 'conv3x3 kernel grad' else 'fwd'): lambda f: jax.jit(f)}
        if kind != 'conv3x3 kernel grad':  # that one is itself a backward pass
            passes['fwd+bwd'] = lambda f: jax.jit(jax.grad(
                lambda *a, f=f: jnp.sum(f(*a) * probe), argnums=tuple(range(len(args)))))
        for pass_name, make in passes.items():
            fns = {'old': make(old), **{name: make(f) for name, f in variants.items()}}
            ref = fns['old'](*args)
            errs = {name: rel_err(fn(*args), ref) for name, fn in fns.items()}
            med = interleaved({name: _ready(fn, args) for name, fn in fns.items()}, rounds, min_ms)
            for name in variants:
                rows.append(dict(kind=kind, shape=label, pass_=pass_name, variant=name,
                                 old_ms=med['old'] * 1e3, new_ms=med[name] * 1e3,
                                 speedup=med['old'] / med[name], rel_err=errs[name],
                                 same=errs[name] < TOLERANCE))
                r = rows[-1]
                print(f"{kind:20s} {label:14s} {pass_name:8s} {name:30s} old {r['old_ms']:8.2f} ms"
                      f"  new {r['new_ms']:8.2f} ms  old/new {r['speedup']:5.2f}"
                      f"  err {r['rel_err']:.1e}", flush=True)
    return rows


# --- unet: the whole network, reference layers vs the library -----------------------------------

def unet_functions(batch: int, seed: int = 0):
    """Forward and training step of ddpm_cifar10 (benchmark_torch_cpu.py's), traced now."""
    model = models.get_model(model_configs.ddpm_cifar10())
    variables = models.init_params(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    x, eps = _random(rng, (batch, 32, 32, 3)), _random(rng, (batch, 32, 32, 3))
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    optimizer = optax.adam(2e-4)
    state = {'variables': variables, 'opt': optimizer.init(variables)}
    key = jax.random.key(seed + 1)

    def loss_fn(v, x, t, eps, key):
        out = model.apply(v, x, t, train=True, rngs={'dropout': key})
        return jnp.mean(jnp.square(out - eps))

    def train_step(state, x, t, eps, key):
        loss, grads = jax.value_and_grad(loss_fn)(state['variables'], x, t, eps, key)
        updates, opt = optimizer.update(grads, state['opt'], state['variables'])
        return {'variables': optax.apply_updates(state['variables'], updates), 'opt': opt}, loss

    def forward(v, x, t):
        return model.apply(v, x, t)

    start = time.perf_counter()
    fwd = jax.jit(forward).lower(variables, x, t).compile()
    step = jax.jit(train_step).lower(state, x, t, eps, key).compile()
    grad = jax.jit(jax.grad(loss_fn)).lower(variables, x, t, eps, key).compile()
    compile_s = time.perf_counter() - start
    return dict(model=model, variables=variables, state=state, x=x, t=t, eps=eps, key=key,
                forward=fwd, train_step=step, grad=grad, compile_s=compile_s,
                forward_hlo=fwd.as_text(), train_hlo=step.as_text())


def run_unet(batch: int, rounds: int, seed: int = 0) -> dict:
    with reference_layers():
        old = unet_functions(batch, seed)
    new = unet_functions(batch, seed)
    same_tree = (jax.tree.structure(old['variables']) == jax.tree.structure(new['variables'])
                 and all(a.shape == b.shape and bool(jnp.all(a == b)) for a, b in zip(
                     jax.tree.leaves(old['variables']), jax.tree.leaves(new['variables']))))
    # Perturbed parameters, so that the zero-initialised convs carry signal into the checks.
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda p: p + 0.05 * _random(rng, p.shape), new['variables'])
    x, t, eps, key = new['x'], new['t'], new['eps'], new['key']
    fwd_err = rel_err(new['forward'](v, x, t), old['forward'](v, x, t))
    grad_err = rel_err(new['grad'](v, x, t, eps, key), old['grad'](v, x, t, eps, key))
    calls = {
        'old_forward': _ready(old['forward'], (old['variables'], x, t)),
        'new_forward': _ready(new['forward'], (new['variables'], x, t)),
        'old_train': _ready(lambda *a: old['train_step'](*a)[1], (old['state'], x, t, eps, key)),
        'new_train': _ready(lambda *a: new['train_step'](*a)[1], (new['state'], x, t, eps, key)),
    }
    med = interleaved(calls, rounds, min_ms=0.0)
    result = dict(batch=batch, rounds=rounds, same_param_tree_and_init=same_tree,
                  forward_rel_err=fwd_err, grad_rel_err=grad_err,
                  old_compile_s=old['compile_s'], new_compile_s=new['compile_s'])
    for name, seconds in med.items():
        result[f'{name}_ms'] = seconds * 1e3
    result['forward_speedup'] = med['old_forward'] / med['new_forward']
    result['train_speedup'] = med['old_train'] / med['new_train']
    print(json.dumps(result, indent=1), flush=True)
    return result


# --- profile: share of thunk time per op kind ---------------------------------------------------

def parse_hlo(text: str):
    """{instruction name: dict(opcode, calls, op_name)} and {computation: [instructions]}."""
    comps, insts, current = {}, {}, None
    for line in text.splitlines():
        head = re.match(r'^(?:ENTRY )?%(\S+) .*\{\s*$', line)
        if head:
            current = head.group(1)
            comps[current] = []
            continue
        if line.startswith('}'):
            current = None
            continue
        m = re.match(r'\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(', line)
        if m and current is not None:
            calls = re.search(r'calls=%([\w.\-]+)', line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            inst = dict(name=m.group(1), opcode=m.group(2), calls=calls and calls.group(1),
                        op_name=op_name.group(1) if op_name else '',
                        batched_dot=m.group(2) == 'dot' and 'lhs_batch_dims=' in line)
            comps[current].append(inst)
            insts[inst['name']] = inst
    return comps, insts


def op_kind(inst, comps) -> str | None:
    body = comps.get(inst['calls'], []) if inst['calls'] else [inst]
    opcodes = {i['opcode'] for i in body}
    if inst['opcode'] == 'while' or opcodes <= {'parameter', 'tuple', 'get-tuple-element'}:
        return None  # a loop's thunk contains the thunks of its body, which are counted
    names = ' '.join([inst['op_name']] + [i['op_name'] for i in body])
    suffix = ' bwd' if 'transpose(' in names else ' fwd'
    if 'dot' in opcodes and any(i.get('batched_dot') for i in body):
        # The UNet's dense layers are unbatched dots; attention's q·k and weights·v are batched
        # and carry no op_name of their own (so no fwd/bwd either).
        return 'attention (q·k, weights·v matmuls)'
    if 'UNet' not in names:
        return 'optimizer, loss, other'
    if 'Dropout' in names:
        return 'dropout (threefry bits, mask)' + suffix
    if 'convolution' in opcodes:
        return 'conv 3x3' + suffix
    if 'dot' in opcodes:
        return 'dense (1x1 skip, qkv, proj, temb)' + suffix
    if re.search(r'/norm\d?/|norm_out/', names):
        return 'groupnorm (+ fused swish, bias)' + suffix
    if 'attn' in names:
        return 'attention (softmax, split, transpose)' + suffix
    if 'concatenate' in opcodes:
        return 'concat (skips)' + suffix
    if 'upsample' in names or 'repeat' in names:
        return 'upsample' + suffix
    if 'logistic' in opcodes or 'silu' in names:
        return 'swish' + suffix
    if re.search(r'/(conv\w*|skip|qkv|proj_out|temb_proj|dense\d)/(reduce_sum|add)', names):
        return 'bias add / bias grad' + suffix
    if '/rev' in names:
        return 'kernel flip (rev)' + suffix
    return 'other' + suffix


def thunk_breakdown(trace_dir: str, hlo_text: str) -> dict:
    comps, insts = parse_hlo(hlo_text)
    path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
    events = json.load(gzip.open(path))['traceEvents']
    total, count, wall = Counter(), Counter(), 0.0
    for e in events:
        if e.get('ph') != 'X':
            continue
        if e['name'] == 'ThunkExecutor::Execute (wait for completion)':
            wall += e['dur']
        op = e.get('args', {}).get('hlo_op')
        if not op or e['name'].startswith('end:') or op not in insts:
            continue
        kind = op_kind(insts[op], comps)
        if kind:
            total[kind] += e['dur'] / 1e3
            count[kind] += 1
    thunk_ms = sum(total.values())
    return dict(wall_ms=wall / 1e3, thunk_ms=thunk_ms,
                kinds=[dict(kind=k, ms=ms, share=ms / thunk_ms, thunks=count[k])
                       for k, ms in total.most_common()])


def run_profile(batch: int, seed: int = 0) -> dict:
    """The breakdown of the reference layers ('old') and of the library as it is ('new')."""
    result = {}
    for impl in ('old', 'new'):
        with reference_layers() if impl == 'old' else contextlib.nullcontext():
            fns = unet_functions(batch, seed)
        print(f'\n=== {impl} implementation (compile {fns["compile_s"]:.0f} s)')
        result[impl] = profile_programs(fns, batch)
    return result


def profile_programs(fns, batch: int) -> dict:
    v, x, t, eps, key = fns['variables'], fns['x'], fns['t'], fns['eps'], fns['key']
    programs = {
        'forward': (lambda: fns['forward'](v, x, t), fns['forward_hlo']),
        'train_step': (lambda: fns['train_step'](fns['state'], x, t, eps, key)[1],
                       fns['train_hlo']),
    }
    result = dict(batch=batch, compile_s=fns['compile_s'])
    for name, (call, hlo) in programs.items():
        for _ in range(2):
            jax.block_until_ready(call())
        start = time.perf_counter()
        jax.block_until_ready(call())
        untraced = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                jax.block_until_ready(call())
            br = thunk_breakdown(tmp, hlo)
        br['untraced_ms'] = untraced * 1e3
        result[name] = br
        print(f"\n{name}: {br['untraced_ms']:.0f} ms untraced, traced wall {br['wall_ms']:.0f} ms,"
              f" thunk time {br['thunk_ms']:.0f} ms")
        for row in br['kinds']:
            print(f"  {row['kind']:42s} {row['ms']:8.1f} ms {100 * row['share']:5.1f}%"
                  f"  ({row['thunks']} thunks)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mode', choices=('profile', 'ops', 'unet', 'all'))
    parser.add_argument('--batch', type=int, default=BATCH)
    parser.add_argument('--rounds', type=int, default=7, help='interleaved A/B rounds')
    parser.add_argument('--min_ms', type=float, default=30.0,
                        help='ops: each timing repeats the call for at least this long')
    parser.add_argument('--only', default='', help='ops: only the kinds containing this text')
    parser.add_argument('--json', default='')
    args = parser.parse_args()
    result = dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  flax=flax.__version__, backend=jax.default_backend(),
                  cpu_count=os.cpu_count(), machine=platform.machine())
    print(json.dumps(result))
    if args.mode in ('profile', 'all'):
        result['profile'] = run_profile(args.batch)
    if args.mode in ('ops', 'all'):
        result['ops'] = run_ops(args.rounds, args.min_ms, only=args.only)
    if args.mode in ('unet', 'all'):
        result['unet'] = run_unet(args.batch, args.rounds)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
