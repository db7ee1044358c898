"""Likelihoods equal to improved-diffusion's: the discretized decoder and calc_bpd_loop against a
float64 NumPy transcription of the reference formulas (Ho et al. 2020 Sec. 3.3; Nichol & Dhariwal
2021 eq. 13-15 and their released gaussian_diffusion.py equations), written here.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as diffusion_lib

pytestmark = pytest.mark.usefixtures('fast_compiles')


# --- float64 reference formulas ------------------------------------------------------------------

def ref_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_decoder_log_likelihood(x, means, log_scales):
    """The reference discretized Gaussian log-likelihood, literally, in float64."""
    x, means, log_scales = (np.asarray(a, np.float64) for a in (x, means, log_scales))
    centered = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = ref_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = ref_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(x < -0.999, log_cdf_plus,
                    np.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def old_float32_decoder_log_likelihood(x, means, log_scales):
    """The previous implementation (the reference formula in float32), for the tail comparison."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf = lambda z: 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1 / 255)), cdf(inv_stdv * (centered - 1 / 255))
    return jnp.where(x < -0.999, jnp.log(jnp.maximum(cdf_plus, 1e-12)),
                     jnp.where(x > 0.999, jnp.log(jnp.maximum(1 - cdf_min, 1e-12)),
                               jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))))


# --- the decoder ----------------------------------------------------------------------------------

def _grid():
    """Every pixel level against means and scales, in both tails and the middle."""
    levels = np.arange(256) / 127.5 - 1.0
    means = np.linspace(-1.2, 1.2, 37)
    log_scales = np.log(np.array([2e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]))
    x, m, s = np.meshgrid(levels, means, log_scales, indexing='ij')
    return x.ravel(), m.ravel(), s.ravel()


def test_decoder_agrees_with_float64_reference_in_both_tails():
    x, m, s = _grid()
    ref = ref_decoder_log_likelihood(x, m, s)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    ours = np.asarray(jax.jit(diffusion_lib.discretized_gaussian_log_likelihood)(
        f32(x), f32(m), f32(s)), np.float64)
    # Where the float64 formula is itself exact to ~1e-7 (bin probability > 1e-9) and above the
    # shared 1e-12 floor. float32 carries ~1e-7 relative error in the sinusoid argument u, i.e.
    # ~2u·1e-7 nats in the far tail (u <= ~25 here).
    valid = ref > np.log(1e-9)
    assert valid.sum() > 20_000 and (ref[valid] < -12).sum() > 2000  # tails are tested
    err = np.abs(ours[valid] - ref[valid])
    assert err.max() < 1e-4, err.max()  # measured: 4.8e-5 nats at -20 nats
    assert np.all(err <= 1e-5 * np.abs(ref[valid]) + 2e-5), (err / (np.abs(ref[valid]))).max()
    # Below 1e-9 both sit between their shared floor and the true value: never above the
    # reference by more than float noise, and never below the floor.
    assert np.all(ours >= np.log(1e-12) - 1e-5)
    # The old float32 evaluation loses the tails (it floored bins 5-6σ out at -27.6 nats).
    old = np.asarray(jax.jit(old_float32_decoder_log_likelihood)(f32(x), f32(m), f32(s)))
    assert np.abs(old[valid] - ref[valid]).max() > 1.0


def test_decoder_five_sigma_example():
    """A pixel ~5σ from the mean: the reference value, ours equal to it, the old one floored."""
    sigma = 0.05
    x = np.float32(128 / 127.5 - 1.0)
    mean = np.float32(x - 5.0 * sigma)
    args = (jnp.float32(x)[None], jnp.float32(mean)[None], jnp.float32(np.log(sigma))[None])
    ours = float(diffusion_lib.discretized_gaussian_log_likelihood(*args)[0])
    ref = float(ref_decoder_log_likelihood(x, mean, np.log(sigma)))
    assert -18 < ref < -15  # -16.77 (the exact Φ gives -15.25: the approximation's own error)
    assert abs(ours - ref) < 1e-4 * abs(ref)
    old = float(old_float32_decoder_log_likelihood(*args)[0])
    assert old < -27  # floored at log 1e-12


