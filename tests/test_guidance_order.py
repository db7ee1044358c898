"""One guidance order (sampling.ddim_guidance) honoured by every method that makes x̂_0 from the
network, each method's reference order the default ('auto'): DPM-Solver++'s reference code and
diffusers' multistep schedulers guide the network output and threshold the x̂_0 made from it
('eps_shift'); guided-diffusion clips x̂_0, then shifts ε and leaves the guided x̂_0 unclipped
('condition_score').

A classifier whose gradient is a constant 10 pushes the guided x̂_0 far above 1 at high noise
(x̂_0 + s √(1-ᾱ)/√ᾱ · 10), so with clipping on the two orders are told apart by whether any x̂_0
the chain visits (progress_steps='all') leaves [-1, 1].
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import respace, samplers, schedules

T = 1000
D = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', T), 'eps', 'fixed_large').respace(
    respace.space_timesteps(T, 'ddim10'))
TABLES = jnp.asarray(np.stack([D.alphas_cumprod, D.one_minus_alphas_cumprod]), jnp.float32)
MU = np.array([0.3, -0.5, 0.0, 0.7], np.float32)
METHODS = ('ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc', 'heun')
REFERENCE = {'ddim': 'condition_score', 'heun': 'condition_score', 'dpmpp_2m': 'eps_shift',
             'dpmpp_3m': 'eps_shift', 'unipc': 'eps_shift'}


def gaussian_eps(mu, x_t, t):
    """ε* of N(μ, 0.04 I) data at original timestep t (the respaced chain's table by index)."""
    full = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', T), 'eps', 'fixed_large')
    abar = jnp.asarray(full.alphas_cumprod, jnp.float32)[t][:, None]
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * 0.04 + 1 - abar)


def constant_grad(x_t, t, y):  # pylint: disable=unused-argument
    return jnp.full_like(x_t, 10.0)


def _x0_path(method, order):
    guide = samplers.classifier_guidance(constant_grad, jnp.zeros(16, jnp.int32), 1.0)
    kwargs = {} if order is None else {'ddim_guidance': order}
    out = samplers.sample(D, Partial(gaussian_eps, jnp.asarray(MU)), jax.random.key(0),
                          (16, MU.size), method=method, guidance=guide, clip_denoised=True,
                          progress_steps='all', **kwargs)
    return np.asarray(out['progressive'])


@pytest.mark.parametrize('method', METHODS)
def test_every_method_honours_the_guidance_order_and_defaults_to_its_reference(method):
    shifted, conditioned = _x0_path(method, 'eps_shift'), _x0_path(method, 'condition_score')
    assert np.isfinite(shifted).all() and np.isfinite(conditioned).all()
    assert np.abs(shifted).max() <= 1.0  # guided, then clipped
    assert np.abs(conditioned).max() > 1.5  # clipped, then guided (unclipped)
    default = _x0_path(method, None)
    np.testing.assert_array_equal(default, shifted if REFERENCE[method] == 'eps_shift'
                                  else conditioned)


def test_an_unknown_order_is_refused_in_one_line():
    with pytest.raises(ValueError, match="sampling.ddim_guidance='both' is not valid"):
        _x0_path('dpmpp_2m', 'both')
