"""'langevin' and 'pc': Langevin dynamics through the score s(x_t, t) = -ε_θ(x_t, t)/√(1-ᾱ_t).

  'langevin'  annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), see
              `annealed_langevin_level`; NFE = K (langevin_steps + 1).
  'pc'        predictor-corrector (Song et al. 2021, Algorithm 5 for the VP SDE): at every step
              langevin_steps Langevin corrector steps at level t with the signal-to-noise step
              size, then one ancestral predictor step; NFE = K (langevin_steps + 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import ancestral, common
from diffusion_jax.samplers.registry import register_sampler


def langevin_step(x, score, noise, step_size):
    """x + ε s + √(2ε) z: one unadjusted Langevin step towards the density with score s.

    (Song & Ermon write α/2 for ε.) Shapes: x, score, noise [B, ...]; step_size broadcastable.
    """
    return x + step_size * score + jnp.sqrt(2.0 * step_size) * noise


def snr_step_size(diffusion, score, noise, t, snr):
    """ε = 2 α_t (r ‖z‖/‖s‖)² (Song et al. 2021, Algorithm 5), one value for the whole batch.

    α_t = 1 - β_t of the (respaced) chain. As in score_sde, ‖z‖ and ‖s‖ are per-example norms
    averaged over the batch: with per-example ratios the step is heavy-tailed in low dimension
    (‖z‖²/‖s‖² is F-distributed for Gaussian data; on 4-D data the chain's variance doubled),
    whereas the batch averages make it a near-constant step ∝ the noise variance. The price is
    that an example's step depends on the rest of its batch (a scalar all-reduce on a mesh).
    """
    alpha = 1.0 - common.coef(diffusion, 'betas', t, score)
    score_norm = jnp.mean(common.per_example_norm(score))
    # A score of exactly zero (a zero-initialised output layer) carries no information and would
    # make the step infinite: take no step then.
    ratio = (snr * jnp.mean(common.per_example_norm(noise))
             / jnp.where(score_norm > 0, score_norm, 1.0))
    return jnp.where(score_norm > 0, 2.0 * alpha * jnp.square(ratio), 0.0)


def annealed_step_size(diffusion, t, snr, x):
    """ε_t = 2 α_t r² (1-ᾱ_t): the SNR rule with ‖z‖²/‖s‖² at its value for the pure-noise
    score (‖s‖² = D/(1-ᾱ_t)), a fixed step ∝ the noise level, [B, 1, …, 1].

    In y = x/√ᾱ_t coordinates (noise level σ_t = √(1-ᾱ_t)/√ᾱ_t) this is Song & Ermon's
    α_i = ε σ_i²/σ_L² with ε/σ_L² = 4 r² α_t (their α = 2ε, step in y = step in x / ᾱ_t).
    """
    alpha = 1.0 - common.coef(diffusion, 'betas', t, x)
    return 2.0 * alpha * snr**2 * common.coef(diffusion, 'one_minus_alphas_cumprod', t, x)


def corrector(ctx, x, t, key, adaptive: bool):
    """ctx.opts.langevin_steps Langevin steps at level t with the model's score."""
    d, opts = ctx.diffusion, ctx.opts

    def body(j, x):
        s = common.score(d, ctx.model_fn(x, t), x, t, ctx.guidance)
        z = common.noise_like(jax.random.fold_in(key, j), x, opts.noise_repeat)
        step_size = (snr_step_size(d, s, z, t, ctx.snr) if adaptive
                     else annealed_step_size(d, t, ctx.snr, x))
        return common.constrain(langevin_step(x, s, z, step_size), opts.mesh)
    return jax.lax.fori_loop(0, opts.langevin_steps, body, x)


def annealed_langevin_level(ctx, x, t, key):
    """One level of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) in x_t space.

    Choice of parameterisation: Song & Ermon anneal y = x_0 + σ z over σ_1 > … > σ_L and keep y
    between levels. Here y = x_t/√ᾱ_t (σ_t = √(1-ᾱ_t)/√ᾱ_t), written in the VP variable x_t so
    the state stays O(1) and the ε-network's score is used as is:
      * opts.langevin_steps steps x ← x + ε_t s(x, t) + √(2ε_t) z with ε_t = 2 α_t r² (1-ᾱ_t)
        (`annealed_step_size`, ∝ the noise level),
      * then the move to the next level keeps y: x ← x √(ᾱ_{t-1}/ᾱ_t) = x/√α_t (from ᾱ_t = 0,
        where y is infinite, DDIM's step instead),
      * after the last level the output is the denoised x̂_0 ≈ E[x_0 | x] at level 0
        (Tweedie's formula, the final denoising step of Song & Ermon 2020), clipped if configured.
    (Keeping x_t instead of y between levels collapsed the variance in a test on Gaussian data.)
    The algorithm's own weakness: at low noise its steps are tiny next to the data's spread, so
    the chain lags behind the annealing; on N(μ, 0.04 I) data with the exact score its output
    variance is 9% high with 5 steps × 1000 levels, 20% with 4 × 250 (tests/test_samplers.py).
    Returns (x at the next level, or x̂_0 after t = 0; x̂_0 at this level).
    """
    d = ctx.diffusion
    x = corrector(ctx, x, t, key, adaptive=False)
    model_output = common.guided_model_output(d, ctx.model_fn(x, t), x, t,
                                              ctx.guidance)
    pred_x0 = d.p_mean_variance(model_output, x, t, ctx.opts.clip_denoised,
                                denoised_fn=common.denoised_fn(ctx.opts))['pred_x0']
    rescaled = x * jax.lax.rsqrt(1.0 - common.coef(d, 'betas', t, x))
    # At ᾱ_t = 0 (a zero-terminal-SNR schedule's first level) y = x/√ᾱ_t is infinite (and the
    # Langevin step size 2 α_t r² (1-ᾱ_t) is 0, since β_t = 1): move to the next level by DDIM's
    # step from ᾱ = 0 instead, √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}) ε̂ with ε̂ = x_t.
    from_pure_noise = (common.coef(d, 'sqrt_alphas_cumprod_prev', t, x) * pred_x0
                       + jnp.sqrt(common.coef(d, 'one_minus_alphas_cumprod_prev', t, x))
                       * d.predict_eps_from_x0(x, t, pred_x0))
    rescaled = jnp.where(common.coef(d, 'alphas_cumprod', t, x) == 0, from_pure_noise, rescaled)
    return jnp.where(common.nonzero_mask(t, x) > 0, rescaled, pred_x0), pred_x0


def _langevin_nfe(k, langevin_steps):
    return k * (langevin_steps + 1)


@register_sampler('langevin', nfe=_langevin_nfe, stochastic=True,
                  reads=('langevin_snr', 'langevin_steps', 'dynamic_threshold'),
                  summary='annealed Langevin dynamics (Song & Ermon 2019, Alg. 1)')
def langevin_chain_step(ctx, state, t, key):
    x, pred_x0 = annealed_langevin_level(ctx, state['x'], t, jax.random.split(key)[0])
    return {'x': x}, pred_x0


@register_sampler('pc', nfe=_langevin_nfe, stochastic=True,
                  reads=('langevin_snr', 'langevin_steps', 'dynamic_threshold'),
                  summary='predictor-corrector (Song et al. 2021, Alg. 5)')
def pc_chain_step(ctx, state, t, key):
    key_corrector, key_predictor = jax.random.split(key)
    x = corrector(ctx, state['x'], t, key_corrector, adaptive=True)
    return ancestral.chain_step(ctx, {'x': x}, t, key_predictor)
