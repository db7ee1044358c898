"""Sampling from a trained diffusion: ancestral (DDPM), DDIM and its inversion, Langevin and
predictor-corrector samplers, progressive generation, interpolation and guidance.

Every sampler walks the steps t = K-1, …, 0 of a (possibly respaced) GaussianDiffusion in one
lax.fori_loop inside jit, so memory does not grow with K, and calls the network as
model_fn(x_t, timestep_map[t]): the model always sees the original timesteps it was trained on.

Methods (`sample(method=...)`):
  'ancestral'  DDPM Algorithm 2 (Ho et al. 2020): x_T ~ N(0, I),
               x_{t-1} = μ_θ(x_t, t) + σ_t z with the diffusion's variance (fixed or learned), no
               noise at the last step, x̂_0 clipped to [-1, 1] if clip_denoised.
  'ddim'       Song et al. 2021, eq. 12: x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1-ᾱ_{t-1}-σ_t²) ε̂ + σ_t z with
               σ_t = η √β̃_t (their eq. 16): η = 0 is deterministic, η = 1 the ancestral sampler
               with variance β̃_t.
  'langevin'   annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) through the score
               s(x_t, t) = -ε_θ(x_t, t)/√(1-ᾱ_t), see `_annealed_langevin_level`.
  'pc'         predictor-corrector (Song et al. 2021, Algorithm 5 for the VP SDE): at every step
               langevin_steps Langevin corrector steps at level t with the signal-to-noise step
               size, then one ancestral predictor step.

Compilation. The jitted entry points split their pytree arguments (the diffusion, model_fn,
guidance) into array leaves, which are traced, and everything else, which is static and hashed.
A model_fn built with `guidance.bind_model(apply, params)` (a jax.tree_util.Partial) therefore
compiles once per (configuration, step count, batch shape) and is reused for new parameters, new
labels, new η and new guidance scales; a lambda closing over parameters compiles again each time
a new lambda is passed. Randomness: the noise of step t is drawn from fold_in(rng, t), so it does
not depend on the sharding, and two samplers given the same rng see the same noise at each t.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import sharding as sharding_lib
from diffusion_jax.guidance import (ClassifierGuidance, bind_model, classifier_free_model_fn,
                                    classifier_grad_fn, classifier_guidance)

METHODS = ('ancestral', 'ddim', 'langevin', 'pc')
# Song et al. 2021's default signal-to-noise ratio for the Langevin corrector (score_sde,
# configs/default_cifar10_configs.py: sampling.snr = 0.16) and its one corrector step per level.
DEFAULT_SNR = 0.16
DEFAULT_LANGEVIN_STEPS = 1

__all__ = ['METHODS', 'sample', 'reverse_from', 'ddim_encode', 'interpolate_ddpm',
           'interpolate_ddim', 'same_xt_samples', 'slerp', 'langevin_correct', 'ancestral_step',
           'ddim_step', 'ddim_encode_step', 'langevin_step', 'guided_model_output',
           'ClassifierGuidance', 'classifier_guidance', 'classifier_grad_fn',
           'classifier_free_model_fn', 'bind_model']


# ----------------------------------------------------------------------------------------------
# Per-timestep constants
# ----------------------------------------------------------------------------------------------
def _coef(diffusion, name: str, t, x):
    """diffusion.<name>[t] as [B, 1, …, 1] in x's dtype."""
    out = jnp.asarray(getattr(diffusion, name))[t].astype(x.dtype)
    return out.reshape(t.shape + (1,) * (x.ndim - 1))


def _original_t(diffusion, t):
    return jnp.asarray(diffusion.timestep_map)[t]


def _per_example_norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


# ----------------------------------------------------------------------------------------------
# Network outputs in ε form, and DDIM-form guidance
# ----------------------------------------------------------------------------------------------
def _eps_from_mean_output(diffusion, mean_output, x_t, t):
    if diffusion.model_mean_type == 'eps':
        return mean_output.astype(x_t.dtype)
    pred_x0 = diffusion.pred_x0_from_output(mean_output.astype(x_t.dtype), x_t, t)
    return diffusion.predict_eps_from_x0(x_t, t, pred_x0)


