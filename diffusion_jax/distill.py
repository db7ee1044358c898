"""A distillation run: the train loop's pieces for `config.distill` (the math: distillation.py).

A run whose config has `distill.teacher_workdir` trains a student initialised from the teacher
run's EMA weights (its checkpoint `distill.teacher_step`, -1 = latest), with the same network
and process (the teacher's stored model/diffusion sections must equal the run's), the teacher
read and never written. The train step replaces the diffusion loss by
  'progressive'  one round of Salimans & Ho 2022, Algorithm 2, from the teacher's
                 distill.start_steps = 2N DDIM steps to the student's N: levels are the
                 'trailing' steps of the discrete diffusion, t_i = iT/N - 1 (i = 1..N; the
                 teacher's midpoint t_i - T/(2N); the last step lands on data). The student keeps
                 the teacher's parametrisation (ε for the digits teacher: the student starts as
                 the teacher, and a different head would start from nothing); sample it with
                 sampling.method='ddim', sampling.num_steps='trailing<N>'. Further rounds: a run
                 whose teacher is this one (distill.start_steps = N).
  'consistency'  consistency distillation (Song et al. 2023, Algorithm 2) over the
                 distill.num_scales levels k_j = round(j (T-1)/(N-1)) of the diffusion, σ̃ =
                 √(1/ᾱ - 1), σ_min = σ̃(k_0 = 0); one DDIM step of the teacher's PF-ODE; the
                 target network θ⁻ is the run's EMA (training.ema_decay = μ); pseudo-Huber with
                 c = distill.huber_c_per_dim √d. Sample with sampling.method='consistency'.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import distillation, run as run_lib

METHODS = ('progressive', 'consistency')
# The teacher's sections the student must share (the same network and the same process).
SHARED_SECTIONS = ('model', 'diffusion')


def is_distillation(config) -> bool:
    d = config.get('distill', None)
    return d is not None and bool(d.get('teacher_workdir', ''))


def check_config(config) -> None:
    """One-line ValueErrors for the distill section (before anything is read or written)."""
    d = config.distill
    if d.method not in METHODS:
        raise ValueError(f'distill.method={d.method!r} is not available; choose one of '
                         f'{", ".join(METHODS)}.')
    if config.diffusion.get('process', 'gaussian') != 'gaussian':
        raise ValueError(f"distill.method={d.method!r} runs on diffusion.process='gaussian'; "
                         f"got {config.diffusion.get('process')!r}.")
    t = int(config.diffusion.num_timesteps)
    if d.method == 'progressive':
        n = int(d.start_steps)
        if n < 2 or n % 2:
            raise ValueError(f'distill.start_steps={n}: a progressive round halves the '
                             "teacher's steps, so the student would go below one step or be "
                             'fractional; use an even start_steps >= 2 (the last round: 2 -> 1).')
        if t % int(d.start_steps):
            raise ValueError(f'distill.start_steps={d.start_steps} must divide '
                             f'diffusion.num_timesteps={t} (the teacher\'s trailing grid).')
    else:
        if not 2 <= int(d.num_scales) <= t:
            raise ValueError(f'distill.num_scales={d.num_scales} must be in [2, {t}].')
        if not d.sigma_data > 0:
            raise ValueError(f'distill.sigma_data={d.sigma_data} must be > 0.')


def load_teacher(config):
    """The teacher's EMA params (replicated on every device) and its checkpoint step; one-line
    errors for a teacher that is not a run or whose network/process differs."""
    d = config.distill
    workdir = d.teacher_workdir
    on_disk = run_lib.Run(workdir)
    if not on_disk.has_config():
        raise ValueError(f'distill.teacher_workdir={workdir!r} is not a run (no config.json): '
                         'pass the --workdir of a trained teacher.')
    teacher_config = run_lib.with_defaults(on_disk.config)
    student = run_lib.with_defaults(config)
    diffs = run_lib.section_differences(teacher_config, student, SHARED_SECTIONS)
    if diffs:
        raise ValueError(f'distill.teacher_workdir={workdir!r}: the student must have the '
                         f'teacher\'s network and process; it differs in {", ".join(diffs[:4])} '
                         '(copy the teacher\'s model and diffusion sections).')
    if not on_disk.steps():
        raise ValueError(f'distill.teacher_workdir={workdir!r} has no checkpoint: train it first.')
    loaded = run_lib.load(workdir, step=int(d.get('teacher_step', -1)), use_ema=True)
    return loaded.variables['params'], loaded.step


def _x0(diffusion, out, x, t):
    """x̂_0 [B, ...] from the network output in the run's parametrisation (unclipped)."""
    return diffusion.p_mean_variance(out, x, t, clip_denoised=False)['pred_x0']


def progressive_levels(diffusion, n_student: int, i):
    """The timesteps (t, t', t'') [B] of student step i ∈ {1..N} [B] — the 'trailing' grids
    t = iT/N - 1 of the student and iT/(2N) - 1 of the teacher, t'' = -1 meaning data — and
    their levels ((α, σ) at t, t', t''), with (α, σ) = (1, 0) at t'' = -1."""
    stride = diffusion.num_timesteps // n_student
    t, t_mid, t_end = i * stride - 1, i * stride - stride // 2 - 1, (i - 1) * stride - 1
    abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)
    level = lambda k: (jnp.where(k >= 0, jnp.sqrt(abar[jnp.maximum(k, 0)]), 1.0),  # noqa: E731
                       jnp.where(k >= 0, jnp.sqrt(1.0 - abar[jnp.maximum(k, 0)]), 0.0))
    return (t, t_mid, t_end), (level(t), level(t_mid), level(t_end))


