"""A distillation run: the train loop's pieces for `config.distill` (the math: distillation.py).

A run whose config has `distill.teacher_workdir` trains a student initialised from the teacher
run's EMA weights (its checkpoint `distill.teacher_step`, -1 = latest), with the same network
and process (the teacher's stored model/diffusion sections must equal the run's), the teacher
read and never written. The train step replaces the diffusion loss by
  'progressive'  Salimans & Ho 2022, Algorithm 2, `distill.rounds` = R rounds of
                 `distill.steps_per_round` = S steps in one run (training.num_train_steps = R·S):
                 round r (0-based, steps [rS, (r+1)S)) distils the teacher's 2N_r =
                 start_steps/2^r DDIM steps into the student's N_r. Levels are the 'trailing'
                 steps of the discrete diffusion (respace.trailing_steps), t_j = round(jT/2N) - 1
                 for the teacher, every other one for the student (the last lands on data). Round 0's teacher
                 is the teacher run; round r's is the EMA of the student at step rS (that
                 checkpoint is kept, and listed in distill_rounds.json with its step count), and
                 at step rS the student restarts from it with a fresh optimiser state, as a new
                 run of the paper's outer loop would. The student keeps the teacher's
                 parametrisation (ε for the digits teacher: the student starts as the teacher).
                 The stored sampler is sampling.method='ddim', num_steps='trailing<N_R>'.
  'consistency'  consistency distillation (Song et al. 2023, Algorithm 2) over the
                 distill.num_scales levels k_j = round(j (T-1)/(N-1)) of the diffusion, σ̃ =
                 √(1/ᾱ - 1), σ_min = σ̃(k_0 = 0); one DDIM or Heun step of the teacher's PF-ODE
                 (distill.teacher_solver); the target network θ⁻ is the run's EMA
                 (training.ema_decay = μ); pseudo-Huber with c = distill.huber_c_per_dim √d.
  'ect'          easy consistency tuning (Geng et al. 2024): t from the lognormal
                 (distill.ect_p_mean, ect_p_std) put on the nearest level k_t ≥ 1 of the
                 diffusion; r = distillation.ect_r(t, ⌊step/ect_stage_steps⌋) put on the
                 largest level ≤ r (at most k_t - 1; below σ_min the target is x_0); the same
                 noise for both points, no teacher call, the online weights (stop-gradient) as
                 target; w(t) = 1/t² + 1/σ_data², pseudo-Huber.
Consistency and ect students sample with sampling.method='consistency'.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import checkpointing, distillation, image_utils, run as run_lib, sharding

METHODS = ('progressive', 'consistency', 'ect')
TEACHER_SOLVERS = ('ddim', 'heun')  # consistency: the teacher's PF-ODE step
# The teacher's sections the student must share (the same network and the same process).
SHARED_SECTIONS = ('model', 'diffusion')
ROUNDS_FILE = 'distill_rounds.json'  # progressive: checkpoint step -> the student's step count


def is_distillation(config) -> bool:
    d = config.get('distill', None)
    return d is not None and bool(d.get('teacher_workdir', ''))


def num_rounds(config) -> int:
    return int(config.distill.get('rounds', 1))


def steps_per_round(config) -> int:
    """distill.steps_per_round, or the whole run (0, one round)."""
    s = int(config.distill.get('steps_per_round', 0))
    return s if s > 0 else int(config.training.num_train_steps)


def round_steps(config) -> list[int]:
    """The student step counts N_1, …, N_R of the rounds (distillation.halve_steps)."""
    return distillation.halve_steps(int(config.distill.start_steps), num_rounds(config))


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
        if n > t:
            raise ValueError(f'distill.start_steps={n} exceeds diffusion.num_timesteps={t}: '
                             "the teacher's first DDIM grid ('trailing<start_steps>') has at "
                             f'most {t} steps.')
        rounds = num_rounds(config)
        if rounds < 1:
            raise ValueError(f'distill.rounds={rounds} must be >= 1.')
        round_steps(config)  # refuses rounds that would go below one step
        per, total = steps_per_round(config), int(config.training.num_train_steps)
        if rounds > 1 and (int(d.get('steps_per_round', 0)) < 1 or per * rounds != total):
            raise ValueError(f'distill.steps_per_round={d.get("steps_per_round", 0)} with '
                             f'distill.rounds={rounds}: training.num_train_steps={total} must be '
                             f'rounds x steps_per_round; set '
                             f'--config.distill.steps_per_round={max(total // rounds, 1)} and '
                             f'--config.training.num_train_steps={max(total // rounds, 1) * rounds}.')
        k = int(config.training.get('steps_per_call', 1))
        if per % k:
            raise ValueError(f'distill.steps_per_round={per} is not a multiple of '
                             f'training.steps_per_call={k}: a round starts between calls.')
    else:
        if not d.sigma_data > 0:
            raise ValueError(f'distill.sigma_data={d.sigma_data} must be > 0.')
    if d.method == 'consistency':
        if not 2 <= int(d.num_scales) <= t:
            raise ValueError(f'distill.num_scales={d.num_scales} must be in [2, {t}].')
        solver = d.get('teacher_solver', 'ddim')
        if solver not in TEACHER_SOLVERS:
            raise ValueError(f'distill.teacher_solver={solver!r} is not available; choose one of '
                             f'{", ".join(TEACHER_SOLVERS)}.')
    if d.method == 'ect':
        if int(d.ect_stage_steps) < 1:
            raise ValueError(f'distill.ect_stage_steps={d.ect_stage_steps} must be >= 1 (the '
                             'steps between halvings of Δt).')
        if not d.ect_q > 1:
            raise ValueError(f'distill.ect_q={d.ect_q} must be > 1 (Δt shrinks by q per stage).')
        if not d.ect_p_std > 0:
            raise ValueError(f'distill.ect_p_std={d.ect_p_std} must be > 0.')


def derive(config):
    """config with the sampler a student is sampled with when sampling.num_steps is left '':
    progressive, 'ddim' over 'trailing<N_R>' (the last round's steps); a consistency or ect
    student, 'consistency' (its num_steps as given, 'trailing2' if empty). A new ConfigDict."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict(config.to_dict())
    s = config.sampling
    if config.distill.method == 'progressive':
        if not s.get('num_steps', ''):
            s.method, s.num_steps = 'ddim', f'trailing{round_steps(config)[-1]}'
            s.eta = 0.0
    elif not s.get('num_steps', ''):
        s.method, s.num_steps = 'consistency', 'trailing2'
    return config


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


def progressive_levels(diffusion, n_student, i):
    """The timesteps (t, t', t'') [B] of student step i ∈ {1..N} [B] — the 'trailing' grids
    (respace.trailing_steps) t_j = round(jT/2N) - 1 of the teacher's 2N steps, of which the
    student's N are every other one: t = t_{2i}, t' = t_{2i-1}, t'' = t_{2i-2} (-1 meaning
    data) — and their levels ((α, σ) at t, t', t''), with (α, σ) = (1, 0) at t'' = -1.
    n_student: an int or an int32 array (the round's N, traced in a multi-round run)."""
    two_n = (2 * jnp.asarray(n_student)).astype(jnp.float32)
    grid = lambda j: (jnp.round(j.astype(jnp.float32) * diffusion.num_timesteps / two_n)  # noqa: E731
                      .astype(jnp.int32) - 1)  # round half to even, as numpy's
    i = jnp.asarray(i, jnp.int32)
    t, t_mid, t_end = grid(2 * i), grid(2 * i - 1), grid(2 * i - 2)
    abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)
    level = lambda k: (jnp.where(k >= 0, jnp.sqrt(abar[jnp.maximum(k, 0)]), 1.0),  # noqa: E731
                       jnp.where(k >= 0, jnp.sqrt(1.0 - abar[jnp.maximum(k, 0)]), 0.0))
    return (t, t_mid, t_end), (level(t), level(t_mid), level(t_end))


