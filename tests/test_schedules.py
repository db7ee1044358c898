"""Beta schedules: endpoints, closed forms, ranges, errors."""
import math

import numpy as np
import pytest

from diffusion_jax import schedules


@pytest.mark.parametrize('name', schedules.SCHEDULE_NAMES)
@pytest.mark.parametrize('num_timesteps', [100, 1000, 4000])
def test_every_schedule_is_monotone_and_in_unit_interval(name, num_timesteps):
    betas = schedules.get_beta_schedule(name, num_timesteps)
    assert betas.shape == (num_timesteps,) and betas.dtype == np.float64
    assert np.all(betas > 0) and np.all(betas <= 1)
    assert np.all(np.diff(betas) >= -1e-15)


def test_linear_matches_ho_et_al_and_scales_with_T():
    betas = schedules.get_beta_schedule('linear', 1000)
    assert betas[0] == pytest.approx(1e-4, abs=0) and betas[-1] == pytest.approx(0.02, abs=0)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # Nichol & Dhariwal: endpoints scale by 1000/T.
    b4000 = schedules.get_beta_schedule('linear', 4000)
    assert b4000[0] == pytest.approx(0.25e-4) and b4000[-1] == pytest.approx(0.005)
    # ᾱ_T of the DDPM schedule is ≈ 4.0e-5 (so x_T is nearly pure noise).
    assert np.prod(1 - betas) == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_alphas_cumprod_closed_form():
    T, s = 1000, 0.008
    betas = schedules.get_beta_schedule('cosine', T)
    abar = np.cumprod(1 - betas)
    t = np.arange(1, T + 1)
    closed = np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / np.cos(s / (1 + s) * math.pi / 2) ** 2
    unclipped = betas < 0.999
    # Until the first clipped β, ∏(1-β) is exactly the cosine formula.
    first_clip = np.argmin(unclipped) if not unclipped.all() else T
    np.testing.assert_allclose(abar[:first_clip], closed[:first_clip], rtol=1e-9, atol=1e-15)
    assert betas.max() == pytest.approx(0.999)


def test_quadratic_sigmoid_const_jsd_closed_forms():
    T = 50
    q = schedules.get_beta_schedule('quadratic', T, beta_start=1e-4, beta_end=0.02)
    np.testing.assert_allclose(np.sqrt(q), np.linspace(0.01, math.sqrt(0.02), T), rtol=1e-12)
    s = schedules.get_beta_schedule('sigmoid', T, beta_start=1e-4, beta_end=0.02)
    x = np.linspace(-6, 6, T)
    np.testing.assert_allclose(s, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_array_equal(schedules.get_beta_schedule('const', T, beta_end=0.02), 0.02)
    j = schedules.get_beta_schedule('jsd', T)
    np.testing.assert_allclose(j, 1.0 / (T - np.arange(T)), rtol=1e-12)
    assert j[-1] == 1.0


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match='linear, cosine, quadratic, sigmoid, const, jsd'):
        schedules.get_beta_schedule('cosnie', 1000)


@pytest.mark.parametrize('kwargs,match', [
    (dict(beta_start=0.0), 'beta_start'),
    (dict(beta_end=1.5), 'beta_end'),
    (dict(beta_start=0.1, beta_end=0.01), 'must not decrease'),
    (dict(bogus=1), 'Invalid options'),
])
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_beta_schedule('linear', 1000, **kwargs)


def test_invalid_num_timesteps():
    with pytest.raises(ValueError, match='num_timesteps'):
        schedules.get_beta_schedule('linear', 0)


def test_small_T_with_scaled_default_endpoints_is_refused():
    # 0.02 · 1000/20 = 1: a β of 1 destroys the signal in one step and makes sampling divide by 0.
    with pytest.raises(ValueError, match='pass beta_start/beta_end explicitly'):
        schedules.get_beta_schedule('linear', 20)
    assert schedules.get_beta_schedule('linear', 20, beta_end=0.3)[-1] == pytest.approx(0.3)


