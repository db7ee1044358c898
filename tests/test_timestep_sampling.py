"""Uniform and loss-aware importance sampling of timesteps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sharding
from diffusion_jax import timestep_sampling as ts


def _warm_state(losses_per_t, history=10):
    state = ts.loss_aware_init(len(losses_per_t), history=history)
    t = jnp.repeat(jnp.arange(len(losses_per_t)), history)
    return ts.update(state, t, jnp.repeat(jnp.asarray(losses_per_t, jnp.float32), history))


def test_uniform_has_unit_weights_and_covers_all_t():
    state = ts.init('uniform', 20)
    t, w = ts.sample(state, jax.random.key(0), 4000)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 19
    np.testing.assert_array_equal(w, 1.0)
    counts = np.bincount(np.asarray(t), minlength=20)
    # Each count ~ Binomial(4000, 1/20): 5 standard deviations.
    assert np.all(np.abs(counts - 200) < 5 * math.sqrt(4000 * 0.05 * 0.95))


def test_loss_aware_is_uniform_until_every_t_is_warm():
    state = ts.loss_aware_init(5)
    state = ts.update(state, jnp.array([0, 1, 2, 3] * 10), jnp.ones(40))
    np.testing.assert_allclose(ts.probabilities(state), 0.2)
    state = ts.update(state, jnp.full((10,), 4), jnp.ones(10) * 3)
    assert not np.allclose(ts.probabilities(state), 0.2)


def test_loss_aware_probabilities_follow_root_mean_square_history():
    losses = np.array([1.0, 2.0, 4.0, 0.5])
    state = _warm_state(losses)
    p = np.asarray(ts.probabilities(state))
    expect = losses / losses.sum() * (1 - ts.UNIFORM_PROB) + ts.UNIFORM_PROB / 4
    np.testing.assert_allclose(p, expect, rtol=1e-6)
    # The history keeps only the last 10 values, in arrival order.
    state = ts.update(state, jnp.array([2] * 3), jnp.array([7.0, 8.0, 9.0]))
    np.testing.assert_allclose(state.loss_history[2], [4.0] * 7 + [7.0, 8.0, 9.0])
    assert int(state.counts[2]) == 10


def test_importance_weighted_estimate_is_unbiased():
    """E_{t~p}[w(t) L(t)] = (1/T) Σ_t L(t): exactly, and by Monte Carlo."""
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, size=50)
    state = _warm_state(losses)
    p = np.asarray(ts.probabilities(state), np.float64)
    np.testing.assert_allclose(np.sum(p * losses / (50 * p)), losses.mean(), rtol=1e-6)
    n = 200_000
    t, w = ts.sample(state, jax.random.key(1), n)
    est = np.asarray(w, np.float64) * losses[np.asarray(t)]
    assert abs(est.mean() - losses.mean()) < 5 * est.std() / math.sqrt(n)
    # And it has lower variance than uniform sampling (why it exists).
    assert est.var() < losses.var()


def test_update_inside_sharded_jit_agrees_with_host():
    mesh = sharding.make_mesh()
    state = ts.loss_aware_init(12)
    t = jnp.arange(16, dtype=jnp.int32) % 12
    losses = jnp.linspace(0.1, 1.6, 16)
    expect = ts.update(state, t, losses)
    t_s, l_s = sharding.shard_batch((np.asarray(t), np.asarray(losses)), mesh)
    state_r = sharding.replicate(state, mesh)
    got = jax.jit(ts.update)(state_r, t_s, l_s)
    np.testing.assert_array_equal(got.loss_history, expect.loss_history)
    np.testing.assert_array_equal(got.counts, expect.counts)


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="'uniform' or 'loss_aware'"):
        ts.init('importance', 10)


def _reference_update(history, counts, t, losses):
    """The definition, one item at a time in batch order (plain numpy)."""
    history, counts = np.array(history), np.array(counts)
    k = history.shape[1]
    for ti, li in zip(np.asarray(t), np.asarray(losses, np.float32)):
        history[ti] = np.append(history[ti][1:], li)
        counts[ti] = min(counts[ti] + 1, k)
    return history, counts


def _scan_update(state, t, losses):
    """The previous implementation (a scan over the batch), kept as a second reference."""
    k = state.loss_history.shape[1]

    def push(carry, item):
        history, counts = carry
        ti, li = item
        row = jnp.roll(history[ti], -1).at[k - 1].set(li)
        return (history.at[ti].set(row), counts.at[ti].set(jnp.minimum(counts[ti] + 1, k))), None

    (history, counts), _ = jax.lax.scan(push, (state.loss_history, state.counts),
                                        (t, losses.astype(jnp.float32)))
    return history, counts


@pytest.mark.parametrize('num_t,history,batch', [(7, 3, 40), (50, 10, 64), (1000, 10, 128)])
def test_vectorised_update_equals_one_item_at_a_time(num_t, history, batch):
    """Random batches with repeats (more repeats of a t than the history holds, for small T),
    from a random partly filled state, several updates in a row."""
    rng = np.random.default_rng(num_t)
    state = ts.LossAwareState(
        loss_history=jnp.asarray(rng.gamma(2.0, size=(num_t, history)), jnp.float32),
        counts=jnp.asarray(rng.integers(0, history + 1, num_t), jnp.int32))
    ref_h, ref_c = np.asarray(state.loss_history), np.asarray(state.counts)
    update = jax.jit(ts.update)
    for _ in range(3):
        t = rng.integers(0, num_t, batch).astype(np.int32)
        losses = rng.gamma(2.0, size=batch).astype(np.float32)
        scan_h, scan_c = _scan_update(state, jnp.asarray(t), jnp.asarray(losses))
        state = update(state, jnp.asarray(t), jnp.asarray(losses))
        ref_h, ref_c = _reference_update(ref_h, ref_c, t, losses)
        np.testing.assert_array_equal(state.loss_history, ref_h)
        np.testing.assert_array_equal(state.counts, ref_c)
        np.testing.assert_array_equal(scan_h, ref_h)
        np.testing.assert_array_equal(scan_c, ref_c)
