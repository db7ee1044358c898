"""Variance schedules β_1..β_T of the forward process q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I).

Every schedule is returned as a float64 numpy array of shape [T]; index t (0-based) holds the β of
the (t+1)-th noising step, so ᾱ_t = ∏_{s<=t} (1 - β_s) is the signal level after t+1 steps.

Schedules:
    linear     Ho et al. 2020: β from 1e-4 to 0.02 at T = 1000. For other T the endpoints are
                          multiplied by 1000/T (Nichol & Dhariwal 2021), so that the total amount of noise, and
                          with it ᾱ_T ≈ 0, stays comparable across T.
    cosine     Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
                          s = 0.008, β_t = min(1 - ᾱ_t/ᾱ_{t-1}, 0.999) so the chain never becomes singular at t = T.
    quadratic  β spaced linearly in √β between the linear schedule's endpoints (Ho et al.'s code).
    scaled_linear  Stable Diffusion's (Rombach et al. 2022; diffusers' 'scaled_linear'): β
                          linear in √β from 0.00085 to 0.012 at T = 1000 (endpoints × 1000/T otherwise).
    sigmoid    β = β_start + (β_end - β_start)·sigmoid(linspace(-6, 6, T)) (Ho et al.'s code).
    const      β_t = β_end for every t.
    jsd        β_t = 1/(T - t): 1/T, 1/(T-1), …, 1 (Sohl-Dickstein et al. 2015's choice; ᾱ_T = 0).

Any schedule can be rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1):
rescale_zero_terminal_snr (config field diffusion.rescale_zero_terminal_snr).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Ho et al. 2020, Sec. 4: "β1 = 1e-4 to βT = 0.02" at T = 1000.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
DDPM_NUM_TIMESTEPS = 1000
# Stable Diffusion v1/v2 (CompVis and Stability configs, linear_start/linear_end; diffusers'
# scheduler_config.json beta_start/beta_end with beta_schedule='scaled_linear') at T = 1000.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
# Nichol & Dhariwal 2021, Sec. 3.2: offset s and the β clip of the cosine schedule.
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


def _check_range(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f'{name}={value} is outside (0, 1): a variance β must lie in (0, 1). '
                         'For small T the default endpoints (scaled by 1000/T) leave that range: '
                         'pass beta_start/beta_end explicitly.')


def _endpoints(num_timesteps: int, beta_start: float | None, beta_end: float | None):
    scale = DDPM_NUM_TIMESTEPS / num_timesteps
    start = DDPM_BETA_START * scale if beta_start is None else beta_start
    end = DDPM_BETA_END * scale if beta_end is None else beta_end
    _check_range('beta_start', start)
    _check_range('beta_end', end)
    if start > end:
        raise ValueError(f'beta_start={start} > beta_end={end}: the schedule must not decrease.')
    return start, end


def linear(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None):
    start, end = _endpoints(num_timesteps, beta_start, beta_end)
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def quadratic(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None):
    start, end = _endpoints(num_timesteps, beta_start, beta_end)
    return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2


def scaled_linear(num_timesteps: int, beta_start: float | None = None,
                  beta_end: float | None = None):
    """β_t = (√β_start + (√β_end - √β_start)·t/(T-1))², Stable Diffusion's schedule."""
    scale = DDPM_NUM_TIMESTEPS / num_timesteps
    return quadratic(num_timesteps, SD_BETA_START * scale if beta_start is None else beta_start,
                     SD_BETA_END * scale if beta_end is None else beta_end)


def sigmoid(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None):
    start, end = _endpoints(num_timesteps, beta_start, beta_end)
    x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return start + (end - start) / (1.0 + np.exp(-x))


def const(num_timesteps: int, beta_end: float | None = None):
    _, end = _endpoints(num_timesteps, None, beta_end)
    return np.full([num_timesteps], end, dtype=np.float64)


def jsd(num_timesteps: int):
    return 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)


def cosine_alphas_cumprod(t: np.ndarray, num_timesteps: int, s: float = COSINE_S) -> np.ndarray:
    """ᾱ(t) = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1+s))·π/2), for continuous t in [0, T]."""
    f = lambda u: np.cos((u / num_timesteps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return f(np.asarray(t, np.float64)) / f(0.0)


def cosine(num_timesteps: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA):
    if s < 0:
        raise ValueError(f's={s} must be >= 0 for the cosine schedule (Nichol & Dhariwal use 0.008).')
    _check_range('max_beta', max_beta)
    abar = cosine_alphas_cumprod(np.arange(num_timesteps + 1), num_timesteps, s)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """β of the schedule rescaled to ᾱ_T = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Sec. 3.1 and Algorithm 1).

    √ᾱ is shifted and scaled linearly so that its first value is kept and its last becomes 0:
        √ᾱ'_t = (√ᾱ_t - √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 - √ᾱ_T),
    then β'_t = 1 - ᾱ'_t/ᾱ'_{t-1} (ᾱ'_0 := 1), so β'_1 = β_1 and β'_T = 1: x_T is pure noise.
    With ᾱ_T = 0 an ε-prediction network cannot recover x̂_0 at t = T (x̂_0 = (x_T - √(1-ᾱ_T)ε)/√ᾱ_T
    divides by zero), so Lin et al. train with v-prediction; create_diffusion refuses 'eps'.

    Args:
      betas: [T] float array in (0, 1], T >= 2.
    Returns:
      [T] float64 β' in (0, 1] with β'_T = 1 exactly.
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f'rescale_zero_terminal_snr needs T >= 2 betas; got shape {betas.shape}.')
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    if not first > last:
        raise ValueError('rescale_zero_terminal_snr: ᾱ must decrease over the chain (√ᾱ_1 > √ᾱ_T).')
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    sqrt_abar[-1] = 0.0  # exactly, not up to rounding
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    rescaled = 1.0 - alphas
    rescaled[0] = betas[0]  # √ᾱ_1 is unchanged, so β_1 is too; keep it free of rounding
    return rescaled


_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
        'linear': linear,
        'cosine': cosine,
        'quadratic': quadratic,
        'sigmoid': sigmoid,
        'const': const,
        'jsd': jsd,
        'scaled_linear': scaled_linear,
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get_beta_schedule(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """β_1..β_T of a named schedule: float64 array of shape [num_timesteps], each in (0, 1].

    Args:
        name: one of SCHEDULE_NAMES.
        num_timesteps: T >= 1.
        **kwargs: schedule options: beta_start/beta_end (linear, quadratic, sigmoid; beta_end for
            const), s/max_beta (cosine).
    """
    if name not in _SCHEDULES:
        raise ValueError(f'Unknown beta schedule {name!r}; valid names: {", ".join(SCHEDULE_NAMES)}.')
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f'num_timesteps={num_timesteps!r} must be a positive integer.')
    try:
        betas = _SCHEDULES[name](int(num_timesteps), **kwargs)
    except TypeError as e:
        raise ValueError(f'Invalid options {sorted(kwargs)} for the {name!r} schedule: {e}') from None
    assert betas.shape == (num_timesteps,) and np.all(betas > 0) and np.all(betas <= 1)
    return betas
