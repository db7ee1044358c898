"""The step schedules the edits share (samplers/edit.py on the Gaussian chain, process_edit.py on
a process's grid): RePaint's jump-back path and SDEdit's start index."""
from __future__ import annotations

import math

import numpy as np


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
    """The levels RePaint's chain visits, from K - 1 (noise) to -1 (data), one step at a time:
    after reaching a level t that is a multiple of jump_length (t < K - jump_length), the chain
    goes back up jump_length levels, jump_n_sample - 1 times in all (Lugmayr et al. 2022, Sec.
    4.2; jump_n_sample = 1 is the plain chain). Returns int32 [n + 1]."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f'edit.jump_length={jump_length} and edit.jump_n_sample={jump_n_sample} '
                         'must be >= 1 (1 and 1: no resampling).')
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, path = num_steps - 1, [num_steps - 1]
    while t >= 0:
        t -= 1
        path.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                path.append(t)
    return np.asarray(path, np.int32)


def sdedit_start(num_steps: int, strength: float) -> int:
    """t0 = ceil(strength · K) - 1: the chain index SDEdit noises the input to."""
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f'edit.strength={strength} must be in (0, 1]: the fraction of the chain '
                         'to re-run (Meng et al. use 0.3-0.6).')
    return max(int(math.ceil(strength * num_steps)) - 1, 0)
