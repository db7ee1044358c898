"""RePaint, SDEdit and DDIM edits on a continuous process (diffusion_jax.processes 'flow',
'edm'), written once on the process interface: its time grid t_0 > … > t_K = 0
(`process.time_grid(K)`), its marginals x_t = α(t) x_0 + σ(t) ε (`alpha_sigma`) and its x̂_0
(`process.denoise`). No function here reads a process's type; samplers/edit.py dispatches here
when given a process instead of a GaussianDiffusion.

Between two grid times s < t the marginals give the Gaussian transition and its posterior
(DDPM's q(x_{t-1} | x_t, x_0) in any process):
    α_{t|s} = α_t/α_s,   σ²_{t|s} = σ_t² - α_{t|s}² σ_s²,    x_t | x_s ~ N(α_{t|s} x_s, σ²_{t|s} I)
    x_s | x_t, x_0 ~ N(α_{t|s} σ_s²/σ_t² · x_t + α_s σ²_{t|s}/σ_t² · x_0,  σ²_{t|s} σ_s²/σ_t² I)
(flow's t = 1 has α_t = 0, so α_{t|s} = 0: the noise end forgets x_s, as it should).

  repaint    Lugmayr et al. 2022 over the grid: the reverse move t_j -> t_{j+1} samples the
             posterior at x̂_0 = denoise(x, t_j) (the ancestral step) for the unknown region and
             pastes q(x_{t_{j+1}} | x_0) = α x_0 + σ ε of the input in the known one; the
             resampling jumps t_{j+1} -> t_j by the forward transition. The schedule is
             samplers.repaint_schedule's (chain index i = K - 1 - j). At t_K = 0 the known
             region is x_0 itself.
  sdedit     x_{t_{j0}} = α x_in + σ ε at j0 = K - ceil(strength · K), then `method` over the grid's
             tail t_{j0} > … > 0: a process solver (process_solvers, e.g. 'euler', 'heun', 'ddim')
             or 'ancestral' (the posterior step above). strength = 1 starts at t_0 (the prior).
  ddim_edit  the order-1 (DDIM) inversion on the grid: x := x_in at t_{K-1} (the reference
             inversion's convention, samplers/editing.py), then for j = K-1 … 1
             x̂_0 = denoise(x, t_j), ε̂ = (x - α_j x̂_0)/σ_j, x ← α_{j-1} x̂_0 + σ_{j-1} ε̂; the
             code at t_0 is decoded by process_solvers' 'ddim' (DPM-Solver++ order 1 = DDIM).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import common, process_solvers
from diffusion_jax.samplers.edit_schedule import repaint_schedule, sdedit_start
from diffusion_jax.samplers.static import check_batch, partition

METHODS_EXTRA = ('ancestral',)  # sdedit's stochastic choice beside the process's solvers


def _grid(process, num_steps: int, grid=None) -> np.ndarray:
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f'edit.num_steps={num_steps} must be >= 1 for a {process.name} process.')
    return process.time_grid(num_steps) if grid is None else np.asarray(grid, np.float64)


def _coefs(process, t, s):
    """(α_{t|s}, σ²_{t|s}, α_s, σ_s, σ_t) of the transition s -> t (scalars, s < t)."""
    alpha_t, sigma_t = process.alpha_sigma(t)
    alpha_s, sigma_s = process.alpha_sigma(s)
    a_ts = alpha_t / alpha_s
    var_ts = jnp.maximum(sigma_t**2 - a_ts**2 * sigma_s**2, 0.0)
    return a_ts, var_ts, alpha_s, sigma_s, sigma_t


def posterior_step(process, x, x0_hat, t, s, noise):
    """x_s ~ q(x_s | x_t = x, x_0 = x̂_0) for grid times s < t (s may be 0). [B, ...]."""
    a_ts, var_ts, alpha_s, sigma_s, sigma_t = _coefs(process, t, s)
    mean = (a_ts * sigma_s**2 / sigma_t**2) * x + (alpha_s * var_ts / sigma_t**2) * x0_hat
    return mean + jnp.sqrt(var_ts * sigma_s**2 / sigma_t**2) * noise


def forward_step(process, x, s, t, noise):
    """x_t ~ q(x_t | x_s = x) = N(α_{t|s} x, σ²_{t|s} I), s < t. [B, ...]."""
    a_ts, var_ts, _, _, _ = _coefs(process, t, s)
    return a_ts * x + jnp.sqrt(var_ts) * noise


def _denoise(process, model_fn, x, t, clip):
    x0 = process.denoise(model_fn, x, jnp.full((x.shape[0],), t, jnp.float32))
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


# ----------------------------------------------------------------------------------------------
# RePaint
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('static', 'clip', 'mesh'))
def _repaint_jit(dynamic, rng, x0, mask, grid_idx, grid, *, static, clip, mesh):
    process, model_fn = static.merge(dynamic)
    k_init, k_chain = jax.random.split(rng)
    x = process.prior_sample(k_init, x0.shape).astype(jnp.float32)

    def body(i, x):
        j, nxt = grid_idx[i], grid_idx[i + 1]
        k_step, k_known = jax.random.split(jax.random.fold_in(k_chain, i))
        noise = jax.random.normal(k_step, x.shape, x.dtype)

        def forward(_):  # t_j -> t_{j-1} (the resampling jump), one grid step
            return forward_step(process, x, grid[j], grid[j - 1], noise)

        def reverse(_):  # t_j -> t_{j+1}: generated where mask = 0, the input's marginal where 1
            t, s = grid[j], grid[j + 1]
            unknown = posterior_step(process, x, _denoise(process, model_fn, x, t, clip), t, s,
                                     noise)
            alpha_s, sigma_s = process.alpha_sigma(s)
            known = alpha_s * x0 + sigma_s * jax.random.normal(k_known, x.shape, x.dtype)
            return mask * known + (1.0 - mask) * unknown

        return common.constrain(jax.lax.cond(nxt < j, forward, reverse, None), mesh)

    x = jax.lax.fori_loop(0, grid_idx.shape[0] - 1, body, common.constrain(x, mesh))
    return jnp.where(mask >= 1.0, x0, x)


def repaint(process, model_fn, rng, x0, mask, *, num_steps: int, jump_length: int = 10,
            jump_n_sample: int = 10, clip_denoised: bool = False, grid=None, mesh=None):
    """RePaint of x0 [B, ...] where mask == 0 (mask broadcastable to x0, 1 = keep) on the
    process's K-step grid. Returns [B, ...] with the kept pixels equal to x0 exactly."""
    grid = _grid(process, num_steps, grid)
    k = grid.shape[0] - 1
    levels = repaint_schedule(k, int(jump_length), int(jump_n_sample))
    check_batch(x0.shape[0], mesh, 'repaint')
    dynamic, static = partition((process, model_fn))
    return _repaint_jit(dynamic, rng, x0, mask, jnp.asarray(k - 1 - levels, jnp.int32),
                        jnp.asarray(grid, jnp.float32), static=static,
                        clip=bool(clip_denoised), mesh=mesh)


