"""'ancestral': DDPM's sampler (Ho et al. 2020, Algorithm 2), with classifier guidance as a mean
shift (Dhariwal & Nichol 2021, Algorithm 1).

    x_{t-1} = μ_θ(x_t, t) + s Σ_θ ∇_{x_t} log p_φ(y|x_t) + σ_t z,   z ~ N(0, I), no noise at t = 0,

with the diffusion's variance σ_t² (fixed β_t / β̃_t or learned) and x̂_0 clipped to [-1, 1]
(or dynamically thresholded) when configured. NFE = K.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler


def ancestral_step(diffusion, model_output, x_t, t, noise, *, clip_denoised: bool = True,
                   guidance=None, denoised_fn=None):
    """x_{t-1} = μ_θ(x_t, t) + s Σ_θ ∇ log p_φ(y|x_t) + σ_t z, no noise at t = 0
    (DDPM Algorithm 2; the guidance term is Dhariwal & Nichol's Algorithm 1).

    Shapes: x_t, noise [B, ...]; t [B]. Returns dict(sample, pred_x0), each [B, ...].
    """
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn)
    mean = out['mean']
    if guidance is not None:
        mean = mean + out['variance'] * guidance.scaled_grad(x_t, diffusion.model_time(t))
    nonzero = common.nonzero_mask(t, x_t)
    return dict(sample=mean + nonzero * jnp.exp(0.5 * out['log_variance']) * noise,
                pred_x0=out['pred_x0'])


def chain_step(ctx, state, t, key):
    """The 'ancestral' step of the chain (also the predictor of 'pc')."""
    d, x = ctx.diffusion, state['x']
    out = ancestral_step(d, ctx.model_fn(x, t), x, t,
                         common.noise_like(key, x, ctx.opts.noise_repeat),
                         clip_denoised=ctx.opts.clip_denoised, guidance=ctx.guidance,
                         denoised_fn=common.denoised_fn(ctx.opts))
    return {'x': out['sample']}, out['pred_x0']


register_sampler('ancestral', stochastic=True, reads=('dynamic_threshold',),
                 summary='DDPM Algorithm 2 (Ho et al. 2020)')(chain_step)
