"""Samplers driven by the exact ε of data whose optimal denoiser is known in closed form.

Two data sets:
  * Gaussian N(μ, s² I): E[x_0|x_t] is linear in x_t, so every sampler here except 'pc' is a
    linear-Gaussian chain whose output mean and variance follow a scalar recursion (computed in
    float64 below). Monte Carlo moments are checked against the recursion to 5 standard errors
    (catches any sampler bug), and the recursion against the data (the discretisation error of
    the step count, with the tolerance stated at each use).
  * A mixture of isotropic Gaussians (points when τ = 0): E[x_0|x_t] is a softmax-weighted
    average of the components' linear posteriors, and p(y|x_t) is the softmax itself, so the
    classifier of classifier guidance is exact too.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance as gl
from diffusion_jax import respace, samplers, schedules, sharding

T = 1000
BASE = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', T), 'eps', 'fixed_large')
# ᾱ and 1-ᾱ by original timestep, float32 (1-ᾱ from its own float64 table: 1 - 0.9999 in float32
# would lose 3 digits at t = 0).
TABLES = jnp.asarray(np.stack([BASE.alphas_cumprod, BASE.one_minus_alphas_cumprod]), jnp.float32)

MU = np.array([0.3, -0.5, 0.0, 0.7, 0.1, -0.2, 0.4, -0.8])
S2 = 0.04
N = 2048  # × 8 dimensions: the pooled variance has a 1.1% standard error
Z5 = 5.0  # Monte Carlo tolerance in standard errors


def spaced(spec, var='fixed_large'):
    d = BASE if var == 'fixed_large' else BASE.replace(model_var_type=var)
    return d if spec is None else d.respace(respace.space_timesteps(T, spec))


def _abar(tables, t, x):
    shape = t.shape + (1,) * (x.ndim - 1)
    return tables[0][t].reshape(shape), tables[1][t].reshape(shape)


# ----------------------------------------------------------------------------------------------
# Gaussian data
# ----------------------------------------------------------------------------------------------
def gaussian_eps(tables, mu, s2, x_t, t):
    """ε* = (x_t - √ᾱ E[x0|x_t])/√(1-ᾱ) = √(1-ᾱ)(x_t - √ᾱ μ)/(ᾱ s² + 1 - ᾱ) for N(μ, s² I)."""
    abar, one_minus = _abar(tables, t, x_t)
    return jnp.sqrt(one_minus) * (x_t - jnp.sqrt(abar) * mu) / (abar * s2 + one_minus)


def gaussian_model(mu=MU, s2=S2, fn=gaussian_eps):
    return Partial(fn, TABLES, jnp.asarray(mu, jnp.float32), jnp.float32(s2))


def chain_moments(d, kind, eta=0.0, mu=MU, s2=S2, start=None, m=None, v=1.0):
    """Mean [D] and variance of a sampler's output on N(μ, s² I) data with the exact ε.

    Every step is x_{t-1} = A x̂_0 + B x_t + σ z with x̂_0 = μ + k (x_t - √ᾱ μ),
    k = √ᾱ s²/(ᾱ s² + 1-ᾱ): ancestral A, B = the posterior-mean coefficients; DDIM
    A = √ᾱ_{t-1} - c √ᾱ/√(1-ᾱ), B = c/√(1-ᾱ), c = √(1-ᾱ_{t-1}-σ²), σ² = η² β̃.
    """
    start = d.num_timesteps - 1 if start is None else start
    m = np.zeros_like(mu) if m is None else m
    for t in range(start, -1, -1):
        abar, one_minus = d.alphas_cumprod[t], d.one_minus_alphas_cumprod[t]
        k = math.sqrt(abar) * s2 / (abar * s2 + one_minus)
        if kind == 'ddim':
            var = eta**2 * d.posterior_variance[t]
            c = math.sqrt(d.one_minus_alphas_cumprod_prev[t] - var)
            a_coef = math.sqrt(d.alphas_cumprod_prev[t]) - c * math.sqrt(abar / one_minus)
            b_coef = c / math.sqrt(one_minus)
        else:
            a_coef, b_coef = d.posterior_mean_coef1[t], d.posterior_mean_coef2[t]
            var = d.posterior_variance[t] if kind == 'fixed_small' else d.betas[t]
        gain = a_coef * k + b_coef
        m = gain * m + a_coef * mu * (1 - k * math.sqrt(abar))
        v = gain**2 * v + (var if t > 0 else 0.0)
    return m, v


def langevin_moments(d, steps, snr, mu=MU, s2=S2):
    """Output moments of method='langevin' (fixed step ε_t = 2 α_t r² (1-ᾱ_t), exact score
    s = -(x - √ᾱ μ)/(ᾱ s² + 1-ᾱ), levels joined by x/√α_t, Tweedie's x̂_0 at the end)."""
    m, v = np.zeros_like(mu), 1.0
    for t in range(d.num_timesteps - 1, -1, -1):
        abar, one_minus, alpha = d.alphas_cumprod[t], d.one_minus_alphas_cumprod[t], 1 - d.betas[t]
        var_t = abar * s2 + one_minus
        eps = 2 * alpha * snr**2 * one_minus
        for _ in range(steps):
            m = m - eps * (m - math.sqrt(abar) * mu) / var_t
            v = (1 - eps / var_t) ** 2 * v + 2 * eps
        if t > 0:
            m, v = m / math.sqrt(alpha), v / alpha
        else:
            k = math.sqrt(abar) * s2 / var_t
            m, v = mu + k * (m - math.sqrt(abar) * mu), k * k * v
    return m, v


def assert_moments(x, mean, var, extra_var_tol=0.0):
    """Per-dimension means within 5 SE; the variance pooled over the independent dimensions."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    n, dim = x.shape
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), Z5 * math.sqrt(var / n))
    pooled = x.var(0).mean()
    tolerance = Z5 * var * math.sqrt(2 / (n * dim)) + extra_var_tol * var
    assert abs(pooled - var) < tolerance, (pooled, var)


# (spacing, method, variance, η, stated variance tolerance of the *chain* against the data):
# the recursion shows the few-step chains' bias, e.g. DDIM-50's last jump returns x̂_0 of t=20,
# whose variance is below s²; these are properties of the samplers, not of this code.
CONFIGS = [
    (None, 'ancestral', 'fixed_large', 0.0, 0.02),
    (None, 'ancestral', 'fixed_small', 0.0, 0.05),
    ('100', 'ancestral', 'fixed_large', 0.0, 0.15),
    (None, 'ddim', 'fixed_small', 0.0, 0.02),  # DDIM ignores the variance type
    ('ddim50', 'ddim', 'fixed_large', 0.0, 0.25),
    ('ddim50', 'ddim', 'fixed_large', 0.5, 0.30),
]


@pytest.mark.parametrize('spec,method,var,eta,chain_tol', CONFIGS)
def test_samplers_reproduce_gaussian_data(spec, method, var, eta, chain_tol):
    d = spaced(spec, var)
    out = samplers.sample(d, gaussian_model(), jax.random.key(0), (N, MU.size), method=method,
                          eta=eta, clip_denoised=False)
    m, v = chain_moments(d, 'ddim' if method == 'ddim' else var, eta)
    assert_moments(out['samples'], m, v)
    np.testing.assert_allclose(m, MU, atol=0.003)  # x_T ~ N(0, I) stands for N(√ᾱ_T μ, …)
    assert abs(v / S2 - 1) < chain_tol


def learned_variance_eps(tables, mu, s2, v, x_t, t):
    """ε* plus a constant variance output v ∈ [-1, 1] ('learned_range')."""
    eps = gaussian_eps(tables, mu, s2, x_t, t)
    return jnp.concatenate([eps, jnp.full_like(eps, v)], axis=-1)


def test_learned_variance_at_its_ends_equals_the_fixed_variances():
    """learned_range with v = -1 is σ² = β̃ (fixed_small), with v = +1 σ² = β (fixed_large; they
    differ only at t = 0, where no noise is added)."""
    learned = BASE.replace(model_var_type='learned_range', loss_type='hybrid')
    key = jax.random.key(0)
    for v, var in ((-1.0, 'fixed_small'), (1.0, 'fixed_large')):
        model = Partial(learned_variance_eps, TABLES, jnp.asarray(MU, jnp.float32),
                        jnp.float32(S2), jnp.float32(v))
        got = samplers.sample(learned, model, key, (N, MU.size), clip_denoised=False)['samples']
        want = samplers.sample(spaced(None, var), gaussian_model(), key, (N, MU.size),
                               clip_denoised=False)['samples']
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_ddim_guidance_is_the_same_for_eps_x0_and_v_networks():
    """Algorithm 2's ε-shift, applied to a network that predicts x0 or v, means the same step."""
    d = spaced('50')
    x = jax.random.normal(jax.random.key(1), (16, 2))
    t = jnp.arange(16, dtype=jnp.int32) * 3
    guide = samplers.classifier_guidance(Partial(mixture_grad_log_prob, mixture_params(TAU)),
                                         jnp.full((16,), TARGET), 2.0)
    eps = mixture_model(TAU)(x, jnp.asarray(d.timestep_map)[t])
    outputs = {'eps': eps, 'x0': d.predict_x0_from_eps(x, t, eps)}
    outputs['v'] = d.predict_v(outputs['x0'], t, eps)
    want_eps = samplers.guided_model_output(d, eps, x, t, guide)
    steps = {}
    for mean_type, out in outputs.items():
        dm = d.replace(model_mean_type=mean_type)
        guided = samplers.guided_model_output(dm, out, x, t, guide)
        guided_eps = dm.predict_eps_from_x0(x, t, dm.pred_x0_from_output(guided, x, t))
        np.testing.assert_allclose(guided_eps, want_eps, rtol=1e-3, atol=1e-3)
        steps[mean_type] = samplers.ddim_step(dm, out, x, t, jnp.zeros_like(x), guidance=guide,
                                              clip_denoised=False)['sample']
    np.testing.assert_allclose(steps['x0'], steps['eps'], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(steps['v'], steps['eps'], rtol=1e-4, atol=1e-5)


def test_annealed_langevin_and_pc_reproduce_gaussian_data():
    d = spaced('250')
    model = gaussian_model()
    x = samplers.sample(d, model, jax.random.key(1), (N, MU.size), method='langevin',
                        langevin_steps=4, langevin_snr=0.4, clip_denoised=False)['samples']
    m, v = langevin_moments(d, 4, 0.4)
    assert_moments(x, m, v)
    # Annealed Langevin lags behind at small noise, where its steps are tiny next to s² (the
    # recursion: +20% variance here, +9% with 5 steps per level over 1000 levels).
    np.testing.assert_allclose(m, MU, atol=1e-3)
    assert 1.0 < v / S2 < 1.25
    # PC (not linear: its step size depends on the batch's norms) against the data, allowing the
    # 250-step chain's discretisation (ancestral alone: +4.6%, chain recursion).
    x = samplers.sample(d, model, jax.random.key(2), (N, MU.size), method='pc',
                        langevin_steps=1, clip_denoised=False)['samples']
    assert_moments(x, MU, S2, extra_var_tol=0.06)


def test_langevin_corrector_leaves_gaussian_marginal_invariant():
    """From exact samples of q(x_t), Langevin steps with the exact score keep q(x_t).

    The unadjusted step has a known bias on a Gaussian target N(m, V): with step ε the chain's
    stationary variance is V/(1 - ε/(2V)); the SNR rule makes ε = 2 α r² × (the chain's own
    variance), so that factor u solves u (1 - α r² u) = 1. (The fixed step of 'langevin' is
    checked through that sampler's recursion above.)
    """
    t, snr, steps = 300, 0.16, 100
    abar, one_minus = BASE.alphas_cumprod[t], BASE.one_minus_alphas_cumprod[t]
    alpha = 1 - BASE.betas[t]
    var_t = abar * S2 + one_minus
    key0, key1, key2 = jax.random.split(jax.random.key(3), 3)
    x0 = MU + math.sqrt(S2) * jax.random.normal(key0, (N, MU.size))
    x_t = BASE.q_sample(x0, jnp.full((N,), t, jnp.int32), jax.random.normal(key1, x0.shape))
    out = samplers.langevin_correct(BASE, gaussian_model(), key2, x_t, t, n_steps=steps, snr=snr)
    c = alpha * snr**2
    assert_moments(out, math.sqrt(abar) * MU, var_t * (1 - math.sqrt(1 - 4 * c)) / (2 * c))
    # The chain did move: after 100 steps it has forgotten its start.
    corr = np.corrcoef(np.asarray(x_t).ravel(), np.asarray(out).ravel())[0, 1]
    assert corr < 0.2


def test_ddim_eta0_is_deterministic_inverts_and_interpolates():
    d = spaced('ddim250')
    model = gaussian_model()
    half = 256
    x0 = MU + math.sqrt(S2) * jax.random.normal(jax.random.key(7), (2 * half, MU.size))
    codes = samplers.ddim_encode(d, model, x0)
    # The ODE carries N(μ, s²) to (nearly) N(0, I): the codes' moments, no trace of μ left.
    assert_moments(codes, np.zeros(MU.size), 1.0, extra_var_tol=0.03)
    decode = lambda key, x_T: samplers.sample(  # noqa: E731
        d, model, key, x_T.shape, method='ddim', x_T=x_T, clip_denoised=False)['samples']
    rec = decode(jax.random.key(8), codes)
    np.testing.assert_array_equal(decode(jax.random.key(9), codes), rec)  # η = 0: no noise used
    # Each step evaluates ε at its input, not its output: an O(1/K) error, 0.007 mean here
    # (0.0018 with all 1000 steps).
    err = np.abs(np.asarray(rec) - np.asarray(x0))
    assert err.mean() < 0.01 and err.max() < 0.05
    # DDIM interpolation (same encode/decode programs): λ = 0 and 1 give the two images back.
    strip = samplers.interpolate_ddim(d, model, x0[:half], x0[half:], jnp.array([0.0, 1.0]))
    assert strip.shape == (2, half, MU.size)
    np.testing.assert_allclose(strip.reshape(x0.shape), rec, atol=1e-5)


def test_ddim_eta1_matches_ancestral_fixed_small_step_for_step():
    d = spaced(None, 'fixed_small')
    model = gaussian_model()
    key = jax.random.key(9)
    anc = samplers.sample(d, model, key, (N, MU.size), method='ancestral', clip_denoised=False)
    ddim = samplers.sample(d, model, key, (N, MU.size), method='ddim', eta=1.0,
                           clip_denoised=False)
    np.testing.assert_allclose(anc['samples'], ddim['samples'], atol=2e-5)
    # And single steps of a respaced chain on the (nonlinear) mixture, with clipping.
    dr = spaced('50', 'fixed_small')
    mix = mixture_model(tau=0.0)
    x = jax.random.normal(jax.random.key(10), (64, 2))
    noise = jax.random.normal(jax.random.key(11), (64, 2))
    for t_int in (49, 30, 5, 1, 0):
        t = jnp.full((64,), t_int, jnp.int32)
        out = mix(x, jnp.asarray(dr.timestep_map)[t])
        s1 = samplers.ancestral_step(dr, out, x, t, noise)['sample']
        s2 = samplers.ddim_step(dr, out, x, t, noise, eta=1.0)['sample']
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def test_same_xt_samples_are_draws_of_p_x0_given_xt():
    d = spaced('100')
    start = 50
    x_t = jnp.asarray(np.linspace(-1, 1, MU.size)[None], jnp.float32)
    out = samplers.same_xt_samples(d, gaussian_model(), jax.random.key(12), x_t, start, 2048,
                                   clip_denoised=False)
    assert out.shape == (2048, 1, MU.size)
    m, v = chain_moments(d, 'fixed_large', start=start, m=np.asarray(x_t[0], np.float64), v=0.0)
    assert_moments(out[:, 0], m, v)
    # Against the exact posterior p(x_0|x_t) = N(μ + k(x_t - √ᾱ μ), s²(1-ᾱ)/(ᾱ s² + 1-ᾱ)):
    # the 100-step chain's variance is off by ≤ 15% (recursion), its mean by ≤ 0.01.
    abar, one_minus = d.alphas_cumprod[start], d.one_minus_alphas_cumprod[start]
    gain = math.sqrt(abar) * S2 / (abar * S2 + one_minus)
    post_mean = MU + gain * (np.asarray(x_t[0]) - math.sqrt(abar) * MU)
    np.testing.assert_allclose(m, post_mean, atol=0.01)
    assert abs(v / (S2 * one_minus / (abar * S2 + one_minus)) - 1) < 0.15


# ----------------------------------------------------------------------------------------------
# A mixture of Gaussians (points when τ = 0)
# ----------------------------------------------------------------------------------------------
CENTRES = jnp.array([[-0.5, 0.0], [0.5, 0.0], [0.0, 0.6]], jnp.float32)
WEIGHTS = np.array([0.5, 0.3, 0.2])


def _components(tables, centres, tau2, x_t, t):
    """Per-component ε [K, B, D] and log N(x_t; √ᾱ c_k, (ᾱτ² + 1-ᾱ) I) up to a constant [B, K]."""
    abar, one_minus = _abar(tables, t, x_t)
    var = abar * tau2 + one_minus
    diff = x_t[None] - jnp.sqrt(abar)[None] * centres[:, None, :]
    eps = jnp.sqrt(one_minus)[None] * diff / var[None]
    log_lik = -0.5 * jnp.sum(jnp.square(diff), axis=-1).T / var.reshape(-1, 1)
    return eps, log_lik


def mixture_eps(tables, centres, log_weights, tau2, x_t, t):
    eps, log_lik = _components(tables, centres, tau2, x_t, t)
    return jnp.einsum('bk,kbd->bd', jax.nn.softmax(log_lik + log_weights, axis=-1), eps)


def mixture_params(tau):
    return (TABLES, CENTRES, jnp.log(jnp.asarray(WEIGHTS, jnp.float32)), jnp.float32(tau**2))


def mixture_model(tau):
    return Partial(mixture_eps, *mixture_params(tau))


def mixture_apply(params, x_t, t, y=None):
    """A class-conditional "network": ε of component y, of the whole mixture for y = ∅ = 3."""
    eps, log_lik = _components(params[0], params[1], params[3], x_t, t)
    uncond = jnp.einsum('bk,kbd->bd', jax.nn.softmax(log_lik + params[2], axis=-1), eps)
    cond = jnp.take_along_axis(eps, jnp.clip(y, 0, 2)[None, :, None], axis=0)[0]
    return jnp.where((y == len(WEIGHTS))[:, None], uncond, cond)


def mixture_grad_log_prob(params, x_t, t, y):
    """∇_x log p(y | x_t) with p(y|x_t) the mixture's posterior class probability."""
    def total(x):
        _, log_lik = _components(params[0], params[1], params[3], x, t)
        log_post = jax.nn.log_softmax(log_lik + params[2], axis=-1)
        return jnp.take_along_axis(log_post, y[:, None], axis=1).sum()
    return jax.grad(total)(x_t)


def nearest_class(x, tau):
    """The data mixture's most probable component for each point (nearest centre if τ = 0)."""
    sq = np.sum((np.asarray(x)[:, None, :] - np.asarray(CENTRES)[None]) ** 2, axis=-1)
    return np.argmin(sq, axis=1) if tau == 0 else np.argmax(np.log(WEIGHTS) - sq / (2 * tau**2), 1)


@pytest.mark.parametrize('spec,method', [(None, 'ancestral'), ('ddim50', 'ddim')])
def test_mixture_weights_are_reproduced(spec, method):
    n = 3000  # as in the guidance tests, which then reuse the unguided ancestral program
    # (x̂_0 is a convex combination of the points: clipping would change nothing.)
    x = np.asarray(samplers.sample(spaced(spec), mixture_model(0.0), jax.random.key(13), (n, 2),
                                   method=method, clip_denoised=False)['samples'])
    counts = np.bincount(nearest_class(x, 0.0), minlength=3) / n
    se = np.sqrt(WEIGHTS * (1 - WEIGHTS) / n)
    np.testing.assert_array_less(np.abs(counts - WEIGHTS), Z5 * se)
    dist = np.min(np.linalg.norm(x[:, None] - np.asarray(CENTRES)[None], axis=-1), axis=1)
    assert np.median(dist) < 0.01 and np.mean(dist) < 0.03


TAU = 0.25  # overlapping classes, so that guidance has something to do
TARGET = 2


def _exact_class_fractions():
    """P(nearest class = TARGET) under the data and under the class-TARGET component (MC, 4e5)."""
    rng = np.random.default_rng(0)
    n = 400_000
    cond = np.asarray(CENTRES)[TARGET] + TAU * rng.standard_normal((n, 2))
    comp = rng.choice(3, n, p=WEIGHTS)
    data = np.asarray(CENTRES)[comp] + TAU * rng.standard_normal((n, 2))
    return (nearest_class(data, TAU) == TARGET).mean(), (nearest_class(cond, TAU) == TARGET).mean()


@pytest.mark.parametrize('method', ['ddim', 'ancestral'])
def test_classifier_guidance(method):
    n = 3000
    d, model, key = BASE, mixture_model(TAU), jax.random.key(14)
    y = jnp.full((n,), TARGET, jnp.int32)
    grad_fn = Partial(mixture_grad_log_prob, mixture_params(TAU))

    def run(scale):
        guide = None if scale is None else samplers.classifier_guidance(grad_fn, y, scale)
        return np.asarray(samplers.sample(d, model, key, (n, 2), method=method,
                                          clip_denoised=False, guidance=guide)['samples'])

    plain, zero = run(None), run(0.0)
    # Scale 0 adds exact zeros, but the guided program is a different XLA program whose fusions
    # round differently: equal to float32 rounding over the 1000 steps, not bit for bit.
    np.testing.assert_allclose(zero, plain, rtol=0, atol=2e-5)
    frac_data, frac_cond = _exact_class_fractions()
    se = math.sqrt(frac_cond * (1 - frac_cond) / n)
    frac = lambda x: np.mean(nearest_class(x, TAU) == TARGET)  # noqa: E731
    assert abs(frac(plain) - frac_data) < Z5 * math.sqrt(frac_data * (1 - frac_data) / n)
    one = run(1.0)
    if method == 'ddim':
        # DDIM's ε - √(1-ᾱ)∇log p(y|x_t) is exactly -√(1-ᾱ)∇log q(x_t|y): s = 1 samples the class
        # component N(c_y, τ² I) (variance within the 1000-step ODE's 3%).
        assert abs(frac(one) - frac_cond) < Z5 * se
        assert_moments(one, np.asarray(CENTRES)[TARGET], TAU**2, extra_var_tol=0.03)
    else:
        # Algorithm 1 shifts the mean by Σ∇log p, a first-order approximation: close, not exact.
        assert abs(frac(one) - frac_cond) < 0.04
        np.testing.assert_allclose(one.mean(0), np.asarray(CENTRES)[TARGET], atol=0.03)
    assert frac(run(3.0)) > 0.98


def test_classifier_free_guidance():
    n = 2000
    d, key = spaced('100'), jax.random.key(15)
    params = mixture_params(TAU)
    y = jnp.full((n,), TARGET, jnp.int32)
    cond = samplers.sample(d, gl.bind_model(mixture_apply, params, y), key, (n, 2),
                           method='ddim', clip_denoised=False)['samples']
    run = lambda w: samplers.sample(  # noqa: E731
        d, gl.classifier_free_model_fn(mixture_apply, params, y, w, len(WEIGHTS)), key, (n, 2),
        method='ddim', clip_denoised=False)['samples']
    np.testing.assert_array_equal(run(0.0), cond)
    # w > 0 samples p(x|y) p(y|x)^w: further into the class, away from the other centres.
    guided = np.asarray(run(2.0))
    frac = lambda x: np.mean(nearest_class(np.asarray(x), TAU) == TARGET)  # noqa: E731
    assert frac(guided) > frac(cond) + 0.1 and frac(guided) > 0.97
    assert guided.mean(0)[1] > np.asarray(cond).mean(0)[1] + 0.1


# ----------------------------------------------------------------------------------------------
# Progressive output, compilation, sharding, interpolation
# ----------------------------------------------------------------------------------------------
def test_progressive_output():
    d = spaced('ddim10')
    model = mixture_model(0.0)
    key = jax.random.key(16)
    out = samplers.sample(d, model, key, (16, 2), method='ddim', progress_steps=[0, 5, 9])
    assert out['progressive'].shape == (3, 16, 2)
    # In chain order: the last is x̂_0 at t = 0, which is the sample; the first x̂_0 of x_T.
    # (XLA computes x̂_0 for the buffer and for the sample in two fusions: equal to rounding.)
    np.testing.assert_allclose(out['progressive'][-1], out['samples'], rtol=0, atol=1e-6)
    x_T = jax.random.normal(jax.random.split(key)[0], (16, 2))
    t = jnp.full((16,), 9, jnp.int32)
    pred = d.p_mean_variance(model(x_T, jnp.asarray(d.timestep_map)[t]), x_T, t)['pred_x0']
    # (x̂_0 = (x_t - √(1-ᾱ) ε)/√ᾱ with 1/√ᾱ ≈ 60 at t = 9 amplifies float32 rounding.)
    np.testing.assert_allclose(out['progressive'][0], pred, rtol=0, atol=1e-4)
    assert not np.allclose(out['progressive'][1], out['progressive'][2])
    with pytest.raises(ValueError, match='progress_steps'):
        samplers.sample(d, model, key, (16, 2), progress_steps=[10])


def counting_model(mu=MU):
    """The Gaussian model with a fresh function that records each trace (calls happen only while
    jax traces: compiled code does not call back into Python)."""
    traces = []

    def counted_eps(*args):
        traces.append(1)
        return gaussian_eps(*args)

    return (lambda m=mu: gaussian_model(mu=m, fn=counted_eps)), traces


def toy_grad_log_prob(x_t, t, y):
    return (y[:, None] - x_t) * 1e-3 * t[:, None]


def test_one_compile_per_config_and_step_count():
    make, traces = counting_model()
    d = spaced('ddim20')
    shape = (32, MU.size)
    for i, mu in enumerate((MU, -MU, 2 * MU)):  # new parameters and keys: no new trace
        samplers.sample(d, make(mu), jax.random.key(i), shape, method='ddim', eta=0.1 * i)
    # Another schedule with the same step count is also only new data.
    other = dl.GaussianDiffusion(schedules.get_beta_schedule('cosine', T), 'eps', 'fixed_large')
    samplers.sample(other.respace(respace.space_timesteps(T, 'ddim20')), make(),
                    jax.random.key(9), shape, method='ddim')
    assert len(traces) == 1
    # The step count is part of the program: one more trace.
    samplers.sample(spaced('ddim25'), make(), jax.random.key(0), shape, method='ddim')
    assert len(traces) == 2
    # Classifier guidance: new labels and scales are data too.
    make_guided, traces = counting_model()
    for scale in (0.5, 2.0):
        guide = samplers.classifier_guidance(toy_grad_log_prob, jnp.arange(32) % 3, scale)
        samplers.sample(d, make_guided(), jax.random.key(0), shape, guidance=guide)
    assert len(traces) == 1
    # reverse_from compiles once for every start step.
    make_rev, traces = counting_model()
    for start in (19, 7, 0):
        samplers.reverse_from(d, make_rev(), jax.random.key(1), jnp.zeros(shape), start)
    assert len(traces) == 1


def test_sharded_sampling_equals_single_device():
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8
    d = spaced('ddim20')
    model, key = gaussian_model(), jax.random.key(17)
    # PC: the predictor, and a corrector whose step size averages norms over the whole batch.
    single = samplers.sample(d, model, key, (32, MU.size), method='pc')['samples']
    sharded = samplers.sample(d, model, key, (32, MU.size), method='pc', mesh=mesh)['samples']
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    with pytest.raises(ValueError, match='divisible'):
        samplers.sample(d, model, key, (12, MU.size), mesh=mesh)


def test_ddpm_interpolation_and_slerp():
    d = spaced('ddim100')
    model = gaussian_model()
    x_a = MU + math.sqrt(S2) * jax.random.normal(jax.random.key(18), (4, MU.size))
    x_b = MU + math.sqrt(S2) * jax.random.normal(jax.random.key(19), (4, MU.size))
    lambdas = jnp.linspace(0, 1, 5)
    # The λ = 0 row does not depend on the other image, and swapping the images reverses the
    # strip (same q noise for both images, same chain noise for every λ).
    key = jax.random.key(20)
    ddpm = samplers.interpolate_ddpm(d, model, key, x_a, x_b, 50, lambdas)
    assert ddpm.shape == (5, 4, MU.size)
    np.testing.assert_allclose(samplers.interpolate_ddpm(d, model, key, x_a, -x_b, 50, lambdas)[0],
                               ddpm[0], atol=1e-6)
    swapped = samplers.interpolate_ddpm(d, model, key, x_b, x_a, 50, lambdas)
    np.testing.assert_allclose(swapped[::-1], ddpm, atol=1e-5)
    # From a small t the chain stays near its start image.
    # From t = 1 (original step 10: q noise and chain noise of std ≈ 0.047 each) the λ = 0 row
    # ends near its start image, much nearer than the other image (≈ 0.23 away on average).
    near = samplers.interpolate_ddpm(d, model, key, x_a, x_b, 1, lambdas)
    assert np.abs(np.asarray(near[0] - x_a)).mean() < 0.1
    assert np.abs(np.asarray(near[0] - x_a)).mean() < 0.5 * np.abs(np.asarray(x_b - x_a)).mean()
    z = jax.random.normal(key, (2, 3))
    np.testing.assert_allclose(samplers.slerp(z, z, 0.3), z, rtol=1e-5)
    np.testing.assert_allclose(samplers.slerp(z[:1], 2 * z[:1], 0.5), 1.5 * z[:1], rtol=1e-5)
    e0, e1 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    np.testing.assert_allclose(samplers.slerp(e0, e1, 0.5), [[math.sqrt(0.5)] * 2], rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match='method'):
        samplers.sample(BASE, gaussian_model(), jax.random.key(0), (4, MU.size), method='euler')
