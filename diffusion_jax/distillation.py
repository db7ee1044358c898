"""Few-step generation by distillation: the math of progressive distillation and consistency
distillation, written on the process interface (α(t), σ(t), x̂_0), pure functions of arrays.

Progressive distillation (Salimans & Ho 2022, Algorithm 2). A student of N steps learns, at a
level t of its grid, the x̂ that makes one DDIM step t -> t'' land where two DDIM steps of the
teacher (t -> t' -> t'', the teacher's grid of 2N steps) land:
    z_{t'}  = α_{t'} x̂_T(z_t) + σ_{t'} (z_t - α_t x̂_T(z_t))/σ_t                 (DDIM, η = 0)
    z_{t''} = α_{t''} x̂_T(z_{t'}) + σ_{t''} (z_{t'} - α_{t'} x̂_T(z_{t'}))/σ_{t'}
    x̃ = (z_{t''} - (σ_{t''}/σ_t) z_t) / (α_{t''} - (σ_{t''}/σ_t) α_t)
loss  L = max(α_t²/σ_t², 1) ||x̃ - x̂_S(z_t)||²   ("truncated SNR" weighting, their eq. 9),
and N -> N/2 for the next round, the student becoming the teacher.
The student's x̂ is read from its output in one of the paper's parametrisations
(`x0_from_output`): 'x' (x̂ = out), 'eps' (x̂ = (z - σ ε̂)/α), 'v' (x̂ = (α z - σ v̂)/(α² + σ²),
v = α ε - σ x), 'x_eps' (two heads, x̂ = σ² x̂_x + α (z - σ ε̂), their §4 for α² + σ² = 1).

Consistency distillation (Song et al. 2023, Algorithm 2), in EDM's variables y = x/α,
σ̃ = σ/α (for a VP process y = x_0 + σ̃ ε; for EDM y = x): the student is
    f_θ(y, σ) = c_skip(σ) y + (1 - c_skip(σ)) x̂_θ(y, σ),
    c_skip(σ) = σ_data² / ((σ - σ_min)² + σ_data²)        (Song et al. 2023, App. C)
so f_θ(y, σ_min) = y exactly (the boundary condition) for any network whose x̂_θ is the
teacher's parametrisation (the student starts as the teacher's denoiser at large σ). Song et
al.'s own c_out(σ) = σ_data (σ - σ_min)/√(σ² + σ_data²) scales a raw output F
(`consistency_from_raw`); both vanish at σ_min. The loss between neighbouring levels
σ_{n+1} > σ_n:
    y_n = Φ(y_{n+1}, σ_{n+1} -> σ_n)   one DDIM (Euler) or Heun step of the teacher's PF-ODE
                                          dy/dσ = (y - x̂_T(y, σ))/σ
    L = d(f_θ(y_{n+1}, σ_{n+1}), f_{θ⁻}(y_n, σ_n)),   θ⁻ <- μ θ⁻ + (1 - μ) θ   (EMA target)
with d the pseudo-Huber distance √(‖a - b‖² + c²) - c (Song & Dhariwal 2023, §3.3).
Sampling (Song et al. 2023, Algorithm 1): x = f(σ_max z, σ_max), then for each chosen
σ_n: x = f(x + √(σ_n² - σ_min²) z, σ_n).

Easy consistency tuning (Geng et al. 2024, "Consistency Models Made Easy", §3; the schedule as
in their released code, locuslab/ect training/loss.py): consistency *training* that starts from
the teacher's weights, with no teacher ODE step. One noise ε is shared by the two points
    y_t = x_0 + t ε,   y_r = x_0 + r ε,
    r = max(t (1 - n(t)/q^{s+1}), 0),   n(t) = 1 + k·sigmoid(-b t),   s = ⌊i/d⌋   (`ect_r`)
(i the training step, d steps per stage: Δt = t - r halves (q = 2) every d steps, from Δt ≥ t
at stage 0 where r = 0 and the loss is denoising); the target is stop_grad f_θ(y_r, r) with the
online weights (no EMA target), or x_0 where r < σ_min;
    L = w(t) d(f_θ(y_t, t), target),   w(t) = 1/t² + 1/σ_data²   (`ect_weight`),
d pseudo-Huber (c = 0 in their release is the L2 norm).

Shapes: x, y, z [B, ...]; levels (α, σ, σ̃) [B] or scalars, broadcast over the trailing axes.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

PARAMETRIZATIONS = ('x', 'eps', 'v', 'x_eps')


def _b(a, x):
    """a [B] (or scalar) as [B, 1, …, 1] against x [B, ...]."""
    a = jnp.asarray(a, x.dtype)
    return a if a.ndim == 0 else a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


# ----------------------------------------------------------------------------------------------
# Progressive distillation
# ----------------------------------------------------------------------------------------------
def ddim_level_step(x0, z, alpha_s, sigma_s, alpha_t, sigma_t):
    """One deterministic DDIM step from level (α_s, σ_s) to (α_t, σ_t) with x̂_0 = x0:
    z_t = α_t x̂_0 + σ_t (z_s - α_s x̂_0)/σ_s.  x0, z [B, ...] -> [B, ...]."""
    eps = (z - _b(alpha_s, z) * x0) / _b(sigma_s, z)
    return _b(alpha_t, z) * x0 + _b(sigma_t, z) * eps


def x0_from_output(parametrization: str, out, z, alpha, sigma):
    """The student's x̂ from its output (see the module docstring). For 'x_eps' out is
    [B, ..., 2C]: the x head then the ε head on the last axis. Returns [B, ...] like z."""
    a, s = _b(alpha, z), _b(sigma, z)
    if parametrization == 'x':
        return out
    if parametrization == 'eps':
        return (z - s * out) / a
    if parametrization == 'v':
        return (a * z - s * out) / (a**2 + s**2)
    if parametrization == 'x_eps':
        x_head, eps_head = jnp.split(out, 2, axis=-1)
        return s**2 * x_head + a * (z - s * eps_head)
    raise ValueError(f'distill.parametrization={parametrization!r} is not valid; choose one of '
                     f'{", ".join(PARAMETRIZATIONS)}.')


def progressive_target(teacher_x0: Callable, z, levels):
    """x̃ of Salimans & Ho 2022, Algorithm 2, from two DDIM steps of the teacher.

    Args:
      teacher_x0: (z [B, ...], i) -> x̂_0 [B, ...] of the teacher at level i ∈ {0, 1}
        (0: the student's level t, 1: the midpoint t').
      z: z_t [B, ...].
      levels: ((α_t, σ_t), (α_t', σ_t'), (α_t'', σ_t'')), each [B]; σ_t'' may be 0 (the last
        student step lands on data: then x̃ = z_t''/α_t'').
    Returns:
      dict(target=x̃ [B, ...], z_mid=z_t', z_end=z_t'').
    """
    (a_t, s_t), (a_m, s_m), (a_e, s_e) = levels
    z_mid = ddim_level_step(teacher_x0(z, 0), z, a_t, s_t, a_m, s_m)
    z_end = ddim_level_step(teacher_x0(z_mid, 1), z_mid, a_m, s_m, a_e, s_e)
    ratio = _b(s_e / s_t, z)
    target = (z_end - ratio * z) / (_b(a_e, z) - ratio * _b(a_t, z))
    return dict(target=target, z_mid=z_mid, z_end=z_end)


def truncated_snr_weight(alpha, sigma):
    """max(α²/σ², 1) [B] (Salimans & Ho 2022, eq. 9)."""
    return jnp.maximum(jnp.asarray(alpha) ** 2 / jnp.asarray(sigma) ** 2, 1.0)


def progressive_loss(student_x0, target, alpha, sigma):
    """max(SNR, 1) · mean ‖x̃ - x̂_S‖² per example [B] (the mean over pixels, as L_simple)."""
    sq = jnp.mean((student_x0 - target) ** 2, axis=tuple(range(1, target.ndim)))
    return truncated_snr_weight(alpha, sigma) * sq


def halve_steps(num_steps: int, rounds: int) -> list[int]:
    """Student step counts of `rounds` rounds from `num_steps` teacher steps: N/2, N/4, ….
    ValueError in one line if a round would go below one step or N is not divisible."""
    out, n = [], int(num_steps)
    for r in range(int(rounds)):
        if n % 2 or n < 2:
            raise ValueError(f'distill.rounds={rounds} from distill.start_steps={num_steps}: '
                             f'round {r + 1} would halve {n} steps (below one step or not even); '
                             f'use at most {r} rounds or a start_steps that is a power of two.')
        n //= 2
        out.append(n)
    return out


# ----------------------------------------------------------------------------------------------
# Consistency distillation
# ----------------------------------------------------------------------------------------------
def c_skip(sigma, sigma_min, sigma_data):
    """σ_data²/((σ - σ_min)² + σ_data²) (Song et al. 2023, App. C); 1 at σ = σ_min."""
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def c_out(sigma, sigma_min, sigma_data):
    """σ_data (σ - σ_min)/√(σ² + σ_data²) (Song et al. 2023, App. C); 0 at σ = σ_min."""
    return sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma**2 + sigma_data**2)


def consistency_from_raw(raw, y, sigma, sigma_min, sigma_data):
    """f = c_skip(σ) y + c_out(σ) F for a raw network output F [B, ...]."""
    return (_b(c_skip(sigma, sigma_min, sigma_data), y) * y
            + _b(c_out(sigma, sigma_min, sigma_data), y) * raw)


def consistency_from_x0(x0, y, sigma, sigma_min, sigma_data):
    """f = c_skip(σ) y + (1 - c_skip(σ)) x̂_0 for a network that predicts x̂_0 [B, ...]."""
    skip = _b(c_skip(sigma, sigma_min, sigma_data), y)
    return skip * y + (1.0 - skip) * x0


def ode_ddim_step(x0, y, sigma, sigma_next):
    """Euler (= DDIM) on dy/dσ = (y - x̂_0)/σ: y' = x̂_0 + (σ'/σ)(y - x̂_0)."""
    return x0 + _b(sigma_next / sigma, y) * (y - x0)


def ode_heun_step(denoise: Callable, y, sigma, sigma_next):
    """Heun's step on dy/dσ = (y - D(y, σ))/σ (Karras et al. 2022, Alg. 1); denoise(y, σ [B])
    -> x̂_0 [B, ...]. Two teacher calls (one if σ' = 0: the Euler step)."""
    d = (y - denoise(y, sigma)) / _b(sigma, y)
    dsig = _b(sigma_next - sigma, y)
    y_euler = y + dsig * d
    safe_next = jnp.where(sigma_next > 0, sigma_next, 1.0)
    d_next = (y_euler - denoise(y_euler, safe_next)) / _b(safe_next, y)
    return jnp.where(_b(sigma_next > 0, y), y + dsig * 0.5 * (d + d_next), y_euler)


def pseudo_huber(a, b, c):
    """√(‖a - b‖² + c²) - c per example [B] (Song & Dhariwal 2023, eq. 11; their
    c = 0.00054 √d for d the data dimension)."""
    sq = jnp.sum((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    return jnp.sqrt(sq + c**2) - c


def consistency_loss(f_online, f_target, teacher_step: Callable, y, sigma, sigma_next, c):
    """d(f_θ(y_{n+1}, σ_{n+1}), stop_grad f_θ⁻(Φ(y_{n+1}), σ_n)) [B] (Song et al. 2023, Alg. 2).

    f_online, f_target: (y, σ [B]) -> [B, ...]; teacher_step: (y, σ, σ') -> y' (a DDIM or Heun
    step of the teacher's ODE); y = y_{n+1} [B, ...]; sigma = σ_{n+1} > sigma_next = σ_n [B].
    """
    y_next = jax.lax.stop_gradient(teacher_step(y, sigma, sigma_next))
    target = jax.lax.stop_gradient(f_target(y_next, sigma_next))
    return pseudo_huber(f_online(y, sigma), target, c)


def ema_update(target, online, mu):
    """θ⁻ <- μ θ⁻ + (1 - μ) stop_grad(θ) over matching pytrees."""
    return jax.tree.map(lambda t, o: mu * t + (1.0 - mu) * jax.lax.stop_gradient(o),
                        target, online)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float):
    """The N discretisation levels σ_1 < … < σ_N of Song et al. 2023 (Karras et al.'s ρ grid):
    σ_i = (σ_min^{1/ρ} + (i-1)/(N-1) (σ_max^{1/ρ} - σ_min^{1/ρ}))^ρ, [N] float32."""
    i = jnp.arange(n, dtype=jnp.float32)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


def consistency_sample(f: Callable, key, shape, sigmas, sigma_min):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) in y-space.

    f: (y [B, ...], σ [B]) -> [B, ...]; sigmas: [K] descending, sigmas[0] = σ_max (one call
    per level); returns x [B, ...] (y at σ_min)."""
    keys = jax.random.split(key, len(sigmas))
    batch = shape[0]
    x = f(sigmas[0] * jax.random.normal(keys[0], shape, jnp.float32),
          jnp.full((batch,), sigmas[0], jnp.float32))
    for k in range(1, len(sigmas)):
        noise = jax.random.normal(keys[k], shape, jnp.float32)
        y = x + jnp.sqrt(jnp.maximum(sigmas[k] ** 2 - sigma_min**2, 0.0)) * noise
        x = f(y, jnp.full((batch,), sigmas[k], jnp.float32))
    return x


# ----------------------------------------------------------------------------------------------
# Easy consistency tuning (Geng et al. 2024)
# ----------------------------------------------------------------------------------------------
def ect_r(t, stage, q: float, k: float, b: float):
    """r = max(t (1 - n(t)/q^{stage+1}), 0), n(t) = 1 + k sigmoid(-b t) [B] (Geng et al. 2024,
    the 'sigmoid' mapping of their release); t [B] (or scalar), stage an int (array)."""
    t = jnp.asarray(t, jnp.float32)
    n = 1.0 + k * jax.nn.sigmoid(-b * t)
    decay = jnp.asarray(q, jnp.float32) ** -(jnp.asarray(stage, jnp.float32) + 1.0)
    return jnp.maximum(t * (1.0 - decay * n), 0.0)


def ect_weight(t, sigma_data: float):
    """w(t) = 1/t² + 1/σ_data² [B] (their 'snrpk' weighting: SNR(t) + 1/σ_data²)."""
    t = jnp.asarray(t, jnp.float32)
    return 1.0 / t**2 + 1.0 / sigma_data**2


def ect_loss(f_online: Callable, f_target: Callable, x0, noise, t, r, sigma_min, sigma_data, c):
    """w(t) d(f_θ(x_0 + t ε, t), stop_grad f_θ(x_0 + r ε, r)) [B]; the target is x_0 where
    r < σ_min (the boundary: f(y, σ_min) = y ≈ x_0). f_online, f_target: (y [B, ...], σ [B]) ->
    [B, ...] (the same weights, the target under stop_gradient); x0, noise [B, ...]; t > r [B]."""
    y_t = x0 + _b(t, x0) * noise
    has_r = r >= sigma_min
    r_safe = jnp.where(has_r, r, sigma_min)  # evaluated everywhere, used only where has_r
    y_r = x0 + _b(r_safe, x0) * noise
    target = jax.lax.stop_gradient(jnp.where(_b(has_r, x0), f_target(y_r, r_safe), x0))
    return ect_weight(t, sigma_data) * pseudo_huber(f_online(y_t, t), target, c)