def _mean_output_from_eps(diffusion, eps, x_t, t):
    if diffusion.model_mean_type == 'eps':
        return eps
    pred_x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
    return pred_x0 if diffusion.model_mean_type == 'x0' else diffusion.predict_v(pred_x0, t, eps)


def guided_model_output(diffusion, model_output, x_t, t, guidance: ClassifierGuidance | None):
    """The network output with ε̂ replaced by ε̂ - s √(1-ᾱ_t) ∇_{x_t} log p_φ(y|x_t)
    (Dhariwal & Nichol 2021, Algorithm 2), in the network's own parameterisation and layout.

    Shapes: model_output [B, ..., C or 2C], x_t [B, ..., C], t [B] (respaced indices).
    """
    if guidance is None:
        return model_output
    mean_output, var_output = diffusion.split_model_output(model_output, x_t)
    eps = _eps_from_mean_output(diffusion, mean_output, x_t, t)
    eps = eps - (_coef(diffusion, 'sqrt_one_minus_alphas_cumprod', t, x_t)
                 * guidance.scaled_grad(x_t, _original_t(diffusion, t)))
    mean_output = _mean_output_from_eps(diffusion, eps, x_t, t)
    if var_output is None:
        return mean_output
    return jnp.concatenate([mean_output, var_output.astype(mean_output.dtype)], axis=-1)


def _score(diffusion, model_output, x_t, t, guidance):
    """s(x_t, t) = -ε̂/√(1-ᾱ_t), with the classifier's s ∇ log p_φ(y|x_t) added when guided."""
    mean_output, _ = diffusion.split_model_output(
        guided_model_output(diffusion, model_output, x_t, t, guidance), x_t)
    return diffusion.score_from_eps(x_t, t, _eps_from_mean_output(diffusion, mean_output, x_t, t))


# ----------------------------------------------------------------------------------------------
# Single steps
# ----------------------------------------------------------------------------------------------
def ancestral_step(diffusion, model_output, x_t, t, noise, *, clip_denoised: bool = True,
                   guidance: ClassifierGuidance | None = None):
    """x_{t-1} = μ_θ(x_t, t) + s Σ_θ ∇ log p_φ(y|x_t) + σ_t z, no noise at t = 0
    (DDPM Algorithm 2; the guidance term is Dhariwal & Nichol's Algorithm 1).

    Shapes: x_t, noise [B, ...]; t [B]. Returns dict(sample, pred_x0), each [B, ...].
    """
    if guidance is None:
        return diffusion.p_sample(model_output, x_t, t, noise, clip_denoised=clip_denoised)
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    mean = out['mean'] + out['variance'] * guidance.scaled_grad(x_t, _original_t(diffusion, t))
    nonzero = (t != 0).astype(x_t.dtype).reshape(t.shape + (1,) * (x_t.ndim - 1))
    return dict(sample=mean + nonzero * jnp.exp(0.5 * out['log_variance']) * noise,
                pred_x0=out['pred_x0'])


def ddim_step(diffusion, model_output, x_t, t, noise, *, eta=0.0, clip_denoised: bool = True,
              guidance: ClassifierGuidance | None = None):
    """One DDIM step (Song et al. 2021, eq. 12) with σ_t = η √β̃_t, ε̂ guided as in Dhariwal &
    Nichol's Algorithm 2. Returns dict(sample, pred_x0), each [B, ...]."""
    model_output = guided_model_output(diffusion, model_output, x_t, t, guidance)
    return diffusion.ddim_sample(model_output, x_t, t, noise, eta=eta, clip_denoised=clip_denoised)