def _progressive_loss(config, diffusion, student_fn, teacher_fn, x0, key):
    """Per-example loss [B] and its timesteps [B] of one progressive-distillation round."""
    n_student = int(config.distill.start_steps) // 2
    i_key, n_key = jax.random.split(key)
    i = jax.random.randint(i_key, (x0.shape[0],), 1, n_student + 1)
    (t, t_mid, _), levels = progressive_levels(diffusion, n_student, i)
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    z = diffusion.q_sample(x0, t, noise)
    times = (t, t_mid)
    target = distillation.progressive_target(
        lambda zz, j: _x0(diffusion, teacher_fn(zz, times[j]), zz, times[j]), z, levels)['target']
    student = _x0(diffusion, student_fn(z, t), z, t)
    return distillation.progressive_loss(student, jax.lax.stop_gradient(target), *levels[0]), t


def consistency_levels(config, diffusion):
    """The original timesteps k_0 = 0 < … < k_{N-1} = T-1 of the consistency levels, [N]."""
    n, t_total = int(config.distill.num_scales), diffusion.num_timesteps
    return jnp.round(jnp.arange(n) * (t_total - 1) / (n - 1)).astype(jnp.int32)


def _consistency_loss(config, diffusion, student_fn, target_fn, teacher_fn, x0, key):
    d = config.distill
    ks = consistency_levels(config, diffusion)
    sig_table = jnp.asarray(diffusion.sqrt_recipm1_alphas_cumprod, jnp.float32)
    sqrt_ab = jnp.asarray(diffusion.sqrt_alphas_cumprod, jnp.float32)
    sigma_min, sigma_data = sig_table[0], float(d.sigma_data)
    b = x0.shape[0]
    j_key, n_key = jax.random.split(key)
    j = jax.random.randint(j_key, (b,), 0, ks.shape[0] - 1)
    k_hi, k_lo = ks[j + 1], ks[j]
    x_hi = diffusion.q_sample(x0, k_hi, jax.random.normal(n_key, x0.shape, x0.dtype))
    bc = lambda a: a.reshape((-1,) + (1,) * (x0.ndim - 1))  # noqa: E731

    def f(fn, y, k):
        x = bc(sqrt_ab[k]) * y
        return distillation.consistency_from_x0(_x0(diffusion, fn(x, k), x, k), y, sig_table[k],
                                                sigma_min, sigma_data)

    def teacher_step(y, s_hi, s_lo):
        x = bc(sqrt_ab[k_hi]) * y
        return distillation.ode_ddim_step(_x0(diffusion, teacher_fn(x, k_hi), x, k_hi), y,
                                          s_hi, s_lo)

    c = float(d.huber_c_per_dim) * math.sqrt(math.prod(x0.shape[1:]))
    loss = distillation.consistency_loss(
        lambda y, _: f(student_fn, y, k_hi), lambda y, _: f(target_fn, y, k_lo), teacher_step,
        x_hi / bc(sqrt_ab[k_hi]), sig_table[k_hi], sig_table[k_lo], c)
    return loss, k_hi


def make_distill_step(config, model, diffusion, teacher_params, optimizer, schedule,
                      metrics_fn: Callable) -> Callable:
    """train_step(state, batch, rng) -> (state, metrics), as train.make_train_step's: the
    distillation loss of config.distill.method; a non-finite step changes nothing but
    state.step and state.skipped."""
    d = config.distill
    decay = config.training.ema_decay
    max_skips = config.training.get('skip_nonfinite_steps', 0)
    num_classes = config.model.get('num_classes', 0)

    def train_step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        x0 = batch['image']
        y = batch['label'] if num_classes else None
        bound = lambda p: (lambda x, t: model.apply({'params': p}, x, t, y,  # noqa: E731
                                                    train=False))
        teacher_fn = bound(teacher_params)

        def loss_fn(params):
            if d.method == 'progressive':
                per, t = _progressive_loss(config, diffusion, bound(params), teacher_fn, x0, rng)
            else:
                per, t = _consistency_loss(config, diffusion, bound(params),
                                           bound(jax.lax.stop_gradient(state.ema_params)),
                                           teacher_fn, x0, rng)
            return jnp.mean(per), (per, t)

        (loss, (per, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = distillation.ema_update(state.ema_params, params, decay)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (state.skipped <= max_skips)
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(apply, a, o), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  ema_params=keep(ema, state.ema_params),
                                  opt_state=keep(opt_state, state.opt_state), skipped=skipped)
        metrics = metrics_fn(loss, {'loss': per}, t, grad_norm, schedule(state.step),
                             diffusion.num_timesteps)
        metrics.update(finite=finite, skipped=skipped, halt=skipped > max_skips)
        return new_state, metrics

    return train_step


def initial_params(teacher_params):
    """The student's params (and EMA): copies of the teacher's EMA weights."""
    return jax.tree.map(jnp.copy, teacher_params)


__all__ = ['METHODS', 'is_distillation', 'check_config', 'load_teacher', 'make_distill_step',
           'initial_params', 'consistency_levels', 'progressive_levels']
