"""Bits/dim estimators: the sampled estimate is an unbiased estimate of the full bound."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import schedules, sharding
from diffusion_jax.evaluation import likelihood


def _gaussian_model(d, mu, s2):
    abar_all = jnp.asarray(d.alphas_cumprod, jnp.float32)

    def eps_fn(x_t, t):
        abar = abar_all[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s2 + 1 - abar)
    return eps_fn


def test_sampled_estimate_matches_full_bound_and_accumulator():
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 200), 'eps', 'fixed_large', 'mse')
    mu, sigma = -0.2, 0.25
    rng = np.random.default_rng(0)
    x0 = np.clip(np.round((mu + sigma * rng.standard_normal((64, 2, 2, 2)) + 1) * 127.5), 0, 255) / 127.5 - 1
    model_fn = _gaussian_model(d, mu, sigma**2)
    mesh = sharding.make_mesh()
    x0_sharded = sharding.shard_batch(x0.astype(np.float32), mesh)
    full = jax.jit(lambda x, k: likelihood.full_bpd(d, model_fn, x, k))(x0_sharded, jax.random.key(1))
    np.testing.assert_allclose(full['total'], full['prior'] + full['decoder'] + full['kl_sum'], rtol=1e-5)
    sampled = jax.jit(lambda x, k: likelihood.sampled_bpd(d, model_fn, x, k, 16))(x0_sharded, jax.random.key(2))
    acc_full, acc_s = likelihood.BpdAccumulator(), likelihood.BpdAccumulator()
    for lo in (0, 32):
        acc_full.add({k: v[lo:lo + 32] for k, v in full.items()})
        acc_s.add({'total': sampled['total'][lo:lo + 32]})
    assert acc_full.count == 64
    assert acc_full.mean('total') == np.mean(np.asarray(full['total'], np.float64))
    diff = np.asarray(sampled['total'], np.float64) - np.asarray(full['total'], np.float64)
    # Paired on the same images: the MC error of the sampled estimate, 5 standard errors.
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(diff.size) + 1e-6
    summary = acc_s.summary()
    assert summary['num_images'] == 64 and summary['total_bpd_stderr'] > 0


def test_importance_sampled_estimate_is_unbiased_and_tighter():
    """With p(t) ∝ √E[L_t²] from a pilot, (1/K) Σ L_t/p(t) still estimates Σ_t L_t, with less
    spread than uniform t on the same images."""
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 200), 'eps', 'fixed_large', 'mse')
    mu, sigma = 0.3, 0.2
    rng = np.random.default_rng(1)
    x0 = np.clip(np.round((mu + sigma * rng.standard_normal((96, 2, 2, 1)) + 1) * 127.5), 0, 255) / 127.5 - 1
    x0 = jnp.asarray(x0, jnp.float32)
    model_fn = _gaussian_model(d, mu, sigma**2)
    full = jax.jit(lambda x, k: likelihood.full_bpd(d, model_fn, x, k))(x0, jax.random.key(3))
    probs = likelihood.importance_probs(full['vb'][:32])
    assert probs.shape == (200,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    est = jax.jit(lambda x, k, p: likelihood.sampled_bpd(d, model_fn, x, k, 8, probs=p)['total'])
    imp = np.asarray(est(x0, jax.random.key(4), probs), np.float64)
    uni = np.asarray(est(x0, jax.random.key(4), jnp.full((200,), 1 / 200)), np.float64)
    diff = imp - np.asarray(full['total'], np.float64)
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(diff.size)
    assert diff.std() < (uni - np.asarray(full['total'], np.float64)).std()
