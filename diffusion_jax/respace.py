"""Respaced (strided) diffusion schedules for faster sampling (Nichol & Dhariwal 2021, Sec. 4),
and the timestep spacings that choose the kept steps.

A model trained on T steps can be sampled over any increasing subsequence S = (t_1 < … < t_K) of
its timesteps: keeping ᾱ at those steps fixes the marginals q(x_{t_k}|x_0), and the new chain
uses β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}} (ᾱ_{t_0} := 1). The model still sees the original t_k.

Spacings (the strings of `sampling.num_steps`; t is 0-based, t = T-1 is pure-noise end):
  ''            all T steps.
  'N', N        N steps evenly spaced over [0, T-1], both ends kept: round(Σ_{j<i} (T-1)/(N-1)),
                the stride summed in floating point as improved-diffusion does (so an exact .5
                tie of i(T-1)/(N-1) may round down: T=1000, N=21 keeps 499, not 500).
  'a,b,c'       [0, T) cut into equal sections, each with its count of evenly spaced steps
                (improved-diffusion's section counts, the same running sum per section).
  'ddimN'       DDIM's integer stride 0, s, 2s, …: improved-diffusion's rule, the smallest
                stride s with len(range(0, T, s)) = N; raises when no integer stride gives N.
  'linspaceN'   round(linspace(0, T-1, N)) (the "linspace" spacing of Lin et al. 2023, Table 2):
                the steps of 'N' but at exact .5 ties.
  'trailingN'   round(jT/N) - 1 for j = 1..N (Lin et al. 2023, Table 2, "trailing"): the last
                step is T-1, so sampling starts from the end of the trained chain.
  'logsnrN'     uniform in λ = ½ log(ᾱ/(1-ᾱ)) between λ(T-1) and λ(0), each level snapped to the
                nearest discrete λ_t.
  'karrasN'     Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(N-1)(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ,
                ρ = 7, σ = √((1-ᾱ)/ᾱ), σ_max = σ(T-1), σ_min = σ(0), each σ_i snapped to the
                nearest discrete σ_t as EDM's iDDPM preconditioner does (its round_sigma).
The last two need the schedule (alphas_cumprod). Where more levels than discrete steps fall into a
stretch, two would snap to one step; the later ones then take the next free step, so every
spacing gives exactly N distinct steps (or raises).
"""
from __future__ import annotations

import re

import numpy as np

# Karras et al. 2022, eq. 5 and Table 1: ρ = 7 "for the rest of the paper".
KARRAS_RHO = 7.0

SPACINGS = ('ddim', 'linspace', 'trailing', 'logsnr', 'karras')
VALID_FORMS = ("'' (all T steps), 'N' (N evenly spaced, both ends kept), 'a,b,c' (per-section "
               "counts), " + ', '.join(f"'{s}N'" for s in SPACINGS))
_PREFIXED = re.compile(r'^(' + '|'.join(SPACINGS) + r')(\d+)$')


def _invalid(spec, why: str) -> ValueError:
    return ValueError(f'sampling.num_steps={spec!r}: {why}; valid forms: {VALID_FORMS}.')


def space_timesteps(num_timesteps: int, spec, alphas_cumprod=None) -> list[int]:
    """The sorted original timesteps to keep (see the module docstring for the forms).

    Args:
      num_timesteps: T of the original process.
      spec: a spacing string ('', 'N', 'a,b,c', 'ddimN', 'linspaceN', 'trailingN', 'logsnrN',
        'karrasN'), an int N, or a sequence of section counts.
      alphas_cumprod: [T] ᾱ of the schedule; needed by 'logsnrN' and 'karrasN' only.
    Returns:
      Sorted list of distinct ints in [0, T).
    """
    if isinstance(spec, (int, np.integer)):
        return _sections(num_timesteps, [int(spec)], spec)
    if not isinstance(spec, str):
        return _sections(num_timesteps, [int(c) for c in spec], spec)
    text = spec.strip()
    if not text:
        return list(range(num_timesteps))
    match = _PREFIXED.match(text)
    if match:
        kind, count = match.group(1), int(match.group(2))
        if not 1 <= count <= num_timesteps:
            raise _invalid(spec, f'the step count must be in [1, T={num_timesteps}]')
        if kind == 'ddim':
            return _ddim_steps(num_timesteps, count, spec)
        if kind == 'linspace':
            return linspace_steps(num_timesteps, count)
        if kind == 'trailing':
            return trailing_steps(num_timesteps, count)
        return _schedule_spacing(kind, num_timesteps, count, alphas_cumprod, spec)
    parts = [c.strip() for c in text.split(',')]
    if not all(re.fullmatch(r'\d+', c) for c in parts):
        raise _invalid(spec, 'not a step count')
    return _sections(num_timesteps, [int(c) for c in parts], spec)


def _sections(num_timesteps: int, counts: list[int], spec) -> list[int]:
    """improved-diffusion's section counts: [0, T) in len(counts) near-equal sections, each with
    its count of steps evenly spaced, both ends of the section included."""
    if not counts:
        raise _invalid(spec, 'no step count given')
    sizes = [num_timesteps // len(counts) + (1 if i < num_timesteps % len(counts) else 0)
             for i in range(len(counts))]
    steps, start = [], 0
    for size, count in zip(sizes, counts):
        if not 1 <= count <= size:
            raise _invalid(spec, f'cannot take {count} steps from a section of {size} steps '
                                 f'(T={num_timesteps}); use counts in [1, {size}]')
        # The stride is accumulated in floating point, as improved-diffusion's space_timesteps
        # does: at an exact .5 tie of i(size-1)/(count-1) the running sum lands just below it
        # (T=1000, N=21: 499, not 500), and a run sampled here must visit the reference's steps.
        stride, position = (size - 1) / (count - 1) if count > 1 else 1, 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def _ddim_steps(num_timesteps: int, count: int, spec) -> list[int]:
    # improved-diffusion (respace.py): the first integer stride s in [1, T) whose range(0, T, s)
    # has exactly `count` elements; when count divides T that is s = T/count.
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    if count == num_timesteps == 1:
        return [0]
    raise _invalid(spec, f'no integer stride gives exactly {count} steps of T={num_timesteps} '
                         f'(ddimN needs ceil(T/s) = N for some s); use e.g. "linspace{count}" or '
                         f'"trailing{count}"')