# ----------------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------------
def sdedit_index(num_steps: int, strength: float) -> int:
    """j0 = K - ceil(strength · K): the grid index SDEdit noises the input to (strength in
    (0, 1]; the chain index t0 = ceil(strength · K) - 1 of the Gaussian chain is K - 1 - j0)."""
    return int(num_steps) - 1 - sdedit_start(num_steps, strength)


@functools.partial(jax.jit, static_argnames=('static', 'clip', 'mesh'))
def _ancestral_jit(dynamic, rng, x, grid, *, static, clip, mesh):
    process, model_fn = static.merge(dynamic)

    def body(i, x):
        t, s = grid[i], grid[i + 1]
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x0 = _denoise(process, model_fn, x, t, clip)
        return common.constrain(jnp.where(s == 0, x0, posterior_step(process, x, x0, t, s, noise)),
                                mesh)

    return jax.lax.fori_loop(0, grid.shape[0] - 1, body, common.constrain(x, mesh))


def sdedit(process, model_fn, rng, x_input, strength: float, *, num_steps: int,
           method: str = 'euler', clip_denoised: bool = False, grid=None, mesh=None,
           **solver_options):
    """SDEdit on a process: x at t_{j0} = α x_in + σ ε, then `method` ('ancestral' or one of
    process.methods, with solver_options such as s_churn) down the grid's tail to 0.
    x_input [B, ...]; returns [B, ...]."""
    grid = _grid(process, num_steps, grid)
    k = grid.shape[0] - 1
    j0 = sdedit_index(k, strength)
    k_noise, k_chain = jax.random.split(rng)
    x_input = jnp.asarray(x_input, jnp.float32)
    alpha, sigma = process.alpha_sigma(jnp.float32(grid[j0]))
    x_t = alpha * x_input + sigma * jax.random.normal(k_noise, x_input.shape, jnp.float32)
    tail = grid[j0:]
    if method == 'ancestral':
        check_batch(x_input.shape[0], mesh, 'sdedit')
        dynamic, static = partition((process, model_fn))
        return _ancestral_jit(dynamic, k_chain, x_t, jnp.asarray(tail, jnp.float32),
                              static=static, clip=bool(clip_denoised), mesh=mesh)
    return process_solvers.sample(process, model_fn, k_chain, x_t.shape, method=method,
                                  num_steps=k - j0, x_T=x_t, grid=tail,
                                  clip_denoised=clip_denoised, mesh=mesh,
                                  **solver_options)['samples']


