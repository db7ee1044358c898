"""'heun': EDM's deterministic second-order sampler (Karras et al. 2022, Algorithm 1) on the VP
model, through x̃ = x/√ᾱ and σ = √((1-ᾱ)/ᾱ), with the σ_k of the respaced steps.

In those variables the probability-flow ODE is dx̃/dσ = (x̃ - D(x̃; σ))/σ with the denoiser
D = x̂_0(x = √ᾱ x̃, t) (their eq. 4 with s(t) = 1 after the change of variables; DDIM is its Euler
method). For k = K-1, …, 1 (σ_k → σ_{k-1}):
    d = (x̃ - D(x̃; σ_k))/σ_k,   x̃' = x̃ + (σ_{k-1} - σ_k) d,
    d' = (x̃' - D(x̃'; σ_{k-1}))/σ_{k-1},   x̃_{k-1} = x̃ + (σ_{k-1} - σ_k)(d + d')/2,
and the last step, to σ = 0, is Euler: x_0 = D(x̃; σ_0). Both evaluations use the model's own
discrete levels (the respaced steps; with 'karras' spacing these are Karras' ρ = 7 levels snapped
to them, as EDM's iDDPM preconditioner does). NFE = 2K - 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler


def edm_sigma(diffusion, k, x):
    """σ_k = √((1-ᾱ_k)/ᾱ_k) as [B, 1, …, 1] (k [B], respaced indices)."""
    return common.coef(diffusion, 'sqrt_recipm1_alphas_cumprod', k, x)


def heun_step(ctx, x, t):
    """x at level t-1 from x [B, ...] at level t (x̂_0 at t = 0); returns (x, D(x; σ_t))."""
    d = ctx.diffusion
    denoised = common.predict_x0(ctx, x, t)
    sqrt_abar = common.coef(d, 'sqrt_alphas_cumprod', t, x)
    sigma = edm_sigma(d, t, x)
    x_tilde = x / sqrt_abar
    slope = (x_tilde - denoised) / sigma

    def second_order(_):
        t_next = jnp.maximum(t - 1, 0)
        sigma_next = edm_sigma(d, t_next, x)
        sqrt_abar_next = common.coef(d, 'sqrt_alphas_cumprod', t_next, x)
        x_euler = x_tilde + (sigma_next - sigma) * slope
        x_next = common.constrain(x_euler * sqrt_abar_next, ctx.opts.mesh)
        slope_next = (x_euler - common.predict_x0(ctx, x_next, t_next)) / sigma_next
        return (x_tilde + 0.5 * (sigma_next - sigma) * (slope + slope_next)) * sqrt_abar_next

    # The step to σ = 0 makes no second evaluation (the NFE = 2K - 1 of Algorithm 1).
    x = jax.lax.cond(t[0] == 0, lambda _: denoised, second_order, None)
    return x, denoised


@register_sampler('heun', nfe=lambda k, _: 2 * k - 1,
                  summary="EDM's Heun sampler (Karras et al. 2022, Alg. 1)")
def chain_step(ctx, state, t, key):  # pylint: disable=unused-argument
    x, denoised = heun_step(ctx, state['x'], t)
    return {'x': x}, denoised