def linspace_steps(num_timesteps: int, count: int) -> list[int]:
    """Lin et al. 2023, Table 2 ("linspace"): round(linspace(0, T-1, N)), half to even as
    numpy's; 'N' but for exact .5 ties, where 'N' follows improved-diffusion's running sum."""
    return sorted({int(t) for t in np.round(np.linspace(0, num_timesteps - 1, count))})


def trailing_steps(num_timesteps: int, count: int) -> list[int]:
    """Lin et al. 2023, Table 2 ("trailing"): t_j = round(jT/N) - 1, j = 1..N, so t_N = T-1.

    Rounding is half-to-even, as numpy's (the reference code rounds np.arange(T, 0, -T/N)).
    """
    j = np.arange(1, count + 1, dtype=np.float64)
    return [int(t) for t in np.round(j * num_timesteps / count) - 1]


def _schedule_spacing(kind: str, num_timesteps: int, count: int, alphas_cumprod, spec):
    if alphas_cumprod is None:
        raise ValueError(f'sampling.num_steps={spec!r}: the {kind} spacing needs the schedule; '
                         'call space_timesteps(T, spec, alphas_cumprod=diffusion.alphas_cumprod) '
                         '(respace.respaced does).')
    abar = np.asarray(alphas_cumprod, np.float64)
    if abar.shape != (num_timesteps,):
        raise ValueError(f'alphas_cumprod has shape {abar.shape}; expected ({num_timesteps},).')
    if abar[-1] <= 0.0:
        raise ValueError(f'sampling.num_steps={spec!r}: the {kind} spacing is undefined when '
                         'ᾱ_T = 0 (zero terminal SNR: λ and σ are infinite at t = T-1); use '
                         f'"trailing{count}" (Lin et al. 2023) instead.')
    if count == 1:
        return [num_timesteps - 1]
    if kind == 'logsnr':
        levels = 0.5 * (np.log(abar) - np.log1p(-abar))  # λ_t, decreasing in t
        targets = np.linspace(levels[-1], levels[0], count)
    else:
        levels = np.sqrt((1.0 - abar) / abar)  # σ_t, increasing in t
        rho = KARRAS_RHO
        i = np.arange(count, dtype=np.float64) / (count - 1)
        targets = (levels[-1] ** (1 / rho) + i * (levels[0] ** (1 / rho)
                                                  - levels[-1] ** (1 / rho))) ** rho
    return snap_to_levels(levels, targets)


def snap_to_levels(levels: np.ndarray, targets: np.ndarray) -> list[int]:
    """Distinct timesteps nearest to `targets` in the monotone per-step `levels` [T] (λ_t or σ_t).

    Each target goes to argmin_t |levels_t - target| (EDM's round_sigma); where several land on
    one step (more targets than steps in a stretch), the sorted steps are pushed apart to
    consecutive ones, keeping t = 0 .. T-1 in range, so len(result) = len(targets) ≤ T.
    """
    levels, targets = np.asarray(levels, np.float64), np.asarray(targets, np.float64)
    if len(targets) > len(levels):
        raise ValueError(f'{len(targets)} levels cannot snap to {len(levels)} distinct steps.')
    nearest = np.sort(np.abs(levels[None, :] - targets[:, None]).argmin(axis=1))
    steps = nearest.copy()
    for k in range(1, len(steps)):  # strictly increasing, upwards
        steps[k] = max(steps[k], steps[k - 1] + 1)
    top = len(levels) - 1
    for k in range(len(steps) - 1, -1, -1):  # and inside [0, T-1], downwards
        steps[k] = min(steps[k], top)
        top = steps[k] - 1
    return [int(t) for t in steps]


def respaced_betas(alphas_cumprod: np.ndarray, betas: np.ndarray, use_timesteps) -> np.ndarray:
    """β' of the kept steps: β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}}; where t_{k-1} = t_k - 1 the original
    β_{t_k} is kept as is, so keeping every step reproduces the original schedule exactly."""
    kept = sorted(set(int(t) for t in use_timesteps))
    new_betas, prev = [], None
    for t in kept:
        if prev == t - 1 or (prev is None and t == 0):
            new_betas.append(betas[t])
        else:
            last_abar = 1.0 if prev is None else alphas_cumprod[prev]
            new_betas.append(1.0 - alphas_cumprod[t] / last_abar)
        prev = t
    return np.asarray(new_betas, dtype=np.float64)


def respaced(diffusion, num_steps):
    """The diffusion over `num_steps` ('' / None / 0: unchanged; '250', 'ddim50', '10,20',
    'trailing20', 'linspace20', 'logsnr20', 'karras20': see space_timesteps)."""
    if num_steps in ('', None, 0):
        return diffusion
    return diffusion.respace(space_timesteps(diffusion.num_timesteps, str(num_steps),
                                             alphas_cumprod=np.asarray(diffusion.alphas_cumprod)))
