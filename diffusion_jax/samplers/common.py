"""What every sampler shares: the static options, the per-step constants, the network's x̂_0
(clipped or dynamically thresholded, then classifier-guided), noise and sharding constraints.

Guidance order. Classifier guidance enters every sampler as a shift of the score,
ε̃ = ε̂ - s √(1-ᾱ_t) ∇_{x_t} log p_φ(y|x_t) (Dhariwal & Nichol 2021, Algorithm 2). Where x̂_0 is
clipped or thresholded, the default follows guided-diffusion's `condition_score`: ε̂ is taken from
the *clipped* x̂_0, shifted, and the guided x̂_0 = (x_t - √(1-ᾱ_t) ε̃)/√ᾱ_t is used unclipped.
sampling.ddim_guidance='eps_shift' is the other order (shift the raw ε̂, then clip the x̂_0
derived from it), the one DPM-Solver++'s reference code and diffusers' multistep schedulers use
(guidance acts on the network output, thresholding on the x̂_0 made from it). Every method that
makes x̂_0 from the network (ddim, dpmpp_*, unipc, heun) honours the option; 'auto' (the default)
is each method's reference: 'eps_shift' for dpmpp_2m/dpmpp_3m/unipc, 'condition_score' for the
others. Without clipping the two are the same step.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion_jax import sharding as sharding_lib
from diffusion_jax.diffusion import wrap_model

# Song et al. 2021's default signal-to-noise ratio for the Langevin corrector (score_sde,
# configs/default_cifar10_configs.py: sampling.snr = 0.16) and its one corrector step per level.
DEFAULT_SNR = 0.16
DEFAULT_LANGEVIN_STEPS = 1
DDIM_GUIDANCE = ('auto', 'condition_score', 'eps_shift')
# The order of each method's reference implementation, where it is not guided-diffusion's.
REFERENCE_GUIDANCE = {'dpmpp_2m': 'eps_shift', 'dpmpp_3m': 'eps_shift', 'unipc': 'eps_shift'}


class Options(NamedTuple):
    """Everything static about a sampler call (hashable: a jit cache key)."""
    method: str = 'ancestral'
    clip_denoised: bool = True
    langevin_steps: int = DEFAULT_LANGEVIN_STEPS
    noise_repeat: int = 1
    mesh: Mesh | None = None
    progress: tuple[int, ...] = ()
    ddim_guidance: str = 'auto'
    dynamic_threshold: float = 0.0
    # (σ_min, σ_data) of a consistency model's parametrisation (method 'consistency' only).
    consistency: tuple[float, ...] = ()
    # Self-conditioning (Chen et al. 2022): every network call of a step gets the previous
    # step's x̂_0 as model_fn(x, t, self_cond=x̂_0), zeros at the first step (feed_previous_x0).
    self_condition: bool = False
    # A guided model_fn with a guidance interval (guidance.has_interval): the Heun step decides
    # the interval once, at its first evaluation's time, for both evaluations (interval_at).
    step_interval: bool = False


class Context(NamedTuple):
    """The traced inputs of one chain: the (respaced) diffusion, the model, the guidance, η and
    the Langevin SNR, plus the static options. model_fn takes the chain's step indices: it is
    diffusion.wrap_model of the caller's network function (see `context`)."""
    diffusion: Any
    model_fn: Any
    guidance: Any
    opts: Options
    eta: Any
    snr: Any


def context(diffusion, model_fn, guidance, opts: Options, eta, snr) -> Context:
    """The Context of a chain over `diffusion`, with model_fn wrapped (diffusion.wrap_model) so
    that samplers call ctx.model_fn(x, t) with their own step indices t."""
    return Context(diffusion, wrap_model(model_fn, diffusion), guidance, opts, eta, snr)


def with_previous_x0(model_fn, previous_x0):
    """model_fn(x, t) = model_fn(x, t, self_cond=previous_x0): a step's network calls, fed the
    x̂_0 [B, ...] of the step before (self-conditioning, Chen et al. 2022, Algorithm 2)."""
    return lambda x, t, **inputs: model_fn(x, t, self_cond=previous_x0, **inputs)


