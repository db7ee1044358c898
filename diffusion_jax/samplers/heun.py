"""'heun': EDM's deterministic second-order sampler (Karras et al. 2022, Algorithm 1) on the VP
model, through x̃ = x/√ᾱ and σ = √((1-ᾱ)/ᾱ), with the σ_k of the respaced steps.

In those variables the probability-flow ODE is dx̃/dσ = (x̃ - D(x̃; σ))/σ with the denoiser
D = x̂_0(x = √ᾱ x̃, t) (their eq. 4 with s(t) = 1 after the change of variables; DDIM is its Euler
method). For k = K-1, …, 1 (σ_k → σ_{k-1}):
    d = (x̃ - D(x̃; σ_k))/σ_k,   x̃' = x̃ + (σ_{k-1} - σ_k) d,
    d' = (x̃' - D(x̃'; σ_{k-1}))/σ_{k-1},   x̃_{k-1} = x̃ + (σ_{k-1} - σ_k)(d + d')/2,
and the last step, to σ = 0, is Euler: x_0 = D(x̃; σ_0). Both evaluations use the model's own
discrete levels (the respaced steps; with 'karras' spacing these are Karras' ρ = 7 levels snapped
to them, as EDM's iDDPM preconditioner does). NFE = 2K - 1. On a zero-terminal-SNR schedule
(ᾱ = 0 at the first step, σ = ∞) the first step is DDIM's from ᾱ = 0, the Euler step's limit.
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
    if ctx.opts.step_interval:  # both evaluations guided or not by σ_t (Kynkäänniemi et al.)
        ctx = ctx._replace(model_fn=common.interval_at(ctx.model_fn, d.model_time(t)))
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

    def from_pure_noise(_):
        # ᾱ_t = 0 (a zero-terminal-SNR schedule's first step): x̃ = x/√ᾱ and σ are infinite, but
        # the Euler step's limit is finite, DDIM's from ᾱ = 0: x̃_{t-1} = D + σ_{t-1} ε̂, i.e.
        # x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}) ε̂ with ε̂ = x_t (predict_eps_from_x0 at ᾱ = 0).
        # There is no finite level to average a second slope with, so it is first order.
        t_next = jnp.maximum(t - 1, 0)
        eps = d.predict_eps_from_x0(x, t, denoised)
        return (common.coef(d, 'sqrt_alphas_cumprod', t_next, x) * denoised
                + common.coef(d, 'sqrt_one_minus_alphas_cumprod', t_next, x) * eps)

    # The step to σ = 0 makes no second evaluation (the NFE = 2K - 1 of Algorithm 1); neither
    # does the step from ᾱ = 0 (2K - 2 on a zero-terminal-SNR schedule).
    branch = jnp.where(t[0] == 0, 0, jnp.where(sqrt_abar.reshape(-1)[0] == 0, 1, 2))
    x = jax.lax.switch(branch, (lambda _: denoised, from_pure_noise, second_order), None)
    return x, denoised


@register_sampler('heun', nfe=lambda k, _: 2 * k - 1,
                  reads=('ddim_guidance', 'dynamic_threshold'),
                  summary="EDM's Heun sampler (Karras et al. 2022, Alg. 1)")
def chain_step(ctx, state, t, key):  # pylint: disable=unused-argument
    x, denoised = heun_step(ctx, state['x'], t)
    return {'x': x}, denoised
