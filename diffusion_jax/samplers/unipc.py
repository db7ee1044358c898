"""'unipc': UniPC (Zhao et al. 2023), the B_2(h) ("bh2") predictor–corrector of order 2 in
data-prediction form, over the respaced steps, one network call per step (NFE = K).

With λ = log(α/σ), h = λ_t - λ_s, hh = -h, B(h) = e^{hh} - 1 and the data predictions m (m0 at
the step's start s, m1 at the step before, r_1 = (λ_{s1} - λ_s)/h < 0, D_1 = (m1 - m0)/r_1):
  UniP-2 (predictor)  x̃_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m0 - ½ α_t B(h) D_1
                      (order 1 at the first step: the DDIM step; this equals DPM-Solver++(2M)),
  UniC (corrector)    once m_t = x̂_0(x̃_t) is evaluated for the *next* step, the step from s is
                      redone with it:  x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m0
                      - α_t B(h) (ρ_1 D_1 + ρ_t (m_t - m0)),
                      ρ from R ρ = b, R = [[1, 1], [r_1, 1]], b_i = hh φ_{i+1}(hh) i!/B(h)
                      (ρ_t = ½ after a first-order predictor),
and the next predictor starts from the corrected x_t with m_t (evaluated at x̃_t: the corrector
costs no network call). Orders are lowered at the first step and near the end as DPM-Solver's
lower_order_final; the last step, to ᾱ = 1, returns x̂_0 of its evaluation (no corrector after it).
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.samplers import common
from diffusion_jax.samplers.registry import register_sampler

ORDER = 2  # Zhao et al.'s recommended order for guided sampling (their Sec. 5); 3 is not offered


def init(ctx, x):  # pylint: disable=unused-argument
    """x: the predictor's output at the current level; x_prev: the corrected start of the
    previous step; m1, m2: x̂_0 at the two previous levels; n: steps taken; order: the order of
    the previous predictor (that the corrector matches)."""
    zeros = jnp.zeros_like(x)
    return {'x': x, 'x_prev': zeros, 'm1': zeros, 'm2': zeros, 'n': jnp.zeros((), jnp.int32),
            'order': jnp.ones((), jnp.int32)}


def _levels(diffusion, k):
    """((λ_{k+1}, λ_k, λ_{k-1}), α_{k-1}, σ_{k-1}, σ_k) of the step from level k to k-1."""
    lam = tuple(common.log_snr(diffusion, k + j) for j in (1, 0, -1))
    return (lam, *common.step_levels(diffusion, k))


def corrector(diffusion, x_s, m0, m1, m_t, k, order):
    """UniC for the step from level k (x_s, m0; m1 at k+1) to k-1 given m_t at k-1."""
    return corrector_levels(x_s, m0, m1, m_t, order, *_levels(diffusion, k))


def predictor(diffusion, x_s, m0, m1, k, order):
    """UniP-order from level k to k-1 (order 1 or 2, traced); m0 at k, m1 at k+1."""
    return predictor_levels(x_s, m0, m1, order, *_levels(diffusion, k), k == 0)


def corrector_levels(x_s, m0, m1, m_t, order, lam, alpha_t, sigma_t, sigma_s):
    """UniC of any process from its levels: lam = (λ_{s1}, λ_s, λ_t), α_t, σ_t, σ_s scalars."""
    lam_s1, lam_s, lam_t = lam
    h = lam_t - lam_s
    hh = -h
    base = (sigma_t / sigma_s) * x_s - alpha_t * jnp.expm1(-h) * m0
    b_h = jnp.expm1(hh)
    # B(h) ρ for R ρ = b (b_i B(h) = hh φ_{i+1}(hh) i!), solved in closed form for 2 × 2.
    bb1, bb2 = hh * common.phi(2, hh), 2.0 * hh * common.phi(3, hh)
    r1 = jnp.where(order >= 2, (lam_s1 - lam_s) / h, -1.0)
    rho1 = (bb1 - bb2) / (1.0 - r1)
    rho_t2 = bb1 - rho1
    d1 = (m1 - m0) / r1
    second = base - alpha_t * (rho1 * d1 + rho_t2 * (m_t - m0))
    first = base - alpha_t * 0.5 * b_h * (m_t - m0)
    return jnp.where(order >= 2, second, first)


def predictor_levels(x_s, m0, m1, order, lam, alpha_t, sigma_t, sigma_s, final):
    """UniP of any process from its levels; `final` (the step to σ = 0) returns m0."""
    lam_s1, lam_s, lam_t = lam
    h = jnp.where(final, 1.0, lam_t - lam_s)  # λ_t = ∞: replaced by x̂_0 below
    base = (sigma_t / sigma_s) * x_s - alpha_t * jnp.expm1(-h) * m0
    r1 = jnp.where(order >= 2, (lam_s1 - lam_s) / h, -1.0)
    second = base - alpha_t * 0.5 * jnp.expm1(-h) * (m1 - m0) / r1
    return jnp.where(final, m0, jnp.where(order >= 2, second, base))


@register_sampler('unipc', init=init, reads=('ddim_guidance', 'dynamic_threshold'),
                  recommended_spacing='logsnr', summary='UniPC-bh2, order 2 (Zhao et al. 2023)')
def chain_step(ctx, state, t, key):  # pylint: disable=unused-argument
    d, k = ctx.diffusion, t[0]
    m_new = common.predict_x0(ctx, state['x'], t)
    corrected = corrector(d, state['x_prev'], state['m1'], state['m2'], m_new, k + 1,
                          state['order'])
    x = jnp.where(state['n'] > 0, corrected, state['x'])
    order = jnp.minimum(jnp.minimum(ORDER, state['n'] + 1), k + 1)
    x_next = predictor(d, x, m_new, state['m1'], k, order)
    return {'x': x_next, 'x_prev': x, 'm1': m_new, 'm2': state['m1'], 'n': state['n'] + 1,
            'order': order}, m_new