def ddim_encode_step(diffusion, model_output, x, t, *, clip_denoised: bool = False):
    """One step of the DDIM ODE run forwards (data -> noise), the inverse of decoding step t.

    Decoding step t maps level ᾱ_t to ᾱ_{t-1} (ᾱ_{-1} = 1) with ε̂ = ε_θ(x_t, t); this step maps
    x at level a = ᾱ_{t-1} to level b = ᾱ_t with ε̂ = ε_θ(x, t) evaluated at its input (the only
    approximation, ε_θ(x_{t-1}, t) ≈ ε_θ(x_t, t)):
        x̂_0 = (x - √(1-a) ε̂)/√a,    x_t = √b x̂_0 + √(1-b) ε̂.
    (GaussianDiffusion.ddim_reverse_sample, guided-diffusion's form, instead treats its input as
    level ᾱ_t and outputs level ᾱ_{t+1}, one level off the decoder's.)

    Shapes: model_output [B, ..., C or 2C], x [B, ..., C], t [B]. Returns x at level ᾱ_t.
    """
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    if diffusion.model_mean_type == 'eps' and not clip_denoised:
        eps = diffusion.split_model_output(model_output, x)[0].astype(x.dtype)
    else:
        eps = diffusion.predict_eps_from_x0(x, t, out['pred_x0'])
    pred_x0 = ((x - _coef(diffusion, 'one_minus_alphas_cumprod_prev', t, x) ** 0.5 * eps)
               / _coef(diffusion, 'sqrt_alphas_cumprod_prev', t, x))
    return (_coef(diffusion, 'sqrt_alphas_cumprod', t, x) * pred_x0
            + _coef(diffusion, 'sqrt_one_minus_alphas_cumprod', t, x) * eps)


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
    alpha = 1.0 - _coef(diffusion, 'betas', t, score)
    score_norm = jnp.mean(_per_example_norm(score))
    # A score of exactly zero (a zero-initialised output layer) carries no information and would
    # make the step infinite: take no step then.
    ratio = snr * jnp.mean(_per_example_norm(noise)) / jnp.where(score_norm > 0, score_norm, 1.0)
    return jnp.where(score_norm > 0, 2.0 * alpha * jnp.square(ratio), 0.0)


def annealed_step_size(diffusion, t, snr, x):
    """ε_t = 2 α_t r² (1-ᾱ_t): the SNR rule with ‖z‖²/‖s‖² at its value for the pure-noise
    score (‖s‖² = D/(1-ᾱ_t)), a fixed step ∝ the noise level, [B, 1, …, 1].

    In y = x/√ᾱ_t coordinates (noise level σ_t = √(1-ᾱ_t)/√ᾱ_t) this is Song & Ermon's
    α_i = ε σ_i²/σ_L² with ε/σ_L² = 4 r² α_t (their α = 2ε, step in y = step in x / ᾱ_t).
    """
    alpha = 1.0 - _coef(diffusion, 'betas', t, x)
    return 2.0 * alpha * snr**2 * _coef(diffusion, 'one_minus_alphas_cumprod', t, x)


# ----------------------------------------------------------------------------------------------
# Steps of the chain: step(x, t [B], key) -> (x_next, pred_x0)
# ----------------------------------------------------------------------------------------------
class _Options(NamedTuple):
    """Everything static about a sampler call (hashable: a jit cache key)."""
    method: str = 'ancestral'
    clip_denoised: bool = True
    langevin_steps: int = DEFAULT_LANGEVIN_STEPS
    noise_repeat: int = 1
    mesh: Mesh | None = None
    progress: tuple[int, ...] = ()


