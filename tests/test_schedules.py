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
