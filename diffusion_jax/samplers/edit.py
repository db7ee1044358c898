"""Editing real images with a trained (respaced) GaussianDiffusion: RePaint inpainting, SDEdit
and DDIM-inversion edits. Sampling with constraints: each is a function of the chain's steps
over the run's diffusion and model_fn, so any sampler option (clipping, classifier or
classifier-free guidance via model_fn / guidance) carries over.

  repaint    Lugmayr et al. 2022, Algorithm 1 with the resampling schedule of their Sec. 4.2:
             at every step the known region (mask = 1) is x_{t-1}^known ~ q(x_{t-1} | x_0) of the
             input, the unknown one the reverse step x_{t-1}^unknown ~ p_θ(x_{t-1} | x_t), and
             x_{t-1} = m ⊙ known + (1 - m) ⊙ unknown; every jump_length steps the chain jumps back
             jump_length steps by forward noising, x_t ~ N(√(1-β_t) x_{t-1}, β_t I), one step at a
             time, jump_n_sample - 1 times, so the two regions harmonise. At t = 0 the known
             region is x_0 itself: the kept pixels of the output equal the input exactly.
  sdedit     Meng et al. 2022: x_{t0} ~ q(x_{t0} | x_input) at t0 = ceil(strength · K) - 1 of the
             K-step chain, then the run's sampler from t0 down to 0. strength ∈ (0, 1]; its
             smallest value 1/K starts from level ᾱ_0 ≈ 1 (one step).
  ddim_edit  DDIM inversion (editing.ddim_encode) of the input to x_T, then the deterministic
             DDIM decoder (η = 0) with another model_fn: another class label (classifier-free or
             conditional), another guidance scale. The unchanged decode (reconstruction) and its
             error, the inversion's own, come with it.

On a continuous process (diffusion_jax.processes 'flow', 'edm'; given as `diffusion` with
num_steps = K) each function runs its process form, samplers/process_edit.py: the same
constructions on the process's grid, marginals and x̂_0. A GaussianProcess runs its diffusion
(respaced by num_steps when given).

Conditions (class labels, a text context {'context': [B, L, D], 'mask': [B, L]}, classifier-free
guidance) are bound into model_fn as for the samplers (guidance.bind_model,
guidance.classifier_free_model_fn); classifier guidance is `guidance` (the Gaussian chain only).

Masks: 1 = keep (known), 0 = generate. The named masks name the region that is generated:
'right_half' inpaints the right half.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.samplers import ancestral, chain, common, editing, process_edit
from diffusion_jax.samplers.edit_schedule import repaint_schedule, sdedit_start

MASKS = ('right_half', 'left_half', 'top_half', 'center')


def _target(diffusion, num_steps, guidance=None):
    """(GaussianDiffusion or None, continuous process or None) of an edit's `diffusion`."""
    if isinstance(diffusion, GaussianDiffusion):
        if num_steps is not None:
            raise ValueError('num_steps applies to a process; respace a GaussianDiffusion with '
                             'diffusion.respace instead.')
        return diffusion, None
    inner = chain._from_process(diffusion, num_steps)  # pylint: disable=protected-access
    if isinstance(inner, GaussianDiffusion):
        return inner, None
    if guidance is not None:
        raise ValueError('classifier guidance runs on the gaussian process only; set '
                         'sampling.classifier_scale=0.')
    return None, inner


def _refuse_self_condition(process, self_condition: bool) -> None:
    """The flow/EDM edit chains (process_edit) do not feed x̂_0 back: a self-conditioned network
    would be run without its second input's meaning, so it is refused."""
    if self_condition:
        raise ValueError(f'training.self_condition=True: editing a self-conditioned '
                         f'{process.name} run is not supported (the flow/EDM edit chains do not '
                         'feed x̂_0 back); edit a gaussian run, or one trained without it.')


