"""The chain runners and their jit plumbing: `sample`, `reverse_from`, `langevin_correct`.

Every sampler walks the steps t = start, …, stop of a (possibly respaced) GaussianDiffusion in
one lax.fori_loop inside jit, carrying its registered state (x and, for the multistep solvers,
the previous x̂_0), so memory does not grow with K, and calls the network as
model_fn(x_t, timestep_map[t]) through diffusion.wrap_model: the model always sees the original
timesteps it was trained on.

Compilation. The jitted entry points split their pytree arguments (the diffusion, model_fn,
guidance) into array leaves, which are traced, and everything else, which is static and hashed.
A model_fn built with `guidance.bind_model(apply, params)` (a jax.tree_util.Partial) therefore
compiles once per (method, options, step count, batch shape) and is reused for new parameters,
new labels, new η and new guidance scales; a lambda closing over parameters compiles again each
time a new lambda is passed. Randomness: the noise of step t is drawn from fold_in(rng, t), so it
does not depend on the sharding, and two samplers given the same rng see the same noise at each t.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import guidance as guidance_lib
from diffusion_jax import respace as respace_lib
from diffusion_jax.cold import ColdDiffusion
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import common
from diffusion_jax.samplers.static import check_batch, partition  # noqa: F401  (the old names)
from diffusion_jax.samplers import langevin as langevin_lib
from diffusion_jax.samplers.common import DEFAULT_LANGEVIN_STEPS, DEFAULT_SNR, Context, Options
from diffusion_jax.samplers.registry import get_sampler


def run_chain(ctx: Context, x, rng, start, stop):
    """Runs the registered step of ctx.opts.method for t = start, start-1, …, stop.

    Returns (x after step `stop`, progress buffer [len(opts.progress), B, ...] or None) where the
    buffer holds pred_x0 at the steps in opts.progress (in that order).
    """
    opts = ctx.opts
    spec = get_sampler(opts.method)
    batch = x.shape[0]
    slots = np.full((ctx.diffusion.num_timesteps,), -1, np.int32)
    for i, t in enumerate(opts.progress):
        slots[t] = i
    buf = None
    if opts.progress:
        buf = common.constrain(jnp.zeros((len(opts.progress),) + x.shape, x.dtype), opts.mesh, 1)

    def keep_sharded(leaf):
        return common.constrain(leaf, opts.mesh) if leaf.ndim == x.ndim else leaf

    def body(i, carry):
        state, buf, previous_x0 = carry
        t = jnp.asarray(start - i, jnp.int32)
        step_ctx = ctx
        if opts.self_condition:
            step_ctx = ctx._replace(model_fn=common.with_previous_x0(ctx.model_fn, previous_x0))
        state, pred_x0 = spec.step(step_ctx, state, jnp.full((batch,), t),
                                   jax.random.fold_in(rng, t))
        state = jax.tree.map(keep_sharded, state)
        if opts.self_condition:
            previous_x0 = keep_sharded(pred_x0.astype(x.dtype))
        if buf is not None:
            # Write every step to a slot (a dummy write of the slot's own value where t is not
            # requested) so the update is one in-place dynamic_update_slice, not a select on buf.
            slot = jnp.asarray(slots)[t]
            idx = jnp.maximum(slot, 0)
            value = jnp.where(slot >= 0, pred_x0, buf[idx])
            buf = jax.lax.dynamic_update_index_in_dim(buf, value, idx, 0)
        return state, buf, previous_x0

    # The x̂_0 fed to the first step is zeros (Chen et al. 2022, Algorithm 2).
    previous_x0 = jnp.zeros_like(x) if opts.self_condition else None
    state, buf, _ = jax.lax.fori_loop(0, start - stop + 1, body,
                                      (spec.init(ctx, x), buf, previous_x0))
    return state['x'], buf


def make_options(diffusion, method, clip_denoised, langevin_steps, mesh, progress_steps=None,
                 noise_repeat=1, ddim_guidance='auto',
                 dynamic_threshold=0.0, consistency=None, self_condition=False,
                 step_interval=False) -> Options:
    """The static Options of a call, validated (ValueError naming the sampling.* field)."""
    get_sampler(method)  # raises with the registered names
    from diffusion_jax.samplers import consistency as consistency_lib  # pylint: disable=import-outside-toplevel
    if int(langevin_steps) < 1 and method in ('langevin', 'pc'):
        raise ValueError(f'sampling.langevin_steps={langevin_steps} must be >= 1 for '
                         f'method={method!r}.')
    if ddim_guidance not in common.DDIM_GUIDANCE:
        raise ValueError(f'sampling.ddim_guidance={ddim_guidance!r} is not valid; choose one of '
                         f'{", ".join(common.DDIM_GUIDANCE)}.')
    if not 0.0 <= float(dynamic_threshold) < 1.0:
        raise ValueError(f'sampling.dynamic_threshold={dynamic_threshold} must be a quantile in '
                         '[0, 1): 0 turns it off, Saharia et al. use 0.995.')
    return Options(method, bool(clip_denoised), int(langevin_steps), int(noise_repeat), mesh,
                   _progress_tuple(progress_steps, diffusion.num_timesteps), str(ddim_guidance),
                   float(dynamic_threshold), consistency_lib.check_options(method, consistency),
                   bool(self_condition), bool(step_interval))


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


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('static', 'opts', 'shape'))
def _sample_jit(dynamic, rng, x_T, eta, snr, *, static, opts, shape):
    diffusion, model_fn, guidance = static.merge(dynamic)
    k_init, k_chain = jax.random.split(rng)
    x = jax.random.normal(k_init, shape, jnp.float32) if x_T is None else x_T.astype(jnp.float32)
    ctx = common.context(diffusion, model_fn, guidance, opts, eta, snr)
    x, buf = run_chain(ctx, common.constrain(x, opts.mesh), k_chain, diffusion.num_timesteps - 1, 0)
    out = dict(samples=x)
    if buf is not None:
        out['progressive'] = buf
    return out


def sample(diffusion, model_fn, rng, shape: Sequence[int], *, method: str = 'ancestral',
           eta: float = 0.0, clip_denoised: bool = True, x_T=None, progress_steps=None,
           guidance=None, langevin_snr: float = DEFAULT_SNR,
           langevin_steps: int = DEFAULT_LANGEVIN_STEPS, mesh: Mesh | None = None,
           ddim_guidance: str = 'auto', dynamic_threshold: float = 0.0,
           num_steps=None, consistency=None, self_condition: bool = False, **process_options):
    """Samples x_0 by running the reverse chain from x_T ~ N(0, I) over every step of `diffusion`.

    Args:
      diffusion: a GaussianDiffusion, possibly respaced (diffusion.respace); its K steps are run.
        Or a process (diffusion_jax.processes): a GaussianProcess runs its diffusion here; a
        continuous one ('flow', 'edm') runs samplers.process_solvers.sample with num_steps = K,
        x_T, clip_denoised, mesh and process_options (grid, s_churn, s_tmin, s_tmax, s_noise).
      num_steps: for a process only: K (for a GaussianProcess a spacing of
        respace.space_timesteps; None keeps its steps).
      model_fn: (x_t [B, ...], t_original [B]) -> network output (ε, x0 or v; 2C channels with a
        learned variance); best a pytree such as guidance.bind_model(apply, params) or
        guidance.classifier_free_model_fn(...).
      rng: a jax.random.key.
      shape: [B, ...] of the samples.
      method: a registered sampler (samplers.METHODS; the table in samplers/__init__.py).
      eta: DDIM's η (method='ddim'): σ_t = η √β̃_t.
      clip_denoised: clip x̂_0 to [-1, 1] in every step (every method).
      x_T: optional [B, ...] starting noise (else drawn from rng).
      progress_steps: step indices of the chain (0 … K-1), or 'all', at which to keep x̂_0;
        returned in the order the chain visits them (descending t).
      guidance: classifier guidance (guidance.classifier_guidance), or None.
      langevin_snr: r of the Langevin step size ('langevin' and 'pc').
      langevin_steps: Langevin steps per level ('langevin') or corrector steps per step ('pc').
      mesh: shard the batch over this mesh's 'data' axis (sharding.make_mesh()).
      ddim_guidance: how classifier guidance and clipping compose in every method that makes
        x̂_0 ('condition_score': guided-diffusion's; 'eps_shift': DPM-Solver++'s and diffusers';
        'auto', the default: the method's reference; samplers.common).
      dynamic_threshold: Imagen's percentile p of dynamic thresholding of x̂_0; 0 = off.
      consistency: (σ_min, σ_data) of a consistency model (method='consistency'; the σ's of
        its steps are those of the respaced chain, e.g. num_steps='trailing2').
      self_condition: a self-conditioned network (training.self_condition; Chen et al. 2022):
        every call of step k is model_fn(x, t, self_cond=x̂_0 of step k-1) (the step's returned,
        clipped/guided x̂_0), zeros at the first step. model_fn must take the keyword
        (guidance.bind_model and classifier_free_model_fn do).
    Returns:
      dict(samples=[B, ...] float32, progressive=[len(progress_steps), B, ...] if requested).
    """
    if not isinstance(diffusion, (GaussianDiffusion, ColdDiffusion)):
        diffusion = _from_process(diffusion, num_steps)
        if not isinstance(diffusion, GaussianDiffusion):  # a continuous process
            from diffusion_jax.samplers import process_solvers  # pylint: disable=import-outside-toplevel
            if guidance is not None:
                raise ValueError('classifier guidance runs on the gaussian process only; '
                                 'set sampling.classifier_scale=0.')
            chain_only = dict(eta=(eta, 0.0), dynamic_threshold=(dynamic_threshold, 0.0),
                              ddim_guidance=(ddim_guidance, 'auto'),
                              progress_steps=(progress_steps, None))
            for field, (value, off) in chain_only.items():
                if value != off:
                    raise ValueError(f'{field}={value!r} applies to the gaussian chain only, not '
                                     f'to the {diffusion.name!r} process; leave it at {off!r}.')
            return process_solvers.sample(
                diffusion, model_fn, rng, shape, method=method,
                num_steps=18 if num_steps is None else num_steps, x_T=x_T,
                clip_denoised=clip_denoised, mesh=mesh, self_condition=self_condition,
                **process_options)
    elif num_steps is not None or process_options:
        raise ValueError('num_steps and process options apply to a process; respace a '
                         'GaussianDiffusion with diffusion.respace instead.')
    shape = tuple(int(s) for s in shape)
    check_batch(shape[0], mesh, 'sample')
    opts = make_options(diffusion, method, clip_denoised, langevin_steps, mesh, progress_steps,
                        ddim_guidance=ddim_guidance, dynamic_threshold=dynamic_threshold,
                        consistency=consistency, self_condition=self_condition,
                        step_interval=guidance_lib.has_interval(model_fn))
    dynamic, static = partition((diffusion, model_fn, guidance))
    return _sample_jit(dynamic, rng, x_T, jnp.float32(eta), jnp.float32(langevin_snr),
                       static=static, opts=opts, shape=shape)


def _from_process(process, num_steps):
    """The GaussianDiffusion of a GaussianProcess (respaced by num_steps), else the process."""
    inner = getattr(process, 'diffusion', None)
    if not isinstance(inner, GaussianDiffusion):
        return process
    if num_steps in (None, ''):
        return inner
    return inner.respace(respace_lib.space_timesteps(inner.num_timesteps, num_steps,
                                                     np.asarray(inner.alphas_cumprod)))


@functools.partial(jax.jit, static_argnames=('static', 'opts'))
def _reverse_jit(dynamic, rng, x, start, stop, eta, snr, *, static, opts):
    diffusion, model_fn, guidance = static.merge(dynamic)
    ctx = common.context(diffusion, model_fn, guidance, opts, eta, snr)
    x, _ = run_chain(ctx, common.constrain(x, opts.mesh), rng, start, stop)
    return x


def reverse_from(diffusion, model_fn, rng, x_t, start, *, stop=0, method: str = 'ancestral',
                 eta: float = 0.0, clip_denoised: bool = True, guidance=None,
                 langevin_snr: float = DEFAULT_SNR, langevin_steps: int = DEFAULT_LANGEVIN_STEPS,
                 mesh: Mesh | None = None, noise_repeat: int = 1,
                 ddim_guidance: str = 'auto', dynamic_threshold: float = 0.0,
                 self_condition: bool = False):
    """Runs the reverse chain's steps start, start-1, …, stop from x_t [B, ...] (at level start).

    stop = 0 gives x_0; stop = s + 1 gives x_s. start and stop are traced: one compile serves
    every start (a multistep solver starts its history afresh at `start`). noise_repeat > 1 shares
    each step's noise among the noise_repeat equal groups of the batch (rows b, b + B/repeat, …).
    self_condition: as `sample`: step `start` is fed zeros, every later step the x̂_0 of the
    step before. Returns [B, ...].
    """
    check_batch(x_t.shape[0], mesh, 'reverse_from')
    if x_t.shape[0] % noise_repeat:
        raise ValueError(f'noise_repeat={noise_repeat} must divide the batch {x_t.shape[0]}.')
    opts = make_options(diffusion, method, clip_denoised, langevin_steps, mesh,
                        noise_repeat=noise_repeat, ddim_guidance=ddim_guidance,
                        dynamic_threshold=dynamic_threshold, self_condition=self_condition,
                        step_interval=guidance_lib.has_interval(model_fn))
    dynamic, static = partition((diffusion, model_fn, guidance))
    return _reverse_jit(dynamic, rng, jnp.asarray(x_t, jnp.float32), jnp.int32(start),
                        jnp.int32(stop), jnp.float32(eta), jnp.float32(langevin_snr),
                        static=static, opts=opts)


@functools.partial(jax.jit, static_argnames=('static', 'opts', 'adaptive'))
def _correct_jit(dynamic, rng, x, t, snr, *, static, opts, adaptive):
    diffusion, model_fn, guidance = static.merge(dynamic)
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    ctx = common.context(diffusion, model_fn, guidance, opts, jnp.float32(0.0), snr)
    return langevin_lib.corrector(ctx, common.constrain(x, opts.mesh), tt, rng, adaptive)


def langevin_correct(diffusion, model_fn, rng, x_t, t, *, n_steps: int, snr: float = DEFAULT_SNR,
                     adaptive: bool = True, guidance=None, mesh: Mesh | None = None):
    """n_steps Langevin steps at level t targeting q(x_t) through s = -ε_θ/√(1-ᾱ_t).

    adaptive: the SNR step size of Song et al. 2021 (the 'pc' corrector); else the fixed
    ε_t = 2 α_t r² (1-ᾱ_t) of the 'langevin' sampler. Shapes: x_t [B, ...]; returns [B, ...].
    """
    check_batch(x_t.shape[0], mesh, 'langevin_correct')
    opts = Options(method='pc', langevin_steps=int(n_steps), mesh=mesh)
    dynamic, static = partition((diffusion, model_fn, guidance))
    return _correct_jit(dynamic, rng, jnp.asarray(x_t, jnp.float32), jnp.int32(t),
                        jnp.float32(snr), static=static, opts=opts, adaptive=bool(adaptive))