def student_steps_at(config, step):
    """N_r of the round that train step `step` (steps done, int32) belongs to: start_steps >>
    (r + 1), r = min(step // steps_per_round, rounds - 1)."""
    r = jnp.minimum(step // steps_per_round(config), num_rounds(config) - 1)
    return jnp.right_shift(jnp.int32(config.distill.start_steps), r + 1)


def _progressive_loss(config, diffusion, student_fn, teacher_fn, x0, key, n_student):
    """Per-example loss [B] and its timesteps [B] of one progressive-distillation round."""
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


class _Levels:
    """The VP diffusion in EDM's variables: σ̃_k = √(1/ᾱ_k - 1) [T], y = x/√ᾱ, and the
    consistency function f(y, k) = c_skip(σ̃_k) y + (1 - c_skip) x̂_θ(√ᾱ_k y, k)."""

    def __init__(self, config, diffusion, ndim):
        self.diffusion = diffusion
        self.sig = jnp.asarray(diffusion.sqrt_recipm1_alphas_cumprod, jnp.float32)
        self.sqrt_ab = jnp.asarray(diffusion.sqrt_alphas_cumprod, jnp.float32)
        self.sigma_min, self.sigma_data = self.sig[0], float(config.distill.sigma_data)
        self.bc = lambda a: a.reshape((-1,) + (1,) * (ndim - 1))

    def x0(self, fn, y, k):
        x = self.bc(self.sqrt_ab[k]) * y
        return _x0(self.diffusion, fn(x, k), x, k)

    def f(self, fn, y, k):
        return distillation.consistency_from_x0(self.x0(fn, y, k), y, self.sig[k],
                                                self.sigma_min, self.sigma_data)


def _huber_c(config, x0):
    return float(config.distill.huber_c_per_dim) * math.sqrt(math.prod(x0.shape[1:]))


def _consistency_loss(config, diffusion, student_fn, target_fn, teacher_fn, x0, key):
    d = config.distill
    lv = _Levels(config, diffusion, x0.ndim)
    ks = consistency_levels(config, diffusion)
    j_key, n_key = jax.random.split(key)
    j = jax.random.randint(j_key, (x0.shape[0],), 0, ks.shape[0] - 1)
    k_hi, k_lo = ks[j + 1], ks[j]
    x_hi = diffusion.q_sample(x0, k_hi, jax.random.normal(n_key, x0.shape, x0.dtype))
    s_hi, s_lo = lv.sig[k_hi], lv.sig[k_lo]

    loss = distillation.consistency_loss(
        lambda y, _: lv.f(student_fn, y, k_hi), lambda y, _: lv.f(target_fn, y, k_lo),
        teacher_ode_step(config, lv, teacher_fn, k_hi, k_lo), x_hi / lv.bc(lv.sqrt_ab[k_hi]),
        s_hi, s_lo, _huber_c(config, x0))
    return loss, k_hi


def teacher_ode_step(config, lv, teacher_fn, k_hi, k_lo) -> Callable:
    """(y, σ_hi, σ_lo) -> y' [B, ...]: one step of the teacher's PF-ODE dy/dσ = (y - x̂)/σ from
    level k_hi down to k_lo [B], by distill.teacher_solver: 'ddim' (Euler, one teacher call) or
    'heun' (two calls: at σ_hi on level k_hi and at σ_lo on level k_lo)."""
    if config.distill.get('teacher_solver', 'ddim') == 'heun':
        def step(y, s, s_next):
            denoise = lambda yy, sig: lv.x0(teacher_fn, yy, jnp.where(sig == s, k_hi, k_lo))  # noqa: E731
            return distillation.ode_heun_step(denoise, y, s, s_next)
        return step

    def ddim_step(y, s, s_next):
        return distillation.ode_ddim_step(lv.x0(teacher_fn, y, k_hi), y, s, s_next)
    return ddim_step


def ect_levels(config, lv, t_cont, step):
    """(k_t, k_r) [B] of easy consistency tuning on the diffusion's levels: k_t the level
    nearest to t in log σ̃ (>= 1), k_r the largest level with σ̃ <= ect_r(σ̃_{k_t}, stage), at
    most k_t - 1, and -1 where that r is below σ_min (the target is then x_0)."""
    d = config.distill
    log_sig = jnp.log(lv.sig)
    k_t = jnp.clip(jnp.argmin(jnp.abs(log_sig[None, :] - jnp.log(t_cont)[:, None]), axis=1),
                   1, lv.sig.shape[0] - 1).astype(jnp.int32)
    stage = step // int(d.ect_stage_steps)
    r = distillation.ect_r(lv.sig[k_t], stage, float(d.ect_q), float(d.ect_k), float(d.ect_b))
    k_r = (jnp.searchsorted(lv.sig, r, side='right') - 1).astype(jnp.int32)
    return k_t, jnp.minimum(k_r, k_t - 1)


def _ect_loss(config, diffusion, student_fn, x0, key, step):
    d = config.distill
    lv = _Levels(config, diffusion, x0.ndim)
    t_key, n_key = jax.random.split(key)
    t_cont = jnp.exp(float(d.ect_p_mean)
                     + float(d.ect_p_std) * jax.random.normal(t_key, (x0.shape[0],)))
    k_t, k_r = ect_levels(config, lv, t_cont, step)
    k_r_safe = jnp.maximum(k_r, 0)
    # r < σ_min where k_r = -1: ect_loss then takes x_0 as the target.
    r = jnp.where(k_r >= 0, lv.sig[k_r_safe], 0.0)
    online = student_fn
    target = lambda x, t: jax.lax.stop_gradient(student_fn(x, t))  # noqa: E731  θ⁻ = sg(θ)
    loss = distillation.ect_loss(
        lambda y, _: lv.f(online, y, k_t), lambda y, _: lv.f(target, y, k_r_safe),
        x0, jax.random.normal(n_key, x0.shape, x0.dtype), lv.sig[k_t], r, lv.sigma_min,
        lv.sigma_data, _huber_c(config, x0))
    return loss, k_t


def make_distill_step(config, model, diffusion, optimizer, schedule,
                      metrics_fn: Callable) -> Callable:
    """train_step(state, batch, rng, teacher) -> (state, metrics), as train.make_train_step's
    with the teacher's params an argument (Teacher.params: the round's teacher): the
    distillation loss of config.distill.method; a non-finite step changes nothing but
    state.step and state.skipped."""
    d = config.distill
    decay = config.training.ema_decay
    max_skips = config.training.get('skip_nonfinite_steps', 0)
    num_classes = config.model.get('num_classes', 0)

    def train_step(state, batch, rng, teacher_params):
        rng = jax.random.fold_in(rng, state.step)
        x0 = batch['image']
        y = batch['label'] if num_classes else None
        bound = lambda p: (lambda x, t: model.apply({'params': p}, x, t, y,  # noqa: E731
                                                    train=False))
        teacher_fn = bound(teacher_params)

        def loss_fn(params):
            if d.method == 'progressive':
                per, t = _progressive_loss(config, diffusion, bound(params), teacher_fn, x0, rng,
                                           student_steps_at(config, state.step))
            elif d.method == 'ect':
                per, t = _ect_loss(config, diffusion, bound(params), x0, rng, state.step)
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


class Teacher:
    """The teacher params each train call is given, and the rounds of a progressive run.

    Round 0's teacher is the teacher run's EMA (replicated). In a run of distill.rounds = R > 1
    rounds of S steps, before the call that starts step rS (0 < r < R) the student state is
    reset to a new round — params = EMA, a fresh optimiser state — and the EMA becomes the
    teacher; a run resumed inside round r reads that teacher back from its own checkpoint at
    step rS, which the checkpointer keeps (`preserved_steps`), so a resume is bit-exact.
    """

    def __init__(self, config, teacher_params, workdir: str, optimizer, mesh):
        self.config, self.workdir, self.optimizer, self.mesh = config, workdir, optimizer, mesh
        self.repl = sharding.replicated(mesh)
        self.params = jax.device_put(teacher_params, self.repl)
        self.round = 0
        progressive = config.distill.method == 'progressive'
        self.rounds = num_rounds(config) if progressive else 1
        self.per_round = steps_per_round(config)
        self._reset = None

    def preserved_steps(self) -> list[int]:
        """The checkpoint steps that end a round (kept whatever training.keep_checkpoints)."""
        return [self.per_round * (r + 1) for r in range(self.rounds)] if self.rounds > 1 else []

    def is_round_end(self, step: int) -> bool:
        return self.rounds > 1 and step % self.per_round == 0

    def before_call(self, state, first: int):
        """The state the call starting at step `first` trains (reset at a round's start)."""
        if self.rounds == 1:
            return state
        r = min(first // self.per_round, self.rounds - 1)
        if r == self.round:
            return state
        if first == r * self.per_round:  # a round starts: the student's EMA teaches it
            self.params = jax.device_put(jax.tree.map(jnp.copy, state.ema_params), self.repl)
            if self._reset is None:
                optimizer = self.optimizer

                def reset(st):
                    ema = jax.tree.map(jnp.copy, st.ema_params)
                    return st.replace(params=ema, opt_state=optimizer.init(ema))
                self._reset = jax.jit(reset, out_shardings=sharding.state_shardings(
                    self.mesh, state))
            state = self._reset(state)
        else:  # resumed inside round r: its teacher is the EMA saved at its start
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=self.repl),
                                  state.ema_params)
            restored, _ = checkpointing.restore_items(self.workdir, {'ema_params': target},
                                                      step=r * self.per_round)
            self.params = restored['ema_params']
        self.round = r
        return state

    def record(self, step: int) -> None:
        """distill_rounds.json after the checkpoint that ends a round is committed: for each
        round done, its checkpoint step and the student's step count (process 0)."""
        if not self.is_round_end(step) or jax.process_index() != 0:
            return
        steps = round_steps(self.config)
        done = [dict(round=r + 1, checkpoint_step=self.per_round * (r + 1),
                     teacher_steps=int(self.config.distill.start_steps) >> r,
                     sampling_steps=steps[r], num_steps=f'trailing{steps[r]}')
                for r in range(min(step // self.per_round, self.rounds))]
        text = json.dumps(dict(method='progressive', rounds=done), indent=2)
        image_utils.atomic_write(os.path.join(self.workdir, ROUNDS_FILE), text.encode())


__all__ = ['METHODS', 'TEACHER_SOLVERS', 'ROUNDS_FILE', 'is_distillation', 'check_config',
           'derive', 'load_teacher', 'make_distill_step', 'initial_params', 'Teacher',
           'consistency_levels', 'progressive_levels', 'ect_levels', 'round_steps', 'teacher_ode_step',
           'student_steps_at']
