"""Respaced schedules: step sets, marginals preserved, identity when all steps are kept."""
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import respace, schedules


def test_space_timesteps_forms():
    assert respace.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
    assert respace.space_timesteps(1000, 'ddim1000') == list(range(1000))
    assert respace.space_timesteps(300, '10,15,20') == sorted(
        set(round(i * 99 / 9) for i in range(10)) | set(100 + round(i * 99 / 14) for i in range(15))
        | set(200 + round(i * 99 / 19) for i in range(20)))
    assert len(respace.space_timesteps(300, '10,15,20')) == 45
    steps = respace.space_timesteps(1000, 25)
    assert len(steps) == 25 and steps[0] == 0 and steps[-1] == 999


@pytest.mark.parametrize('bad', ['ddimx', '10,abc', '', '2000', 'ddim0'])
def test_space_timesteps_errors(bad):
    with pytest.raises(ValueError, match='section_counts|ddim|step count'):
        respace.space_timesteps(1000, bad)


def test_respacing_all_steps_reproduces_the_original_exactly():
    for name in ('linear', 'cosine'):
        d = dl.GaussianDiffusion(schedules.get_beta_schedule(name, 1000), 'eps', 'fixed_large', 'mse')
        r = d.respace(range(1000))
        for field in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_mean_coef1',
                      'posterior_log_variance_clipped', 'timestep_map'):
            np.testing.assert_array_equal(getattr(r, field), getattr(d, field), err_msg=field)


def test_respacing_keeps_marginals_and_maps_timesteps():
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('cosine', 4000), 'v', 'learned_range',
                             'hybrid')
    kept = respace.space_timesteps(4000, '10,20,30')
    r = d.respace(kept)
    assert r.num_timesteps == len(kept) and r.model_var_type == 'learned_range'
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-9)
    np.testing.assert_array_equal(r.timestep_map, kept)
    # Respacing a respaced diffusion composes the maps.
    rr = r.respace([0, 5, 59])
    np.testing.assert_array_equal(rr.timestep_map, np.asarray(kept)[[0, 5, 59]])
    # β' = 1 - ᾱ_t/ᾱ_s and back through ∏(1 - β') loses a few digits where ᾱ ~ 1e-10.
    np.testing.assert_allclose(rr.alphas_cumprod, d.alphas_cumprod[np.asarray(kept)[[0, 5, 59]]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match='use_timesteps'):
        d.respace([4000])