def _noise(key, x, repeat: int):
    """z ~ N(0, I) of x's shape; with repeat > 1 the same [B/repeat, ...] draw is tiled, so the
    groups of a [repeat·B'] batch share their noise (interpolation strips)."""
    if repeat == 1:
        return jax.random.normal(key, x.shape, x.dtype)
    z = jax.random.normal(key, (x.shape[0] // repeat,) + x.shape[1:], x.dtype)
    return jnp.tile(z, (repeat,) + (1,) * (x.ndim - 1))


def _corrector(diffusion, model_fn, guidance, x, t, key, opts, snr, adaptive: bool):
    """opts.langevin_steps Langevin steps at level t with the exact-model score."""
    def body(j, x):
        model_output = model_fn(x, _original_t(diffusion, t))
        score = _score(diffusion, model_output, x, t, guidance)
        z = _noise(jax.random.fold_in(key, j), x, opts.noise_repeat)
        step_size = (snr_step_size(diffusion, score, z, t, snr) if adaptive
                     else annealed_step_size(diffusion, t, snr, x))
        return _constrain(langevin_step(x, score, z, step_size), opts.mesh)
    return jax.lax.fori_loop(0, opts.langevin_steps, body, x)


def _make_step(diffusion, model_fn, guidance, opts: _Options, eta, snr):
    """The chain's step function for opts.method."""
    def predict(x, t, key, method):
        model_output = model_fn(x, _original_t(diffusion, t))
        noise = _noise(key, x, opts.noise_repeat)
        if method == 'ddim':
            out = ddim_step(diffusion, model_output, x, t, noise, eta=eta,
                            clip_denoised=opts.clip_denoised, guidance=guidance)
        else:
            out = ancestral_step(diffusion, model_output, x, t, noise,
                                 clip_denoised=opts.clip_denoised, guidance=guidance)
        return out['sample'], out['pred_x0']

    def step(x, t, key):
        if opts.method in ('ancestral', 'ddim'):
            return predict(x, t, key, opts.method)
        key_corrector, key_predictor = jax.random.split(key)
        if opts.method == 'pc':
            x = _corrector(diffusion, model_fn, guidance, x, t, key_corrector, opts, snr, True)
            return predict(x, t, key_predictor, 'ancestral')
        return _annealed_langevin_level(diffusion, model_fn, guidance, x, t, key_corrector, opts,
                                        snr)

    return step


def _annealed_langevin_level(diffusion, model_fn, guidance, x, t, key, opts: _Options, snr):
    """One level of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) in x_t space.

    Choice of parameterisation: Song & Ermon anneal y = x_0 + σ z over σ_1 > … > σ_L and keep y
    between levels. Here y = x_t/√ᾱ_t (σ_t = √(1-ᾱ_t)/√ᾱ_t), written in the VP variable x_t so
    the state stays O(1) and the ε-network's score is used as is:
      * opts.langevin_steps steps x ← x + ε_t s(x, t) + √(2ε_t) z with ε_t = 2 α_t r² (1-ᾱ_t)
        (`annealed_step_size`, ∝ the noise level),
      * then the move to the next level keeps y: x ← x √(ᾱ_{t-1}/ᾱ_t) = x/√α_t,
      * after the last level the output is the denoised x̂_0 ≈ E[x_0 | x] at level 0
        (Tweedie's formula, the final denoising step of Song & Ermon 2020), clipped if configured.
    (Keeping x_t instead of y between levels collapsed the variance in a test on Gaussian data.)
    The algorithm's own weakness: at low noise its steps are tiny next to the data's spread, so
    the chain lags behind the annealing; on N(μ, 0.04 I) data with the exact score its output
    variance is 9% high with 5 steps × 1000 levels, 20% with 4 × 250 (tests/test_samplers.py).
    Returns (x at the next level, or x̂_0 after t = 0; x̂_0 at this level).
    """
    x = _corrector(diffusion, model_fn, guidance, x, t, key, opts, snr, False)
    model_output = guided_model_output(diffusion, model_fn(x, _original_t(diffusion, t)), x, t,
                                       guidance)
    pred_x0 = diffusion.p_mean_variance(model_output, x, t, opts.clip_denoised)['pred_x0']
    rescaled = x * jax.lax.rsqrt(1.0 - _coef(diffusion, 'betas', t, x))
    last = (t == 0).reshape(t.shape + (1,) * (x.ndim - 1))
    return jnp.where(last, pred_x0, rescaled), pred_x0


# ----------------------------------------------------------------------------------------------
# The chain and the jit plumbing
# ----------------------------------------------------------------------------------------------
def _constrain(x, mesh: Mesh | None, leading: int = 0):
    """Keep the batch axis (after `leading` unsharded axes) split over the mesh's 'data' axis."""
    if mesh is None:
        return x
    spec = P(*([None] * leading), sharding_lib.DATA_AXIS)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _run_chain(step, x, rng, start, stop, opts: _Options, num_timesteps: int):
    """Runs step(x, t, fold_in(rng, t)) for t = start, start-1, …, stop.

    Returns (x after step `stop`, progress buffer [len(opts.progress), B, ...] or None) where the
    buffer holds pred_x0 at the steps in opts.progress (in that order).
    """
    batch = x.shape[0]
    slots = np.full((num_timesteps,), -1, np.int32)
    for i, t in enumerate(opts.progress):
        slots[t] = i
    buf = None
    if opts.progress:
        buf = _constrain(jnp.zeros((len(opts.progress),) + x.shape, x.dtype), opts.mesh, 1)

    def body(i, carry):
        x, buf = carry
        t = jnp.asarray(start - i, jnp.int32)
        x, pred_x0 = step(x, jnp.full((batch,), t), jax.random.fold_in(rng, t))
        x = _constrain(x, opts.mesh)
        if buf is not None:
            # Write every step to a slot (a dummy write of the slot's own value where t is not
            # requested) so the update is one in-place dynamic_update_slice, not a select on buf.
            slot = jnp.asarray(slots)[t]
            idx = jnp.maximum(slot, 0)
            value = jnp.where(slot >= 0, pred_x0, buf[idx])
            buf = jax.lax.dynamic_update_index_in_dim(buf, value, idx, 0)
        return x, buf

    return jax.lax.fori_loop(0, start - stop + 1, body, (x, buf))


_DYNAMIC = object()  # marks a leaf position that is traced rather than static


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static:
    """The hashable part of a pytree: its structure and its non-array leaves."""

    def __init__(self, treedef, leaves):
        self.treedef = treedef
        self.leaves = tuple(leaves)
        # Unhashable leaves are compared by identity; this object keeps them alive, so their ids
        # are not reused while a jit cache entry refers to it.
        self._key = (treedef, tuple(_hash_key(leaf) for leaf in self.leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key

    def merge(self, dynamic):
        it = iter(dynamic)
        leaves = [next(it) if leaf is _DYNAMIC else leaf for leaf in self.leaves]
        return jax.tree.unflatten(self.treedef, leaves)


def _hash_key(leaf):
    if leaf is _DYNAMIC:
        return '<dynamic>'
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return ('<id>', id(leaf))


def _partition(tree):
    """(array leaves, _Static rest) of a pytree."""
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [leaf for leaf in leaves if _is_dynamic(leaf)]
    static = _Static(treedef, [_DYNAMIC if _is_dynamic(leaf) else leaf for leaf in leaves])
    return dynamic, static


def _check_batch(batch: int, mesh: Mesh | None, what: str):
    if mesh is not None and batch % mesh.devices.size:
        raise ValueError(f'{what}: batch {batch} is not divisible by the {mesh.devices.size} '
                         'devices of the mesh; use a multiple of the device count.')


def _options(diffusion, method, clip_denoised, langevin_steps, mesh, progress_steps=None,
             noise_repeat=1) -> _Options:
    if method not in METHODS:
        raise ValueError(f'method={method!r} is not a sampler; choose one of {", ".join(METHODS)}.')
    if int(langevin_steps) < 1 and method in ('langevin', 'pc'):
        raise ValueError(f'langevin_steps={langevin_steps} must be >= 1 for method={method!r}.')
    return _Options(method, bool(clip_denoised), int(langevin_steps), int(noise_repeat), mesh,
                    _progress_tuple(progress_steps, diffusion.num_timesteps))


def _progress_tuple(progress_steps, num_timesteps: int) -> tuple[int, ...]:
    if progress_steps is None:
        return ()
    if isinstance(progress_steps, str):
        if progress_steps != 'all':
            raise ValueError(f"progress_steps={progress_steps!r}: give step indices or 'all'.")
        progress_steps = range(num_timesteps)
    steps = sorted({int(t) for t in progress_steps}, reverse=True)
    if not steps or steps[-1] < 0 or steps[0] >= num_timesteps:
        raise ValueError(f'progress_steps must be step indices in [0, {num_timesteps}) of the '
                         f'(respaced) chain; got {list(progress_steps)[:8]}.')
    return tuple(steps)


@functools.partial(jax.jit, static_argnames=('static', 'opts', 'shape'))
def _sample_jit(dynamic, rng, x_T, eta, snr, *, static, opts, shape):
    diffusion, model_fn, guidance = static.merge(dynamic)
    k_init, k_chain = jax.random.split(rng)
    x = jax.random.normal(k_init, shape, jnp.float32) if x_T is None else x_T.astype(jnp.float32)
    x = _constrain(x, opts.mesh)
    step = _make_step(diffusion, model_fn, guidance, opts, eta, snr)
    last = diffusion.num_timesteps - 1
    x, buf = _run_chain(step, x, k_chain, last, 0, opts, diffusion.num_timesteps)
    out = dict(samples=x)
    if buf is not None:
        out['progressive'] = buf
    return out


def sample(diffusion, model_fn, rng, shape: Sequence[int], *, method: str = 'ancestral',
           eta: float = 0.0, clip_denoised: bool = True, x_T=None, progress_steps=None,
           guidance: ClassifierGuidance | None = None, langevin_snr: float = DEFAULT_SNR,
           langevin_steps: int = DEFAULT_LANGEVIN_STEPS, mesh: Mesh | None = None):
    """Samples x_0 by running the reverse chain from x_T ~ N(0, I) over every step of `diffusion`.

    Args:
      diffusion: a GaussianDiffusion, possibly respaced (diffusion.respace); its K steps are run.
      model_fn: (x_t [B, ...], t_original [B]) -> network output; best a pytree such as
        guidance.bind_model(apply, params) or guidance.classifier_free_model_fn(...).
      rng: a jax.random.key.
      shape: [B, ...] of the samples.
      method: 'ancestral' | 'ddim' | 'langevin' | 'pc' (see the module docstring).
      eta: DDIM's η (method='ddim'): σ_t = η √β̃_t.
      clip_denoised: clip x̂_0 to [-1, 1] in every step.
      x_T: optional [B, ...] starting noise (else drawn from rng).
      progress_steps: step indices of the chain (0 … K-1), or 'all', at which to keep x̂_0;
        returned in the order the chain visits them (descending t).
      guidance: classifier guidance (guidance.classifier_guidance), or None.
      langevin_snr: r of the Langevin step size ('langevin' and 'pc').
      langevin_steps: Langevin steps per level ('langevin') or corrector steps per step ('pc').
      mesh: shard the batch over this mesh's 'data' axis (sharding.make_mesh()).
    Returns:
      dict(samples=[B, ...] float32, progressive=[len(progress_steps), B, ...] if requested).
    """
    shape = tuple(int(s) for s in shape)
    _check_batch(shape[0], mesh, 'sample')
    opts = _options(diffusion, method, clip_denoised, langevin_steps, mesh, progress_steps)
    dynamic, static = _partition((diffusion, model_fn, guidance))
    return _sample_jit(dynamic, rng, x_T, jnp.float32(eta), jnp.float32(langevin_snr),
                       static=static, opts=opts, shape=shape)


@functools.partial(jax.jit, static_argnames=('static', 'opts'))
def _reverse_jit(dynamic, rng, x, start, stop, eta, snr, *, static, opts):
    diffusion, model_fn, guidance = static.merge(dynamic)
    step = _make_step(diffusion, model_fn, guidance, opts, eta, snr)
    x, _ = _run_chain(step, _constrain(x, opts.mesh), rng, start, stop, opts,
                      diffusion.num_timesteps)
    return x


def reverse_from(diffusion, model_fn, rng, x_t, start, *, stop=0, method: str = 'ancestral',
                 eta: float = 0.0, clip_denoised: bool = True,
                 guidance: ClassifierGuidance | None = None, langevin_snr: float = DEFAULT_SNR,
                 langevin_steps: int = DEFAULT_LANGEVIN_STEPS, mesh: Mesh | None = None,
                 noise_repeat: int = 1):
    """Runs the reverse chain's steps start, start-1, …, stop from x_t [B, ...] (at level start).

    stop = 0 gives x_0; stop = s + 1 gives x_s. start and stop are traced: one compile serves
    every start. noise_repeat > 1 shares each step's noise among the noise_repeat equal groups of
    the batch (rows b, b + B/repeat, …). Returns [B, ...].
    """
    _check_batch(x_t.shape[0], mesh, 'reverse_from')
    if x_t.shape[0] % noise_repeat:
        raise ValueError(f'noise_repeat={noise_repeat} must divide the batch {x_t.shape[0]}.')
    opts = _options(diffusion, method, clip_denoised, langevin_steps, mesh,
                    noise_repeat=noise_repeat)
    dynamic, static = _partition((diffusion, model_fn, guidance))
    return _reverse_jit(dynamic, rng, jnp.asarray(x_t, jnp.float32), jnp.int32(start),
                        jnp.int32(stop), jnp.float32(eta), jnp.float32(langevin_snr),
                        static=static, opts=opts)


# ----------------------------------------------------------------------------------------------
# DDIM inversion and interpolation
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('static', 'clip_denoised', 'mesh'))
def _encode_jit(dynamic, x0, *, static, clip_denoised, mesh):
    diffusion, model_fn = static.merge(dynamic)
    batch = x0.shape[0]

    def body(j, x):
        t = jnp.full((batch,), j, jnp.int32)
        model_output = model_fn(x, _original_t(diffusion, t))
        x = ddim_encode_step(diffusion, model_output, x, t, clip_denoised=clip_denoised)
        return _constrain(x, mesh)

    return jax.lax.fori_loop(0, diffusion.num_timesteps, body, _constrain(x0, mesh))


def ddim_encode(diffusion, model_fn, x0, *, clip_denoised: bool = False, mesh: Mesh | None = None):
    """x_T of x_0 under the deterministic DDIM ODE (Song et al. 2021, Sec. 5.4), [B, ...].

    Runs `ddim_encode_step` for t = 0, …, K-1: x_0 (level 1) -> level ᾱ_{K-1}, where
    sample(method='ddim', eta=0, x_T=x_T, clip_denoised=False) starts, so decoding reconstructs
    x_0 up to the ε_θ(x_{t-1}, t) ≈ ε_θ(x_t, t) error of each step (small for many steps).
    """
    _check_batch(x0.shape[0], mesh, 'ddim_encode')
    dynamic, static = _partition((diffusion, model_fn))
    return _encode_jit(dynamic, jnp.asarray(x0, jnp.float32), static=static,
                       clip_denoised=bool(clip_denoised), mesh=mesh)


def slerp(z0, z1, lam):
    """Spherical interpolation sin((1-λ)θ)/sin θ · z0 + sin(λθ)/sin θ · z1 per example, θ the
    angle between z0 and z1 (Song et al. 2021, Sec. 5.3; Shoemake 1985); linear where θ ≈ 0.

    Shapes: z0, z1 [B, ...]; lam scalar or [B]. Returns [B, ...].
    """
    lam = jnp.reshape(jnp.asarray(lam, z0.dtype), (-1,) + (1,) * (z0.ndim - 1))
    cos = (jnp.sum(z0 * z1, axis=tuple(range(1, z0.ndim)), keepdims=True)
           / (_per_example_norm(z0) * _per_example_norm(z1)))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    safe = jnp.where(sin > 1e-6, sin, 1.0)
    spherical = (jnp.sin((1.0 - lam) * theta) * z0 + jnp.sin(lam * theta) * z1) / safe
    return jnp.where(sin > 1e-6, spherical, (1.0 - lam) * z0 + lam * z1)


def _flat_lambdas(lambdas, batch):
    lambdas = jnp.asarray(lambdas, jnp.float32)
    return lambdas, jnp.repeat(lambdas, batch)


def interpolate_ddim(diffusion, model_fn, x0_a, x0_b, lambdas, *, clip_denoised: bool = False,
                     mesh: Mesh | None = None, decode_model_fn=None):
    """DDIM interpolation (Song et al. 2021, Sec. 5.3): encode both images to x_T with the ODE,
    slerp the codes, decode each deterministically (η = 0).

    Shapes: x0_a, x0_b [B, ...]; lambdas [L]. Returns [L, B, ...] (λ = 0 reconstructs x0_a).
    model_fn serves the [2B] encoding batch (x0_a then x0_b) and, unless decode_model_fn is
    given, the [L·B] decoding batch (λ-major); a class-conditional model_fn binds labels of
    those batch sizes.
    """
    batch = x0_a.shape[0]
    codes = ddim_encode(diffusion, model_fn, jnp.concatenate([x0_a, x0_b]),
                        clip_denoised=clip_denoised, mesh=mesh)
    lambdas, lam = _flat_lambdas(lambdas, batch)
    num = lambdas.shape[0]
    z0 = jnp.tile(codes[:batch], (num,) + (1,) * (codes.ndim - 1))
    z1 = jnp.tile(codes[batch:], (num,) + (1,) * (codes.ndim - 1))
    x_T = slerp(z0, z1, lam)
    # η = 0 draws no noise: the key is a placeholder.
    out = sample(diffusion, decode_model_fn or model_fn, jax.random.key(0), x_T.shape,
                 method='ddim', eta=0.0, clip_denoised=clip_denoised, x_T=x_T,
                 mesh=mesh)['samples']
    return out.reshape((num, batch) + x0_a.shape[1:])


def interpolate_ddpm(diffusion, model_fn, rng, x0_a, x0_b, t: int, lambdas, *,
                     clip_denoised: bool = True, mesh: Mesh | None = None):
    """DDPM interpolation (Ho et al. 2020, Sec. 4.3): x_t, x'_t ~ q(x_t|x_0) with the same noise,
    x̄_t = (1-λ) x_t + λ x'_t, decoded by the ancestral chain from step t with each step's noise
    shared across λ, so the strip varies only with λ.

    Shapes: x0_a, x0_b [B, ...]; t a step index of the (respaced) chain; lambdas [L].
    Returns [L, B, ...].
    """
    batch = x0_a.shape[0]
    k_q, k_chain = jax.random.split(rng)
    noise = jax.random.normal(k_q, x0_a.shape, jnp.float32)
    tt = jnp.full((batch,), t, jnp.int32)
    x_a, x_b = diffusion.q_sample(x0_a, tt, noise), diffusion.q_sample(x0_b, tt, noise)
    lambdas, lam = _flat_lambdas(lambdas, batch)
    num = lambdas.shape[0]
    lam = lam.reshape((-1,) + (1,) * (x_a.ndim - 1))
    x_bar = ((1.0 - lam) * jnp.tile(x_a, (num,) + (1,) * (x_a.ndim - 1))
             + lam * jnp.tile(x_b, (num,) + (1,) * (x_b.ndim - 1)))
    out = reverse_from(diffusion, model_fn, k_chain, x_bar, t, clip_denoised=clip_denoised,
                       mesh=mesh, noise_repeat=num)
    return out.reshape((num, batch) + x0_a.shape[1:])


def same_xt_samples(diffusion, model_fn, rng, x_t, t: int, num_samples: int, *,
                    method: str = 'ancestral', eta: float = 1.0, clip_denoised: bool = True,
                    mesh: Mesh | None = None):
    """num_samples independent reverse chains from the same x_t (DDPM Fig. 7): samples of
    p_θ(x_0 | x_t). x_t [B, ...] at step t of the chain; returns [num_samples, B, ...]."""
    x = jnp.tile(jnp.asarray(x_t, jnp.float32), (num_samples,) + (1,) * (x_t.ndim - 1))
    out = reverse_from(diffusion, model_fn, rng, x, t, method=method, eta=eta,
                       clip_denoised=clip_denoised, mesh=mesh)
    return out.reshape((num_samples,) + x_t.shape)


# ----------------------------------------------------------------------------------------------
# Langevin correction alone
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('static', 'opts', 'adaptive'))
def _correct_jit(dynamic, rng, x, t, snr, *, static, opts, adaptive):
    diffusion, model_fn, guidance = static.merge(dynamic)
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    return _corrector(diffusion, model_fn, guidance, _constrain(x, opts.mesh), tt, rng, opts, snr,
                      adaptive)


def langevin_correct(diffusion, model_fn, rng, x_t, t, *, n_steps: int, snr: float = DEFAULT_SNR,
                     adaptive: bool = True, guidance: ClassifierGuidance | None = None,
                     mesh: Mesh | None = None):
    """n_steps Langevin steps at level t targeting q(x_t) through s = -ε_θ/√(1-ᾱ_t).

    adaptive: the SNR step size of Song et al. 2021 (the 'pc' corrector); else the fixed
    ε_t = 2 α_t r² (1-ᾱ_t) of the 'langevin' sampler. Shapes: x_t [B, ...]; returns [B, ...].
    """
    _check_batch(x_t.shape[0], mesh, 'langevin_correct')
    opts = _Options(method='pc', langevin_steps=int(n_steps), mesh=mesh)
    dynamic, static = _partition((diffusion, model_fn, guidance))
    return _correct_jit(dynamic, rng, jnp.asarray(x_t, jnp.float32), jnp.int32(t),
                        jnp.float32(snr), static=static, opts=opts, adaptive=bool(adaptive))

