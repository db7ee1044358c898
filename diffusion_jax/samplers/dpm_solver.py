"""'dpmpp_2m', 'dpmpp_3m': DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Sec. 4,
Algorithm 2 and its third-order extension), data-prediction form, over the respaced steps.

The probability-flow ODE in λ = log(α/σ) (α = √ᾱ, σ = √(1-ᾱ)) with the data prediction
x̂_0 = x_θ(x, λ) has the exact solution from level s to level t (h = λ_t - λ_s > 0)
    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ dλ,
and the multistep solvers expand x_θ in λ through the previous steps' x̂_0 (m0 at s, m1, m2
before it, h_0 = λ_s - λ_{s1}, h_1 = λ_{s1} - λ_{s2}, r_0 = h_0/h, r_1 = h_1/h):
    order 1 (= DDIM, η = 0):  x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m0
    order 2 (2M):             + ½ α_t h φ_1(-h) D1,            D1 = (m0 - m1)/r_0
    order 3 (3M):             x1 + α_t h (φ_2(-h) D1' + φ_3(-h) D2) with
                              D1' = D1 + r_0/(r_0+r_1) (D1 - D1_1), D2 = (D1 - D1_1)/(r_0+r_1),
                              D1_1 = (m1 - m2)/r_1
(φ_n the exponential-integrator functions, `common.phi`). Lower orders where the history is
short (the first steps: order ≤ n + 1 at the n-th step) and near the end as diffusers'
DPMSolverMultistepScheduler (lower_order_final=True, final_sigmas_type='zero'): below
LOWER_ORDER_FINAL_BELOW = 15 steps the order is ≤ the number of steps left (the penultimate step
order ≤ 2); from 15 steps on only the last step is lowered. The last step, to ᾱ = 1 (λ = ∞), is
first order for every K, which returns x̂_0 itself. One network call per step: NFE = K.
Clipping/thresholding applies to x̂_0 (the paper's thresholding), guidance through
`common.predict_x0`.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler


# diffusers' DPMSolverMultistepScheduler applies lower_order_final "only for < 15 inference
# steps" (its docstring and step()); at 15 and more the penultimate step keeps the full order.
LOWER_ORDER_FINAL_BELOW = 15


def multistep_order(order: int, steps_taken, steps_left, num_steps: int):
    """The order of a multistep step (a traced int32 scalar): at most `order`, at most
    steps_taken + 1 (the history there is), and near the end as diffusers'
    DPMSolverMultistepScheduler with lower_order_final=True and final_sigmas_type='zero': with
    num_steps < 15 (static) at most steps_left (the penultimate step ≤ 2, the last 1); with 15
    or more only the last step (steps_left = 1) is first order."""
    warm = jnp.minimum(order, steps_taken + 1)
    if num_steps < LOWER_ORDER_FINAL_BELOW:
        return jnp.minimum(warm, steps_left)
    return jnp.where(steps_left <= 1, 1, warm)


def multistep_init(ctx, x):  # pylint: disable=unused-argument
    """The scan state: x, the two previous x̂_0 and the number of steps taken."""
    return {'x': x, 'm1': jnp.zeros_like(x), 'm2': jnp.zeros_like(x),
            'n': jnp.zeros((), jnp.int32)}


def levels(diffusion, k):
    """(λ_{k+2}, λ_{k+1}, λ_k, λ_{k-1}) and (α_{k-1}, σ_{k-1}, σ_k) of step k (a scalar)."""
    lam = [common.log_snr(diffusion, k + j) for j in (2, 1, 0, -1)]
    return lam, common.step_levels(diffusion, k)


def dpmpp_update(diffusion, x, k, m0, m1, m2, order):
    """x at level k-1 from x [B, ...] at level k by DPM-Solver++ of the given (traced scalar)
    order ∈ {1, 2, 3}; at k = 0 the result is m0 (the step to ᾱ = 1)."""
    lam, (alpha_t, sigma_t, sigma_s) = levels(diffusion, k)
    return dpmpp_update_levels(x, m0, m1, m2, order, lam, alpha_t, sigma_t, sigma_s, k == 0)


def dpmpp_update_levels(x, m0, m1, m2, order, lam, alpha_t, sigma_t, sigma_s, final):
    """The DPM-Solver++ step of any process from its levels (the module docstring's formulas):
    lam = (λ_{s2}, λ_{s1}, λ_s, λ_t), α_t, σ_t, σ_s scalars; `final` (the step to σ = 0)
    returns m0. Shapes: x, m0, m1, m2 [B, ...]."""
    lam_s2, lam_s1, lam_s0, lam_t = lam
    h = jnp.where(final, 1.0, lam_t - lam_s0)  # λ_t = ∞: the step is replaced below
    # Unused ratios are set to 1 so that no branch divides by zero.
    r0 = jnp.where(order >= 2, (lam_s0 - lam_s1) / h, 1.0)
    r1 = jnp.where(order >= 3, (lam_s1 - lam_s2) / h, 1.0)
    x1 = (sigma_t / sigma_s) * x - alpha_t * jnp.expm1(-h) * m0
    d1 = (m0 - m1) / r0
    x2 = x1 + 0.5 * alpha_t * h * common.phi(1, -h) * d1
    d1_1 = (m1 - m2) / r1
    d1_3 = d1 + r0 / (r0 + r1) * (d1 - d1_1)
    d2 = (d1 - d1_1) / (r0 + r1)
    x3 = x1 + alpha_t * h * (common.phi(2, -h) * d1_3 + common.phi(3, -h) * d2)
    out = jnp.where(order >= 3, x3, jnp.where(order == 2, x2, x1))
    return jnp.where(final, m0, out)


def _multistep(order: int):
    def step(ctx, state, t, key):  # pylint: disable=unused-argument
        k = t[0]
        x = state['x']
        m0 = common.predict_x0(ctx, x, t)
        # k + 1 steps are left at respaced index k (k = 0: the step to ᾱ = 1).
        step_order = multistep_order(order, state['n'], k + 1, ctx.diffusion.num_timesteps)
        x = dpmpp_update(ctx.diffusion, x, k, m0, state['m1'], state['m2'], step_order)
        return {'x': x, 'm1': m0, 'm2': state['m1'], 'n': state['n'] + 1}, m0
    return step


register_sampler('dpmpp_2m', init=multistep_init,
                 reads=('ddim_guidance', 'dynamic_threshold'), recommended_spacing='logsnr',
                 summary='DPM-Solver++(2M) (Lu et al. 2022)')(_multistep(2))
register_sampler('dpmpp_3m', init=multistep_init,
                 reads=('ddim_guidance', 'dynamic_threshold'), recommended_spacing='logsnr',
                 summary='DPM-Solver++(3M) (Lu et al. 2022)')(_multistep(3))
