"""'cold' and 'cold_naive': Bansal et al. 2022's samplers over a deterministic degradation
(diffusion_jax.cold.ColdDiffusion), from level s = T (or a given level) down to 0.

    Algorithm 1 ('cold_naive'):  x̂_0 = R(x_s, s),  x_{s-1} = D(x̂_0, s-1)
    Algorithm 2 ('cold'):        x̂_0 = R(x_s, s),  x_{s-1} = x_s - D(x̂_0, s) + D(x̂_0, s-1)

Algorithm 2 is the paper's: for an additive D(x_0, s) = x_0 + s·e its step maps D(x_0, s) to
D(x_0, s-1) exactly whatever R returns, so errors of R do not accumulate; Algorithm 1 returns
R's last estimate. Both are deterministic (NFE = T); x̂_0 is clipped to [-1, 1] with
sampling.clip_denoised. They run on the chain runner (samplers.chain.reverse_from), whose step
index t ∈ [0, T) is the level s = t + 1 here, so the network sees t as it did in training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion_jax import cold as cold_lib
from diffusion_jax.samplers import chain
from diffusion_jax.samplers.registry import register_sampler


def _restore(ctx, x, t):
    if not isinstance(ctx.diffusion, cold_lib.ColdDiffusion):
        raise ValueError(f'sampling.method={ctx.opts.method!r} runs on diffusion.process='
                         "'cold' only; choose a Gaussian sampler (e.g. 'ancestral').")
    pred_x0 = ctx.diffusion.restore(ctx.model_fn, x, t + 1)
    return jnp.clip(pred_x0, -1.0, 1.0) if ctx.opts.clip_denoised else pred_x0


@register_sampler('cold', summary='cold diffusion, Bansal et al. 2022 Algorithm 2')
def cold_step(ctx, state, t, key):  # pylint: disable=unused-argument
    """x_{s-1} = x_s - D(x̂_0, s) + D(x̂_0, s-1) at s = t + 1. [B, ...] -> [B, ...]."""
    x = state['x']
    pred_x0 = _restore(ctx, x, t)
    d = ctx.diffusion
    return {'x': x - d.degrade(pred_x0, t + 1) + d.degrade(pred_x0, t)}, pred_x0


@register_sampler('cold_naive', summary='cold diffusion, Bansal et al. 2022 Algorithm 1')
def cold_naive_step(ctx, state, t, key):  # pylint: disable=unused-argument
    """x_{s-1} = D(x̂_0, s-1) at s = t + 1."""
    pred_x0 = _restore(ctx, state['x'], t)
    return {'x': ctx.diffusion.degrade(pred_x0, t)}, pred_x0


def _check(cold, method: str) -> None:
    if not isinstance(cold, cold_lib.ColdDiffusion):
        raise ValueError("cold sampling needs diffusion.process='cold' (a ColdDiffusion).")
    cold.check_method(method)


def cold_restore(cold, model_fn, x_s, level: int | None = None, *, method: str = 'cold',
                 clip_denoised: bool = True, mesh: Mesh | None = None):
    """Restores x_s [B, H, W, C], degraded to `level` (default T), to level 0 with the
    paper's Algorithm 2 ('cold') or 1 ('cold_naive'): deterministic, NFE = level.
    model_fn(x, t) -> x̂_0 is the restoration network (t the chain index s - 1). [B, H, W, C]."""
    _check(cold, method)
    level = cold.num_timesteps if level is None else int(level)
    if not 1 <= level <= cold.num_timesteps:
        raise ValueError(f'level={level} must be in [1, {cold.num_timesteps}] '
                         '(diffusion.num_timesteps).')
    # Deterministic: the key is a placeholder the runner folds but never draws from.
    return chain.reverse_from(cold, model_fn, jax.random.key(0), x_s, level - 1, method=method,
                              clip_denoised=clip_denoised, mesh=mesh)


def cold_generate(cold, model_fn, prior, rng, shape, *, method: str = 'cold',
                  clip_denoised: bool = True, mesh: Mesh | None = None):
    """Generation from the fully degraded state (Bansal et al. Sec. 5): x_T ~ prior (a
    cold.MeanPrior: a Gaussian mixture over the channel means plus small noise), restored to
    level 0. shape = (B, H, W, C). Returns dict(samples=[B, H, W, C], x_T=[B, H, W, C])."""
    _check(cold, method)
    x_T = prior.sample(rng, tuple(int(s) for s in shape))
    return dict(samples=cold_restore(cold, model_fn, x_T, method=method,
                                     clip_denoised=clip_denoised, mesh=mesh), x_T=x_T)
