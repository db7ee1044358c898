"""Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", Sec. 3.4 and eq. 9–11).

The x_0-space loss of timestep t is weighted by w_t = min(SNR(t), γ), SNR = α²/σ². Written in
the network's own regression target it becomes
    ε-prediction:  w = min(SNR, γ)/SNR = min(1, γ/SNR)
    x0-prediction: w = min(SNR, γ)
    v-prediction:  w = min(SNR, γ)/(SNR + 1)
since x̂_0 - x_0 = -(σ/α)(ε̂ - ε) = -σ(v̂ - v) for α² + σ² = 1 (v = α ε - σ x_0), so
‖x̂_0 - x_0‖² = ‖ε̂ - ε‖²/SNR = ‖v̂ - v‖²/(SNR + 1) (the paper's eq. 9-11).
The paper's γ = 5 is the default of `diffusion.min_snr_gamma` (configs).
"""
from __future__ import annotations

import jax.numpy as jnp

WEIGHTINGS = ('none', 'min_snr')
PREDICTIONS = ('eps', 'x0', 'v')


def min_snr_weight(snr, gamma: float, prediction: str):
    """w(SNR) of min-SNR-γ for the given parametrisation; snr any shape (>= 0), same shape out.

    The ε form is min(1, γ/SNR), finite at SNR = 0 (a zero-terminal-SNR schedule's last step).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f'diffusion.model_mean_type={prediction!r}: min-SNR weighting is defined '
                         f'for {", ".join(PREDICTIONS)}.')
    snr = jnp.asarray(snr, jnp.float32)
    clipped = jnp.minimum(snr, gamma)
    if prediction == 'eps':
        return jnp.minimum(1.0, gamma / snr)
    if prediction == 'x0':
        return clipped
    return clipped / (snr + 1.0)