@pytest.mark.parametrize('name,T', [('linear', 1000), ('cosine', 1000), ('linear', 50)])
def test_rescale_zero_terminal_snr_matches_its_definition(name, T):
    """Lin et al. 2023, Alg. 1: √ᾱ' = (√ᾱ - √ᾱ_T)·√ᾱ_1/(√ᾱ_1 - √ᾱ_T): ᾱ'_T = 0 exactly, √ᾱ_1
    unchanged, √ᾱ' an affine function of √ᾱ."""
    betas = (schedules.get_beta_schedule(name, T) if T == 1000
             else schedules.get_beta_schedule(name, T, beta_start=1e-3, beta_end=0.2))
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    assert rescaled.shape == (T,) and np.all(rescaled > 0) and np.all(rescaled <= 1)
    assert rescaled[-1] == 1.0 and rescaled[0] == betas[0]
    abar_new = np.cumprod(1 - rescaled)
    assert abar_new[-1] == 0.0
    s, s_new = np.sqrt(np.cumprod(1 - betas)), np.sqrt(abar_new)
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])
    np.testing.assert_allclose(s_new[:-1], expected[:-1], rtol=1e-9, atol=1e-12)
    slope, intercept = np.polyfit(s, s_new, 1)
    np.testing.assert_allclose(slope * s + intercept, s_new, atol=1e-9)


def test_zero_terminal_snr_refuses_eps_and_gives_a_finite_bound_for_v():
    import jax
    import jax.numpy as jnp
    import ml_collections
    from diffusion_jax import diffusion as dl
    config = ml_collections.ConfigDict(dict(
        beta_schedule='linear', num_timesteps=50, beta_start=1e-3, beta_end=0.2,
        model_mean_type='eps', model_var_type='fixed_large', loss_type='mse',
        rescale_zero_terminal_snr=True))
    with pytest.raises(ValueError, match="rescale_zero_terminal_snr=True with diffusion.model_mean"
                                         "_type='eps'.*use model_mean_type='v'"):
        dl.create_diffusion(config)
    config.model_mean_type = 'v'
    d = dl.create_diffusion(config)
    assert d.alphas_cumprod[-1] == 0.0 and d.betas[-1] == 1.0
    # The exact v of Gaussian data N(μ, s²): v = √ᾱ ε - √(1-ᾱ) x̂0 with the posterior mean x̂0.
    mu, s2 = 0.1, 0.09
    abar_all = jnp.asarray(d.alphas_cumprod, jnp.float32)

    def v_fn(x_t, t):
        abar = abar_all[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        var = abar * s2 + 1 - abar
        x0_hat = mu + jnp.sqrt(abar) * s2 * (x_t - jnp.sqrt(abar) * mu) / var
        eps = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / var
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0_hat
    x0 = jnp.clip(jnp.round((mu + 0.3 * jax.random.normal(jax.random.key(0), (8, 2, 2, 1)) + 1)
                            * 127.5), 0, 255) / 127.5 - 1
    out = jax.jit(lambda x: d.calc_bpd_loop(v_fn, x, jax.random.key(1)))(x0)
    for name, value in out.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    np.testing.assert_array_equal(out['prior_bpd'], 0.0)  # q(x_T|x_0) = N(0, I) exactly
    # At t = T-1, x_T holds no signal: x̂0 = -v = E[x0] = μ, and the KL term is finite.
    assert float(out['xstart_mse'][:, -1].mean()) == pytest.approx(
        float(jnp.mean(jnp.square(x0 - mu))), rel=1e-4)


def test_scaled_linear_equals_diffusers_stable_diffusion_betas():
    """Stable Diffusion's schedule: diffusers' DDPMScheduler(beta_schedule='scaled_linear',
    0.00085, 0.012) at T = 1000 (which computes in float32: rounding-level agreement), and
    √β is exactly linear in t."""
    import diffusers
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule='scaled_linear').betas.double().numpy()
    betas = schedules.get_beta_schedule('scaled_linear', 1000)
    np.testing.assert_allclose(betas, ref, rtol=2e-6)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1] == pytest.approx(0.012, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(betas), 2), 0.0, atol=1e-15)
    explicit = schedules.get_beta_schedule('scaled_linear', 500, beta_start=1e-3, beta_end=2e-2)
    np.testing.assert_allclose(explicit, np.linspace(1e-3**0.5, 2e-2**0.5, 500) ** 2)
    # Other T: the endpoints scale by 1000/T, as the linear schedule's do.
    np.testing.assert_allclose(schedules.get_beta_schedule('scaled_linear', 500)[[0, -1]],
                               [0.0017, 0.024], rtol=1e-12)
