"""Samplers over a continuous process (diffusion_jax.processes: 'flow', 'edm'), written once on
the process interface: its time grid t_0 > … > t_K = 0, its x̂_0 (`process.denoise`), its
marginal coefficients α, σ and λ = log(α/σ). No solver reads a process's type.

  'euler'   Euler on the probability-flow ODE dx/dt = α' x̂_0 + σ' ε̂ in the process's own time
            (flow: dx/dt = v̂; EDM: dx/dσ = (x - D)/σ, Karras et al. 2022 Alg. 1 without the
            correction). For both, α and σ are linear in t, so this equals DDIM.   NFE K
  'heun'    EDM Algorithm 2 (Karras et al. 2022): churn γ_i = min(S_churn/K, √2 - 1) where
            S_tmin ≤ σ̃_i ≤ S_tmax (σ̃ = σ/α, EDM's σ of the level), the state re-noised to
            σ̃ = (1 + γ_i) σ̃_i with S_noise·z, then Heun's step; Euler on the last step (to
            t = 0). S_churn = 0 is deterministic (Algorithm 1).                   NFE 2K - 1
  'ddim', 'dpmpp_2m', 'dpmpp_3m'  DPM-Solver++ multistep of order 1, 2, 3 through x̂_0 and λ
            (the very update samplers/dpm_solver.py runs on the VP chain).         NFE K
  'unipc'   UniPC-bh2 (samplers/unipc.py's predictor and corrector on these levels). NFE K
Every solver's last step (to σ = 0) returns x̂_0 at the last nonzero time.

One jit per (process, method, K, shape, options); the grid is a traced argument, so a custom grid
(`grid=`) reuses the compilation; model_fn pytrees are split as in chain.py.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import guidance as guidance_lib
from diffusion_jax.samplers import common, dpm_solver, unipc
from diffusion_jax.samplers.static import check_batch, partition


class ProcessOptions(NamedTuple):
    """The static part of a process sampler call (a jit cache key)."""
    method: str
    num_steps: int
    clip_denoised: bool = False
    mesh: object = None
    self_condition: bool = False  # feed each step the previous step's x̂_0 (chain.sample)
    step_interval: bool = False  # a guidance interval decided once per Heun step (common.Options)


class ProcessContext(NamedTuple):
    process: object
    model_fn: Callable
    grid: jax.Array  # [K+1] float32, descending, grid[K] = 0
    opts: ProcessOptions
    churn: jax.Array  # (S_churn, S_tmin, S_tmax, S_noise) float32


def denoise(ctx: ProcessContext, x, t):
    """x̂_0 [B, ...] at the scalar time t (clipped to [-1, 1] if opts.clip_denoised)."""
    x0 = ctx.process.denoise(ctx.model_fn, x, jnp.full((x.shape[0],), t, jnp.float32))
    return jnp.clip(x0, -1.0, 1.0) if ctx.opts.clip_denoised else x0


def velocity(ctx, x, t, x0):
    return ctx.process.velocity_from_x0(x0, x, jnp.full((x.shape[0],), t, jnp.float32))


def _levels(ctx: ProcessContext, j):
    """(λ, α, σ) of grid point j (clamped into [0, K]): scalars."""
    t = ctx.grid[jnp.clip(j, 0, ctx.opts.num_steps)]
    alpha, sigma = ctx.process.alpha_sigma(t)
    return ctx.process.log_snr(t), alpha, sigma


# ----------------------------------------------------------------------------------------------
# The steps: step(ctx, state, i, key) -> (state, x̂_0), from grid[i] to grid[i+1]
# ----------------------------------------------------------------------------------------------
def euler_step(ctx, state, i, key):  # pylint: disable=unused-argument
    x, t, t_next = state['x'], ctx.grid[i], ctx.grid[i + 1]
    x0 = denoise(ctx, x, t)
    x_next = x + (t_next - t) * velocity(ctx, x, t, x0)
    return {'x': jnp.where(t_next == 0, x0, x_next)}, x0


def churn(ctx, x, t, key):
    """EDM Algorithm 2, lines 4-6, in any process: (x̂ at t̂, t̂) with σ̃(t̂) = (1 + γ) σ̃(t),
    x̂ = (α̂/α) x + √(σ̂² - (α̂ σ/α)²) S_noise z (the marginal at t̂ given the one at t)."""
    s_churn, s_tmin, s_tmax, s_noise = (ctx.churn[j] for j in range(4))
    p = ctx.process
    sig = p.sigma_tilde(t)
    on = jnp.isfinite(sig) & (sig >= s_tmin) & (sig <= s_tmax)
    gamma = jnp.where(on, jnp.minimum(s_churn / ctx.opts.num_steps, math.sqrt(2.0) - 1.0), 0.0)
    t_hat = jnp.where(gamma > 0, p.time_at_sigma_tilde(jnp.where(on, sig, 1.0) * (1 + gamma)), t)
    (alpha, sigma), (alpha_hat, sigma_hat) = p.alpha_sigma(t), p.alpha_sigma(t_hat)
    ratio = alpha_hat / jnp.where(gamma > 0, alpha, 1.0)
    extra = jnp.sqrt(jnp.maximum(sigma_hat**2 - (ratio * sigma) ** 2, 0.0))
    z = common.noise_like(key, x, 1)
    x_hat = jnp.where(gamma > 0, ratio * x + extra * s_noise * z, x)
    return x_hat, t_hat


def heun_step(ctx, state, i, key):
    x_hat, t_hat = churn(ctx, state['x'], ctx.grid[i], key)
    t_next = ctx.grid[i + 1]
    if ctx.opts.step_interval:
        # The guidance interval is decided once per step, at σ̃(t̂) of the first evaluation
        # (t̂ = t_i without churn), for both evaluations, as Kynkäänniemi et al.'s reference
        # EDM sampler does; passed as the network time input of that evaluation.
        t_in = ctx.process.model_input(x_hat, jnp.full((x_hat.shape[0],), t_hat, jnp.float32))[1]
        ctx = ctx._replace(model_fn=common.interval_at(ctx.model_fn, t_in))
    x0 = denoise(ctx, x_hat, t_hat)
    d = velocity(ctx, x_hat, t_hat, x0)
    x_euler = x_hat + (t_next - t_hat) * d

    def second_order(_):
        x_e = common.constrain(x_euler, ctx.opts.mesh)
        d_next = velocity(ctx, x_e, t_next, denoise(ctx, x_e, t_next))
        return x_hat + (t_next - t_hat) * 0.5 * (d + d_next)

    # The step to t = 0 makes no second evaluation (NFE 2K - 1), and lands on x̂_0.
    x = jax.lax.cond(t_next == 0, lambda _: x0, second_order, None)
    return {'x': x}, x0


def _order(ctx, state, i, order):
    """UniPC's order at step i: ≤ the steps left, for every K (diffusers' UniPCMultistepScheduler,
    lower_order_final=True: min(solver_order, len(timesteps) - step_index))."""
    remaining = ctx.opts.num_steps - 1 - i
    return jnp.minimum(jnp.minimum(order, state['n'] + 1), remaining + 1)


def multistep_step(order: int):
    def step(ctx, state, i, key):  # pylint: disable=unused-argument
        x = state['x']
        m0 = denoise(ctx, x, ctx.grid[i])
        (lam_s2, _, _), (lam_s1, _, _) = _levels(ctx, i - 2), _levels(ctx, i - 1)
        (lam_s, _, sigma_s), (lam_t, alpha_t, sigma_t) = _levels(ctx, i), _levels(ctx, i + 1)
        # DPM-Solver++'s orders near the end are diffusers' (dpm_solver.multistep_order).
        step_order = dpm_solver.multistep_order(order, state['n'], ctx.opts.num_steps - i,
                                                ctx.opts.num_steps)
        x = dpm_solver.dpmpp_update_levels(
            x, m0, state['m1'], state['m2'], step_order,
            (lam_s2, lam_s1, lam_s, lam_t), alpha_t, sigma_t, sigma_s, ctx.grid[i + 1] == 0)
        return {'x': x, 'm1': m0, 'm2': state['m1'], 'n': state['n'] + 1}, m0
    return step


def unipc_step(ctx, state, i, key):  # pylint: disable=unused-argument
    """UniC for the step grid[i-1] -> grid[i] with the new x̂_0 (no extra call), then UniP."""
    m_new = denoise(ctx, state['x'], ctx.grid[i])
    lv = [_levels(ctx, j) for j in (i - 2, i - 1, i, i + 1)]
    lam = [level[0] for level in lv]
    corrected = unipc.corrector_levels(state['x_prev'], state['m1'], state['m2'], m_new,
                                       state['order'], tuple(lam[0:3]), lv[2][1], lv[2][2],
                                       lv[1][2])
    x = jnp.where(state['n'] > 0, corrected, state['x'])
    order = _order(ctx, state, i, unipc.ORDER)
    x_next = unipc.predictor_levels(x, m_new, state['m1'], order, tuple(lam[1:4]), lv[3][1],
                                    lv[3][2], lv[2][2], ctx.grid[i + 1] == 0)
    return {'x': x_next, 'x_prev': x, 'm1': m_new, 'm2': state['m1'], 'n': state['n'] + 1,
            'order': order}, m_new


class _Method(NamedTuple):
    step: Callable
    init: Callable
    nfe: Callable[[int], int]


def _stateless(x):
    return {'x': x}


METHODS = {
    'euler': _Method(euler_step, _stateless, lambda k: k),
    'heun': _Method(heun_step, _stateless, lambda k: 2 * k - 1),
    'ddim': _Method(multistep_step(1), lambda x: dpm_solver.multistep_init(None, x), lambda k: k),
    'dpmpp_2m': _Method(multistep_step(2), lambda x: dpm_solver.multistep_init(None, x),
                        lambda k: k),
    'dpmpp_3m': _Method(multistep_step(3), lambda x: dpm_solver.multistep_init(None, x),
                        lambda k: k),
    'unipc': _Method(unipc_step, lambda x: unipc.init(None, x), lambda k: k),
}


# The method-specific sampling.* fields each process method reads (samplers.options): EDM
# Algorithm 2's churn for 'heun' only; none of the chain's eta / langevin_* / ddim_guidance /
# dynamic_threshold (process samplers have no classifier guidance and clip or not).
READS = {'heun': ('s_churn', 's_tmin', 's_tmax', 's_noise')}


def nfe(method: str, num_steps: int) -> int:
    """Network evaluations of `method` over K = num_steps steps of a process."""
    return METHODS[method].nfe(int(num_steps))


def run(ctx: ProcessContext, x, rng):
    """All K steps from x at grid[0]; returns x at grid[K] = 0."""
    spec = METHODS[ctx.opts.method]
    keep = lambda a: common.constrain(a, ctx.opts.mesh) if a.ndim == x.ndim else a

    def body(i, carry):
        state, previous_x0 = carry
        step_ctx = ctx
        if ctx.opts.self_condition:  # every call of step i sees step i-1's x̂_0 (zeros first)
            step_ctx = ctx._replace(model_fn=common.with_previous_x0(ctx.model_fn, previous_x0))
        state, x0 = spec.step(step_ctx, state, i, jax.random.fold_in(rng, i))
        if ctx.opts.self_condition:
            previous_x0 = keep(x0.astype(x.dtype))
        return jax.tree.map(keep, state), previous_x0

    previous_x0 = jnp.zeros_like(x) if ctx.opts.self_condition else None
    return jax.lax.fori_loop(0, ctx.opts.num_steps, body, (spec.init(x), previous_x0))[0]['x']


@functools.partial(jax.jit, static_argnames=('static', 'opts', 'shape'))
def _sample_jit(dynamic, rng, x_T, grid, churn_params, *, static, opts, shape):
    process, model_fn = static.merge(dynamic)
    k_init, k_chain = jax.random.split(rng)
    x = process.prior_sample(k_init, shape) if x_T is None else x_T.astype(jnp.float32)
    ctx = ProcessContext(process, model_fn, grid, opts, churn_params)
    return dict(samples=run(ctx, common.constrain(x, opts.mesh), k_chain))


def sample(process, model_fn, rng, shape, *, method: str = 'euler', num_steps: int = 18,
           x_T=None, grid=None, clip_denoised: bool = False, s_churn: float = 0.0,
           s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, mesh=None,
           self_condition: bool = False):
    """Samples x_0 from a continuous process by `method` over K = num_steps steps.

    Args:
      process: a processes.FlowMatching or processes.EDM (any Process with d_alpha_sigma).
      model_fn: the network as the process calls it: flow model_fn(x_t, t) -> velocity (or x0);
        EDM model_fn(c_in x, c_noise) -> F. Best a pytree (guidance.bind_model).
      rng: a jax.random.key (the prior draw and the churn noise).
      shape: [B, ...].
      method: one of process.methods (ValueError in one line naming them otherwise).
      num_steps: K >= 1.
      x_T: optional [B, ...] start at grid[0] (z for flow, σ_max z for EDM).
      grid: optional [K+1] descending times ending at 0 (default process.time_grid(K)).
      clip_denoised: clip x̂_0 to [-1, 1] at every evaluation (off by default: the ODE's x̂_0).
      s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's churn ('heun'), S_tmin/S_tmax in σ̃.
      mesh: shard the batch over this mesh's 'data' axis.
      self_condition: a self-conditioned network: model_fn(x_in, t_in, self_cond=x̂_0 of the
        previous step), zeros at the first (samplers.chain.sample).
    Returns:
      dict(samples=[B, ...] float32).
    """
    process.check_method(method)
    if int(num_steps) < 1:
        raise ValueError(f'sampling.num_steps={num_steps} must be >= 1 for a {process.name} '
                         'process.')
    if s_churn and method != 'heun':
        raise ValueError(f"sampling.s_churn={s_churn} applies to method='heun' (EDM Algorithm "
                         f"2), not {method!r}; set s_churn=0.")
    shape = tuple(int(s) for s in shape)
    check_batch(shape[0], mesh, 'sample')
    num_steps = int(num_steps)
    grid = process.time_grid(num_steps) if grid is None else np.asarray(grid, np.float64)
    if grid.shape != (num_steps + 1,) or grid[-1] != 0 or np.any(np.diff(grid) >= 0):
        raise ValueError(f'grid must be [{num_steps + 1}] strictly decreasing times ending at 0; '
                         f'got shape {grid.shape}.')
    opts = ProcessOptions(method, num_steps, bool(clip_denoised), mesh, bool(self_condition),
                          guidance_lib.has_interval(model_fn))
    dynamic, static = partition((process, model_fn))
    churn_params = jnp.asarray([s_churn, s_tmin, s_tmax, s_noise], jnp.float32)
    return _sample_jit(dynamic, rng, x_T, jnp.asarray(grid, jnp.float32), churn_params,
                       static=static, opts=opts, shape=shape)
