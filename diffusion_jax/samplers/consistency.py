"""'consistency': multistep consistency sampling (Song et al. 2023, Algorithm 1) over the steps
of a (respaced) chain, for a student distilled by diffusion_jax.distillation.

At each kept level t (σ̃_t = √(1/ᾱ_t - 1), y = x_t/√ᾱ_t) the student's consistency function
    f(y, σ̃_t) = c_skip(σ̃_t) y + (1 - c_skip(σ̃_t)) x̂_θ(x_t, t)
is the sample; unless t is the last step it is re-noised to the next kept level:
    x_{t-1} = √ᾱ_{t-1} (f + √(σ̃_{t-1}² - σ_min²) z).
The levels are the chain's: `num_steps='trailing1'` is one network call at the last timestep,
'trailing2' and 'trailing4' the 2- and 4-step samplers. NFE K.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax import distillation
from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler


def check_options(method: str, consistency) -> tuple[float, ...]:
    """The static (σ_min, σ_data) of Options: required for 'consistency', refused otherwise."""
    if method != 'consistency':
        if consistency:
            raise ValueError(f"consistency=(σ_min, σ_data) applies to method='consistency', not "
                             f'{method!r}.')
        return ()
    if consistency is None or len(tuple(consistency)) != 2:
        raise ValueError("sampling.method='consistency' needs consistency=(sigma_min, "
                         'sigma_data), the parametrisation the student was distilled with '
                         '(its config.distill section).')
    sigma_min, sigma_data = (float(v) for v in consistency)
    if not (sigma_min >= 0 and sigma_data > 0):
        raise ValueError(f'consistency=({sigma_min}, {sigma_data}): σ_min must be >= 0 and '
                         'σ_data > 0.')
    return (sigma_min, sigma_data)


def consistency_fn(diffusion, x0, x, t, sigma_min, sigma_data):
    """f(y, σ̃_t) [B, ...] of x_t [B, ...] at respaced step t [B] from the student's x̂_0."""
    sigma = common.coef(diffusion, 'sqrt_recipm1_alphas_cumprod', t, x)
    y = x * common.coef(diffusion, 'sqrt_recip_alphas_cumprod', t, x)
    skip = distillation.c_skip(sigma, sigma_min, sigma_data)
    return skip * y + (1.0 - skip) * x0


@register_sampler('consistency', stochastic=True,
                  summary='multistep consistency sampling (Song et al. 2023, Algorithm 1)')
def chain_step(ctx, state, t, key):
    d, x = ctx.diffusion, state['x']
    sigma_min, sigma_data = ctx.opts.consistency
    f = consistency_fn(d, common.predict_x0(ctx, x, t), x, t, sigma_min, sigma_data)
    sqrt_prev = common.coef(d, 'sqrt_alphas_cumprod_prev', t, x)
    sigma_prev_sq = common.coef(d, 'one_minus_alphas_cumprod_prev', t, x) / sqrt_prev**2
    noise = common.noise_like(key, x, ctx.opts.noise_repeat)
    renoised = sqrt_prev * (f + jnp.sqrt(jnp.maximum(sigma_prev_sq - sigma_min**2, 0.0)) * noise)
    nonzero = common.nonzero_mask(t, x)
    return {'x': nonzero * renoised + (1.0 - nonzero) * f}, f