def _as_mask(mask, x0):
    mask = jnp.asarray(mask, jnp.float32)
    try:
        return jnp.broadcast_to(mask, x0.shape)
    except ValueError as err:
        raise ValueError(f'edit.mask of shape {tuple(mask.shape)} does not fit the images '
                         f'{tuple(x0.shape)}: give [N, H, W, 1] or [N, H, W, C].') from err


def make_mask(spec: str, shape, rng: np.random.Generator | None = None) -> np.ndarray:
    """A mask [N, H, W, 1] (float32, 1 = keep) for images of shape [N, H, W, C].

    spec: 'right_half' | 'left_half' | 'top_half' (that half is generated), 'center' (the centre
    square of half the side), or 'random:<fraction>' (each pixel generated with probability
    fraction, independently per image; rng seeds it).
    """
    n, height, width = int(shape[0]), int(shape[1]), int(shape[2])
    keep = np.ones((height, width), np.float32)
    if spec == 'right_half':
        keep[:, width // 2:] = 0
    elif spec == 'left_half':
        keep[:, :width - width // 2] = 0
    elif spec == 'top_half':
        keep[:height // 2] = 0
    elif spec == 'center':
        h0, w0 = height // 4, width // 4
        keep[h0:h0 + height - 2 * h0, w0:w0 + width - 2 * w0] = 0
    elif isinstance(spec, str) and spec.startswith('random:'):
        try:
            fraction = float(spec.split(':', 1)[1])
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"edit.mask={spec!r}: 'random:<fraction>' needs a fraction in (0, 1) "
                             "of pixels to generate, e.g. 'random:0.5'.")
        rng = rng if rng is not None else np.random.default_rng(0)
        return (rng.random((n, height, width, 1)) >= fraction).astype(np.float32)
    else:
        raise ValueError(f'edit.mask={spec!r} is not a mask; choose one of {", ".join(MASKS)}, '
                         "'random:<fraction>' or an .npz of masks (1 = keep).")
    return np.broadcast_to(keep[None, :, :, None], (n, height, width, 1)).copy()


# ----------------------------------------------------------------------------------------------
# RePaint
# ----------------------------------------------------------------------------------------------
def _repaint_step(ctx, x, x0, mask, level, up, key, previous_x0):
    """One move of the RePaint chain from `level` (x at level ᾱ_level; -1 = data): up to level+1
    by forward noising, or down by the reverse step at `level` with the known region pasted.
    Returns (x, the x̂_0 to feed the next reverse step): a reverse step's own x̂_0, unchanged by
    a forward move (self-conditioning; previous_x0 is None without it)."""
    d = ctx.diffusion
    k_step, k_known = jax.random.split(key)
    t = jnp.full((x.shape[0],), level, jnp.int32)

    def forward(_):
        t_up = t + 1
        noise = jax.random.normal(k_step, x.shape, x.dtype)
        beta = common.coef(d, 'betas', t_up, x)
        return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise, previous_x0

    def reverse(_):
        model_fn = ctx.model_fn
        if previous_x0 is not None:
            model_fn = common.with_previous_x0(model_fn, previous_x0)
        out = ancestral.ancestral_step(d, model_fn(x, t), x, t,
                                       jax.random.normal(k_step, x.shape, x.dtype),
                                       clip_denoised=ctx.opts.clip_denoised,
                                       guidance=ctx.guidance)
        # q(x_{t-1} | x_0); at t = 0 the coefficients are 1 and 0: x_0 itself.
        known = (common.coef(d, 'sqrt_alphas_cumprod_prev', t, x) * x0
                 + jnp.sqrt(common.coef(d, 'one_minus_alphas_cumprod_prev', t, x))
                 * jax.random.normal(k_known, x.shape, x.dtype))
        fed = None if previous_x0 is None else out['pred_x0'].astype(x.dtype)
        return mask * known + (1.0 - mask) * out['sample'], fed

    return jax.lax.cond(up, forward, reverse, None)


@functools.partial(jax.jit, static_argnames=('static', 'opts'))
def _repaint_jit(dynamic, rng, x0, mask, levels, *, static, opts):
    diffusion, model_fn, guidance = static.merge(dynamic)
    # common.context: the network sees the original timesteps of a respaced chain.
    ctx = common.context(diffusion, model_fn, guidance, opts, jnp.float32(0.0), jnp.float32(0.0))
    k_init, k_chain = jax.random.split(rng)
    x = jax.random.normal(k_init, x0.shape, jnp.float32)

    def body(i, carry):
        x, previous_x0 = carry
        level, nxt = levels[i], levels[i + 1]
        x, previous_x0 = _repaint_step(ctx, x, x0, mask, level, nxt > level,
                                       jax.random.fold_in(k_chain, i), previous_x0)
        keep = lambda a: common.constrain(a, opts.mesh)  # noqa: E731
        return keep(x), (None if previous_x0 is None else keep(previous_x0))

    # Self-conditioning feeds zeros to the first reverse step (Chen et al. 2022, Algorithm 2).
    previous_x0 = jnp.zeros_like(x0) if opts.self_condition else None
    x, _ = jax.lax.fori_loop(0, levels.shape[0] - 1, body,
                             (common.constrain(x, opts.mesh), previous_x0))
    # Binary masks make this the identity; it also pins the known pixels for soft ones.
    return jnp.where(mask >= 1.0, x0, x)


def repaint(diffusion, model_fn, rng, x0, mask, *, jump_length: int = 10,
            jump_n_sample: int = 10, clip_denoised: bool = True, guidance=None,
            mesh: Mesh | None = None, num_steps=None, self_condition: bool = False):
    """RePaint inpainting (Lugmayr et al. 2022) of x0 [B, ...] where mask == 0.

    mask: broadcastable to x0 (e.g. [B, H, W, 1]), 1 = keep. jump_length, jump_n_sample: the
    resampling (their defaults, j = 10 and r = 10 over T = 250, are this function's; 1 and 1 is
    the plain chain with pasting). Network calls: K + (jump_n_sample - 1) · jump_length · ⌊(K -
    1)/jump_length⌋ reverse steps. diffusion: a GaussianDiffusion, or a process with num_steps
    = K (process_edit.repaint). self_condition: a self-conditioned network (Chen et al. 2022):
    each reverse step is fed the x̂_0 of the reverse step before it (forward jumps keep it),
    zeros at the first. Returns [B, ...] with the kept pixels equal to x0 exactly.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    mask = _as_mask(mask, x0)
    diffusion, process = _target(diffusion, num_steps, guidance)
    if process is not None:
        _refuse_self_condition(process, self_condition)
        return process_edit.repaint(process, model_fn, rng, x0, mask,
                                    num_steps=18 if num_steps is None else num_steps,
                                    jump_length=jump_length, jump_n_sample=jump_n_sample,
                                    clip_denoised=clip_denoised, mesh=mesh)
    chain.check_batch(x0.shape[0], mesh, 'repaint')
    levels = jnp.asarray(repaint_schedule(diffusion.num_timesteps, int(jump_length),
                                          int(jump_n_sample)))
    opts = chain.make_options(diffusion, 'ancestral', clip_denoised, 1, mesh,
                              self_condition=self_condition)
    dynamic, static = chain.partition((diffusion, model_fn, guidance))
    return _repaint_jit(dynamic, rng, x0, mask, levels, static=static, opts=opts)


# ----------------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------------
def sdedit(diffusion, model_fn, rng, x_input, strength: float, *, method: str = 'ancestral',
           eta: float = 0.0, clip_denoised: bool = True, guidance=None,
           mesh: Mesh | None = None, num_steps=None, self_condition: bool = False,
           **solver_options):
    """SDEdit (Meng et al. 2022): x_{t0} = √ᾱ_{t0} x_input + √(1-ᾱ_{t0}) ε, then the sampler
    `method` from t0 = sdedit_start(K, strength) to 0. x_input [B, ...]; returns [B, ...].
    On a process (num_steps = K): process_edit.sdedit, method 'ancestral' or a process solver
    (solver_options: its churn). self_condition: feed each step the previous step's x̂_0, zeros
    at t0 (chain.reverse_from)."""
    diffusion, process = _target(diffusion, num_steps, guidance)
    if process is not None:
        _refuse_self_condition(process, self_condition)
        process_edit.check_sdedit_method(process, method)
        return process_edit.sdedit(process, model_fn, rng, x_input, strength,
                                   num_steps=18 if num_steps is None else num_steps,
                                   method=method, clip_denoised=clip_denoised, mesh=mesh,
                                   **solver_options)
    t0 = sdedit_start(diffusion.num_timesteps, strength)
    k_noise, k_chain = jax.random.split(rng)
    x_input = jnp.asarray(x_input, jnp.float32)
    t = jnp.full((x_input.shape[0],), t0, jnp.int32)
    x_t = diffusion.q_sample(x_input, t, jax.random.normal(k_noise, x_input.shape, jnp.float32))
    return chain.reverse_from(diffusion, model_fn, k_chain, x_t, t0, method=method, eta=eta,
                              clip_denoised=clip_denoised, guidance=guidance, mesh=mesh,
                              self_condition=self_condition)


# ----------------------------------------------------------------------------------------------
# DDIM edits
# ----------------------------------------------------------------------------------------------
def ddim_edit(diffusion, model_fn, x_input, *, edit_model_fn=None, edit_guidance=None,
              inversion: str = 'reference', clip_denoised: bool = False,
              mesh: Mesh | None = None, num_steps=None, self_condition: bool = False) -> dict:
    """Invert x_input [B, ...] with model_fn (DDIM, η = 0) and decode the code with
    edit_model_fn (another label or guidance scale; None: model_fn) and edit_guidance.

    Returns dict(edited [B, ...], reconstruction [B, ...] (decoded with model_fn: what the
    inversion alone gives back), codes [B, ...], reconstruction_error [B] (RMS of
    reconstruction - x_input per example)). With no change, edited == reconstruction.
    On a process (num_steps = K): process_edit.ddim_edit (its 'reference'-convention inversion).
    self_condition: a self-conditioned network: the inversion and the decoder each feed every
    step the previous step's x̂_0, zeros at their first (editing.ddim_encode, chain.sample).
    """
    diffusion, process = _target(diffusion, num_steps, edit_guidance)
    if process is not None:
        _refuse_self_condition(process, self_condition)
        if inversion != 'reference':
            raise ValueError(f'sampling.inversion={inversion!r}: a {process.name} process '
                             "inverts with the 'reference' convention only; set it so.")
        return process_edit.ddim_edit(process, model_fn, x_input,
                                      num_steps=18 if num_steps is None else num_steps,
                                      edit_model_fn=edit_model_fn, clip_denoised=clip_denoised,
                                      mesh=mesh)
    x_input = jnp.asarray(x_input, jnp.float32)
    codes = editing.ddim_encode(diffusion, model_fn, x_input, clip_denoised=clip_denoised,
                                mesh=mesh, inversion=inversion, self_condition=self_condition)
    decode = lambda fn, guidance: chain.sample(  # noqa: E731
        diffusion, fn, jax.random.key(0), codes.shape, method='ddim', eta=0.0,
        clip_denoised=clip_denoised, x_T=codes, guidance=guidance, mesh=mesh,
        self_condition=self_condition)['samples']
    reconstruction = decode(model_fn, None)
    if edit_model_fn is None and edit_guidance is None:
        edited = reconstruction
    else:
        edited = decode(edit_model_fn if edit_model_fn is not None else model_fn, edit_guidance)
    err = jnp.sqrt(jnp.mean(jnp.square(reconstruction - x_input),
                            axis=tuple(range(1, x_input.ndim))))
    return dict(edited=edited, reconstruction=reconstruction, codes=codes,
                reconstruction_error=err)
