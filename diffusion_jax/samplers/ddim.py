"""'ddim': Song et al. 2021, eq. 12, over the respaced steps.

    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ_t²) ε̂ + σ_t z,   σ_t = η √β̃_t (their eq. 16),

ε̂ recomputed from the (clipped) x̂_0. η = 0 is deterministic: the Euler method for the
probability-flow ODE in the variables (σ = √((1-ᾱ)/ᾱ), x/√ᾱ), order 1; η = 1 the ancestral
sampler with variance β̃_t. NFE = K. Classifier guidance: `common` (condition_score by default).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler


def ddim_step(diffusion, model_output, x_t, t, noise, *, eta=0.0, clip_denoised: bool = True,
              guidance=None, ddim_guidance: str = 'condition_score', denoised_fn=None):
    """One DDIM step (Song et al. 2021, eq. 12) with σ_t = η √β̃_t.

    Guided (Dhariwal & Nichol's Algorithm 2) in the order ddim_guidance names:
    'condition_score' (guided-diffusion: ε̂ from the clipped x̂_0, shifted, guided x̂_0 unclipped)
    or 'eps_shift' (shift the raw ε̂, then clip the x̂_0 derived from it).
    Shapes: model_output [B, ..., C or 2C]; x_t, noise [B, ...]; t [B].
    Returns dict(sample, pred_x0), each [B, ...].
    """
    if guidance is not None and ddim_guidance == 'eps_shift':
        model_output = common.guided_model_output(diffusion, model_output, x_t, t, guidance)
        guidance = None
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised,
                                    denoised_fn=denoised_fn)
    pred_x0 = common.condition_score(diffusion, out['pred_x0'], x_t, t, guidance)
    eps = diffusion.predict_eps_from_x0(x_t, t, pred_x0)
    # σ_t² = η² β̃_t from the float64 table (no cancellation in 1 - ᾱ near t = 0).
    sigma_sq = eta**2 * common.coef(diffusion, 'posterior_variance', t, x_t)
    mean = (pred_x0 * common.coef(diffusion, 'sqrt_alphas_cumprod_prev', t, x_t)
            + jnp.sqrt(jnp.maximum(common.coef(diffusion, 'one_minus_alphas_cumprod_prev', t, x_t)
                                   - sigma_sq, 0.0)) * eps)
    nonzero = common.nonzero_mask(t, x_t)
    return dict(sample=mean + nonzero * jnp.sqrt(sigma_sq) * noise, pred_x0=pred_x0)


@register_sampler('ddim', reads=('eta', 'ddim_guidance', 'dynamic_threshold'),
                  summary='DDIM (Song et al. 2021, eq. 12), σ_t = η √β̃_t')
def chain_step(ctx, state, t, key):
    d, x = ctx.diffusion, state['x']
    out = ddim_step(d, ctx.model_fn(x, t), x, t,
                    common.noise_like(key, x, ctx.opts.noise_repeat), eta=ctx.eta,
                    clip_denoised=ctx.opts.clip_denoised, guidance=ctx.guidance,
                    ddim_guidance=common.guidance_order(ctx.opts),
                    denoised_fn=common.denoised_fn(ctx.opts))
    return {'x': out['sample']}, out['pred_x0']
