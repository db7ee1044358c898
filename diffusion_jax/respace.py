"""Respaced (strided) diffusion schedules for faster sampling (Nichol & Dhariwal 2021, Sec. 4;
the even "ddimN" stride of Song et al. 2021).

A model trained on T steps can be sampled over any increasing subsequence S = (t_1 < … < t_K) of
its timesteps: keeping ᾱ at those steps fixes the marginals q(x_{t_k}|x_0), and the new chain
uses β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}} (ᾱ_{t_0} := 1). The model still sees the original t_k.
"""
from __future__ import annotations

import numpy as np


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The sorted original timesteps to keep.

    Args:
      num_timesteps: T of the original process.
      section_counts: "ddimN" (N steps at an even integer stride, as DDIM: 0, s, 2s, …), an int
        or "N" (N steps spread evenly over [0, T-1]), or a comma list / sequence of per-section
        counts ("10,15,20"): [0, T) is cut into len(counts) equal sections and each section gets
        its count of evenly spaced steps, first and last step of the section included.
    Returns:
      Sorted list of distinct ints in [0, T).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith('ddim'):
            return _ddim_steps(num_timesteps, _parse_int(text[4:], section_counts))
        counts = [_parse_int(c, section_counts) for c in text.split(',') if c.strip()]
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError(f'section_counts={section_counts!r} is empty; give e.g. "ddim50" or "25".')
    sizes = [num_timesteps // len(counts) + (1 if i < num_timesteps % len(counts) else 0)
             for i in range(len(counts))]
    steps, start = [], 0
    for size, count in zip(sizes, counts):
        if not 1 <= count <= size:
            raise ValueError(f'section_counts={section_counts!r}: cannot take {count} steps from a '
                             f'section of {size} steps (T={num_timesteps}); use counts in [1, {size}].')
        if count == 1:
            steps.append(start)
        else:
            # Evenly spaced with both ends of the section kept, rounded to integers.
            steps.extend(start + round(i * (size - 1) / (count - 1)) for i in range(count))
        start += size
    return sorted(set(steps))


def _parse_int(text: str, whole) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f'section_counts={whole!r} is not valid: use "ddimN", "N" or a comma list '
                         'of integers such as "10,15,20".') from None


def _ddim_steps(num_timesteps: int, count: int) -> list[int]:
    if not 1 <= count <= num_timesteps:
        raise ValueError(f'ddim{count}: the step count must be in [1, {num_timesteps}].')
    stride = num_timesteps // count
    return list(range(0, stride * count, stride))


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


def respace_diffusion(diffusion, use_timesteps):
    """A GaussianDiffusion over the kept steps of `diffusion`, composing its timestep_map."""
    from diffusion_jax.diffusion import GaussianDiffusion  # pylint: disable=import-outside-toplevel
    kept = sorted(set(int(t) for t in use_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= diffusion.num_timesteps:
        raise ValueError(f'use_timesteps must be a non-empty set of ints in [0, '
                         f'{diffusion.num_timesteps}); got {sorted(use_timesteps)[:5]}….')
    betas = respaced_betas(np.asarray(diffusion.alphas_cumprod, np.float64),
                           np.asarray(diffusion.betas, np.float64), kept)
    timestep_map = np.asarray(diffusion.timestep_map)[kept]
    return GaussianDiffusion(betas, diffusion.model_mean_type, diffusion.model_var_type,
                             diffusion.loss_type, timestep_map=timestep_map)