def interval_at(model_fn, t_in):
    """model_fn(x, t) = model_fn(x, t, interval_t=t_in): every call decides the guidance
    interval (Kynkäänniemi et al. 2024) at σ of the network time input t_in [B] rather than at
    its own t, as a Heun step's two evaluations do (guidance.classifier_free_model_fn)."""
    return lambda x, t, **inputs: model_fn(x, t, interval_t=t_in, **inputs)


def coef(diffusion, name: str, t, x):
    """diffusion.<name>[t] as [B, 1, …, 1] in x's dtype."""
    out = jnp.asarray(getattr(diffusion, name))[t].astype(x.dtype)
    return out.reshape(t.shape + (1,) * (x.ndim - 1))


def nonzero_mask(t, x):
    """1 where t != 0 and 0 at t = 0, shaped [B, 1, …, 1] in x's dtype: no noise is added on the
    last step (DDPM Algorithm 2, line 3: z = 0 at t = 1)."""
    return (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - 1))


def per_example_norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def constrain(x, mesh: Mesh | None, leading: int = 0):
    """Keep the batch axis (after `leading` unsharded axes) split over the mesh's devices."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_lib.data_sharding(mesh, leading))


def noise_like(key, x, repeat: int):
    """z ~ N(0, I) of x's shape; with repeat > 1 the same [B/repeat, ...] draw is tiled, so the
    groups of a [repeat·B'] batch share their noise (interpolation strips)."""
    if repeat == 1:
        return jax.random.normal(key, x.shape, x.dtype)
    z = jax.random.normal(key, (x.shape[0] // repeat,) + x.shape[1:], x.dtype)
    return jnp.tile(z, (repeat,) + (1,) * (x.ndim - 1))


def dynamic_threshold(pred_x0, percentile: float):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): per example
    s = max(1, quantile_p(|x̂_0|)), x̂_0 ← clip(x̂_0, -s, s)/s. Shapes: [B, ...] -> [B, ...]."""
    flat = jnp.abs(pred_x0).reshape(pred_x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (pred_x0.ndim - 1)).astype(pred_x0.dtype)
    return jnp.clip(pred_x0, -s, s) / s


def denoised_fn(opts: Options):
    """The x̂_0 transform p_mean_variance applies before its clip: the dynamic threshold or None."""
    if not opts.dynamic_threshold:
        return None
    return functools.partial(dynamic_threshold, percentile=float(opts.dynamic_threshold))


# ----------------------------------------------------------------------------------------------
# Network outputs in ε form, and guidance
# ----------------------------------------------------------------------------------------------
def eps_from_mean_output(diffusion, mean_output, x_t, t):
    if diffusion.model_mean_type == 'eps':
        return mean_output.astype(x_t.dtype)
    pred_x0 = diffusion.pred_x0_from_output(mean_output.astype(x_t.dtype), x_t, t)
    return diffusion.predict_eps_from_x0(x_t, t, pred_x0)


def mean_output_from_eps(diffusion, eps, x_t, t):
    if diffusion.model_mean_type == 'eps':
        return eps
    pred_x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    return pred_x0 if diffusion.model_mean_type == 'x0' else diffusion.predict_v(pred_x0, t, eps)


def guided_model_output(diffusion, model_output, x_t, t, guidance):
    """The network output with ε̂ replaced by ε̂ - s √(1-ᾱ_t) ∇_{x_t} log p_φ(y|x_t)
    (Dhariwal & Nichol 2021, Algorithm 2), in the network's own parameterisation and layout.

    Shapes: model_output [B, ..., C or 2C], x_t [B, ..., C], t [B] (respaced indices).
    """
    if guidance is None:
        return model_output
    mean_output, var_output = diffusion.split_model_output(model_output, x_t)
    eps = eps_from_mean_output(diffusion, mean_output, x_t, t)
    eps = eps - (coef(diffusion, 'sqrt_one_minus_alphas_cumprod', t, x_t)
                 * guidance.scaled_grad(x_t, diffusion.model_time(t)))
    mean_output = mean_output_from_eps(diffusion, eps, x_t, t)
    if var_output is None:
        return mean_output
    return jnp.concatenate([mean_output, var_output.astype(mean_output.dtype)], axis=-1)


def condition_score(diffusion, pred_x0, x_t, t, guidance):
    """guided-diffusion's `condition_score` in x̂_0 form: ε = ε(x̂_0) - s √(1-ᾱ_t) ∇ log p_φ(y|x_t),
    returned as the guided x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t (not clipped again). [B, ...]."""
    if guidance is None:
        return pred_x0
    eps = diffusion.predict_eps_from_x0(x_t, t, pred_x0)
    eps = eps - (coef(diffusion, 'sqrt_one_minus_alphas_cumprod', t, x_t)
                 * guidance.scaled_grad(x_t, diffusion.model_time(t)))
    return diffusion.predict_x0_from_eps(x_t, t, eps)


def guidance_order(opts: Options) -> str:
    """opts.ddim_guidance with 'auto' resolved to the method's reference order."""
    if opts.ddim_guidance != 'auto':
        return opts.ddim_guidance
    return REFERENCE_GUIDANCE.get(opts.method, 'condition_score')


def predict_x0(ctx: Context, x, t):
    """The data prediction the ODE solvers integrate: x̂_0(x_t, t) from the network in whatever it
    predicts (ε, x0, v), classifier-guided and thresholded/clipped in the order of
    `guidance_order` ('condition_score': clip, then guide, the guided x̂_0 unclipped;
    'eps_shift': guide the network output, then clip). Shapes: x [B, ...], t [B] -> [B, ...]."""
    d = ctx.diffusion
    model_output, guidance = ctx.model_fn(x, t), ctx.guidance
    if guidance is not None and guidance_order(ctx.opts) == 'eps_shift':
        model_output, guidance = guided_model_output(d, model_output, x, t, guidance), None
    out = d.p_mean_variance(model_output, x, t,
                            clip_denoised=ctx.opts.clip_denoised, denoised_fn=denoised_fn(ctx.opts))
    return condition_score(d, out['pred_x0'], x, t, guidance)


def score(diffusion, model_output, x_t, t, guidance):
    """s(x_t, t) = -ε̂/√(1-ᾱ_t), with the classifier's s ∇ log p_φ(y|x_t) added when guided."""
    mean_output, _ = diffusion.split_model_output(
        guided_model_output(diffusion, model_output, x_t, t, guidance), x_t)
    return diffusion.score_from_eps(x_t, t, eps_from_mean_output(diffusion, mean_output, x_t, t))


def log_snr(diffusion, k):
    """λ_k = log(α_k/σ_k) = ½(log ᾱ_k - log(1-ᾱ_k)) of respaced step k (a scalar int array,
    clamped into [0, K)); from the float64-built log tables, so exact near ᾱ = 1."""
    k = jnp.clip(k, 0, diffusion.num_timesteps - 1)
    return 0.5 * (jnp.log(jnp.asarray(diffusion.alphas_cumprod)[k])
                  - jnp.asarray(diffusion.log_one_minus_alphas_cumprod)[k]).astype(jnp.float32)


def step_levels(diffusion, k):
    """(α_t, σ_t, σ_s) of the step from respaced level s = k to t = k - 1 (a scalar int array):
    α = √ᾱ, σ = √(1-ᾱ), float32, read from the float64-built tables (ᾱ_{-1} = 1)."""
    alpha_t = jnp.asarray(diffusion.sqrt_alphas_cumprod_prev)[k].astype(jnp.float32)
    sigma_t = jnp.sqrt(jnp.asarray(diffusion.one_minus_alphas_cumprod_prev)[k].astype(jnp.float32))
    sigma_s = jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod)[k].astype(jnp.float32)
    return alpha_t, sigma_t, sigma_s


def phi(n: int, z):
    """φ_n(z) = Σ_{j≥0} z^j/(j+n)! (φ_0 = e^z, φ_1 = (e^z - 1)/z, φ_2 = (e^z - 1 - z)/z², …), the
    exponential integrators' functions; a Taylor series where |z| < 1 avoids the cancellation of
    the closed form in float32."""
    z = jnp.asarray(z, jnp.float32)
    series = sum(z**j / float(_factorial(j + n)) for j in range(14))
    closed = jnp.expm1(z) if n >= 1 else jnp.exp(z)
    for i in range(1, n):
        closed = closed - z**i / float(_factorial(i))
    safe = jnp.where(jnp.abs(z) < 1.0, 1.0, z)
    closed = closed / safe**n if n >= 1 else closed
    return jnp.where(jnp.abs(z) < 1.0, series, closed)


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out
