"""Cost of the loss-aware timestep sampler's history update inside a train step: the vectorised
update (diffusion_jax.timestep_sampling.update: stable sort by t, rank within t, one gather and
one scatter) against the previous one, a lax.scan pushing the batch one item at a time.

    python experiments/benchmark_timestep_sampling.py                       # T 1000/4000, B 128/2048
    python experiments/benchmark_timestep_sampling.py --timesteps=1000 --batches=128 --repeats=50

Each variant is jitted alone (state in, state out, as in the train step) and timed over
--repeats calls after a warm-up; both are checked to give identical states first. Prints one
JSON line per (T, B) with microseconds per update.
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from diffusion_jax import timestep_sampling as ts  # noqa: E402


def scan_update(state, t, losses):
    """The update as it was before: one dependent [T, K] update per batch item."""
    k = state.loss_history.shape[1]

    def push(carry, item):
        history, counts = carry
        ti, li = item
        row = jnp.roll(history[ti], -1).at[k - 1].set(li)
        return (history.at[ti].set(row), counts.at[ti].set(jnp.minimum(counts[ti] + 1, k))), None

    (history, counts), _ = jax.lax.scan(push, (state.loss_history, state.counts),
                                        (t.astype(jnp.int32), losses.astype(jnp.float32)))
    return state.replace(loss_history=history, counts=counts)


def _time(fn, state, t, losses, repeats: int) -> float:
    jax.block_until_ready(fn(state, t, losses))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(state, t, losses)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def run(num_t: int, batch: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    state = ts.LossAwareState(
        loss_history=jnp.asarray(rng.gamma(2.0, size=(num_t, ts.HISTORY_PER_TERM)), jnp.float32),
        counts=jnp.full((num_t,), ts.HISTORY_PER_TERM, jnp.int32))
    t = jnp.asarray(rng.integers(0, num_t, batch), jnp.int32)
    losses = jnp.asarray(rng.gamma(2.0, size=batch), jnp.float32)
    before, after = jax.jit(scan_update), jax.jit(ts.update)
    a, b = before(state, t, losses), after(state, t, losses)
    np.testing.assert_array_equal(a.loss_history, b.loss_history)
    np.testing.assert_array_equal(a.counts, b.counts)
    scan_s = _time(before, state, t, losses, repeats)
    vec_s = _time(after, state, t, losses, repeats)
    return dict(timesteps=num_t, batch=batch, scan_us=scan_s * 1e6, vectorised_us=vec_s * 1e6,
                speedup=scan_s / vec_s, device=jax.devices()[0].device_kind,
                jax=jax.__version__)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--timesteps', default='1000,4000')
    parser.add_argument('--batches', default='128,2048')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    for num_t in (int(v) for v in args.timesteps.split(',')):
        for batch in (int(v) for v in args.batches.split(',')):
            print(json.dumps(run(num_t, batch, args.repeats)), flush=True)


if __name__ == '__main__':
    main()