def test_decoder_gradients_are_finite_everywhere():
    x, m, s = (jnp.asarray(a, jnp.float32) for a in _grid())
    grad = jax.jit(jax.grad(lambda mu, ls: diffusion_lib.discretized_gaussian_log_likelihood(
        x, mu, ls).sum(), argnums=(0, 1)))(m, s)
    assert all(np.all(np.isfinite(g)) for g in grad)


# --- calc_bpd_loop ------------------------------------------------------------------------------

T = 20
SHAPE = (2, 4, 4, 3)


def ref_cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    alpha_bar = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                         max_beta) for i in range(num_timesteps)])


def model_output(x_t, t, xp):
    """A fixed, deliberately poor denoiser: far-off x̂_0 at t = 0 put pixels in the tails."""
    t = xp.reshape(t, (-1,) + (1,) * (x_t.ndim - 1))
    eps = 3.0 * xp.tanh(2.0 * x_t + 0.1 * t) + 0.5
    v = xp.tanh(0.7 * x_t - 0.05 * t)
    return xp.concatenate([eps, v], axis=-1)


def ref_normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def ref_calc_bpd_loop(x0, noises, betas):
    """improved-diffusion's calc_bpd_loop for eps prediction, learned_range, clip_denoised."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    flat = lambda a: a.reshape(a.shape[0], -1).mean(1)
    vb = np.zeros((x0.shape[0], len(betas)))
    for t in reversed(range(len(betas))):
        x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noises[t]
        out = model_output(x_t, np.full(x0.shape[0], float(t)), np)
        eps, v = out[..., :3], out[..., 3:]
        frac = (v + 1) / 2
        log_var = frac * np.log(betas[t]) + (1 - frac) * post_logvar[t]
        pred_x0 = np.clip(np.sqrt(1 / abar[t]) * x_t - np.sqrt(1 / abar[t] - 1) * eps, -1, 1)
        mean = coef1[t] * pred_x0 + coef2[t] * x_t
        if t == 0:
            vb[:, t] = -flat(ref_decoder_log_likelihood(x0, mean, 0.5 * log_var)) / np.log(2)
        else:
            true_mean = coef1[t] * x0 + coef2[t] * x_t
            vb[:, t] = flat(ref_normal_kl(true_mean, post_logvar[t], mean, log_var)) / np.log(2)
    prior = flat(ref_normal_kl(np.sqrt(abar[-1]) * x0, np.log(1 - abar[-1]), 0.0, 0.0)) / np.log(2)
    return vb.sum(1) + prior, vb


def test_calc_bpd_loop_equals_improved_diffusion_formulas():
    betas = ref_cosine_betas(T)
    diffusion = diffusion_lib.GaussianDiffusion(betas, 'eps', 'learned_range', 'hybrid')
    rng = np.random.default_rng(0)
    x0 = (rng.integers(0, 256, SHAPE) / 127.5 - 1.0).astype(np.float32)
    key = jax.random.key(7)
    # calc_bpd_loop draws the noise of step t from fold_in(key, t): the same noise for both.
    noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, t), SHAPE))
                       for t in range(T)]).astype(np.float64)
    fn = lambda x_t, t: model_output(x_t, t.astype(jnp.float32), jnp)
    ours = jax.jit(lambda x: diffusion.calc_bpd_loop(fn, x, key))(jnp.asarray(x0))
    ref_total, ref_vb = ref_calc_bpd_loop(x0.astype(np.float64), noises, betas)
    assert ref_vb[:, 0].max() > 1.0  # the decoder term is large: pixels in the tails
    np.testing.assert_allclose(np.asarray(ours['vb']), ref_vb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours['total_bpd']), ref_total, rtol=0, atol=1e-4)