# ----------------------------------------------------------------------------------------------
# DDIM edits
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('static', 'mesh'))
def _invert_jit(dynamic, x0, grid, *, static, mesh):
    process, model_fn = static.merge(dynamic)
    k = grid.shape[0] - 1

    def body(n, x):
        j = k - 1 - n  # t_{K-1}, …, t_1 -> the next time up
        t, t_up = grid[j], grid[j - 1]
        x0_hat = _denoise(process, model_fn, x, t, False)
        eps = process.eps_from_x0(x0_hat, x, jnp.full((x.shape[0],), t, jnp.float32))
        alpha, sigma = process.alpha_sigma(t_up)
        return common.constrain(alpha * x0_hat + sigma * eps, mesh)

    return jax.lax.fori_loop(0, k - 1, body, common.constrain(x0, mesh))


def ddim_encode(process, model_fn, x0, *, num_steps: int, grid=None, mesh=None):
    """The code at t_0 of x0 [B, ...] under the order-1 (DDIM) inversion on the K-step grid
    (the module docstring); process_solvers' 'ddim' from it reconstructs x0 up to O(1/K)."""
    grid = _grid(process, num_steps, grid)
    check_batch(x0.shape[0], mesh, 'ddim_encode')
    dynamic, static = partition((process, model_fn))
    return _invert_jit(dynamic, jnp.asarray(x0, jnp.float32), jnp.asarray(grid, jnp.float32),
                       static=static, mesh=mesh)


def ddim_edit(process, model_fn, x_input, *, num_steps: int, edit_model_fn=None, grid=None,
              clip_denoised: bool = False, mesh=None) -> dict:
    """Invert x_input [B, ...] with model_fn and decode the code with edit_model_fn (another
    label, context or guidance scale; None: model_fn) by the 'ddim' solver on the same grid.
    Returns dict(edited, reconstruction, codes, reconstruction_error [B]) as samplers.ddim_edit."""
    grid = _grid(process, num_steps, grid)
    x_input = jnp.asarray(x_input, jnp.float32)
    codes = ddim_encode(process, model_fn, x_input, num_steps=grid.shape[0] - 1, grid=grid,
                        mesh=mesh)
    decode = lambda fn: process_solvers.sample(  # noqa: E731
        process, fn, jax.random.key(0), codes.shape, method='ddim', num_steps=grid.shape[0] - 1,
        x_T=codes, grid=grid, clip_denoised=clip_denoised, mesh=mesh)['samples']
    reconstruction = decode(model_fn)
    edited = reconstruction if edit_model_fn is None else decode(edit_model_fn)
    err = jnp.sqrt(jnp.mean(jnp.square(reconstruction - x_input),
                            axis=tuple(range(1, x_input.ndim))))
    return dict(edited=edited, reconstruction=reconstruction, codes=codes,
                reconstruction_error=err)


def check_sdedit_method(process, method: str) -> None:
    """ValueError in one line unless sdedit can run `method` on the process."""
    if method not in METHODS_EXTRA and method not in process.methods:
        raise ValueError(f'edit.sdedit_method={method!r} cannot run on diffusion.process='
                         f'{process.name!r}; choose one of '
                         f'{", ".join((*METHODS_EXTRA, *process.methods))}.')


__all__ = ['repaint', 'sdedit', 'ddim_edit', 'ddim_encode', 'sdedit_index', 'posterior_step',
           'forward_step', 'check_sdedit_method']
