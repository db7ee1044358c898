"""Cold diffusion by masking (Bansal et al. 2022's inpainting degradation) on scikit-learn's
8x8 digits, on a CPU in a few minutes: the digits default's data, network and optimisation.

    python -m diffusion_jax.main --config=configs/digits_cold_mask.py --workdir=runs/cold_mask
    python -m diffusion_jax.main --config=configs/digits_cold_mask.py --workdir=runs/cold_mask \
        --mode=sample          # restores the held-out digits masked to level T

Degradation (diffusion_jax.cold): D(x_0, s) = m_s ⊙ x_0, m_s = ∏_{i<s} (1 - exp(-r²/(2σ_i²))),
σ_i = mask_std_step·(i + mask_initial), r the distance to the centre pixel: the reference's
growing Gaussian-edged hole (github.com/arpitbansal297/Cold-Diffusion-Models,
defading-diffusion-pytorch; MNIST inpainting: `--time_steps 50 --blur_std 0.1`, initial_mask 11,
at 32x32). Here T = 50, initial 11 and the std step 0.1 scaled by the image width 8/32 to 0.025
px, so that the hole covers the same fraction of the digit: at s = T the centre 5x5 pixels are
< 2% kept, the border mostly kept (mean multiplier 0.42). The reference places the hole at a
random centre (Random_Incremental: --config.diffusion.mask_center=random, one centre per
training image drawn from the training key); this config keeps it centred ('Incremental'). The L1
restoration loss and Algorithm 2 ('cold') as the reference; the end state keeps the border of
the image, so --mode=sample restores the degraded eval.split (held-out) digits
deterministically rather than generating from a prior.
"""
from __future__ import annotations

import pathlib
import sys

import ml_collections

try:
    import configs
except ImportError:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import configs
from configs import digits_cold_blur

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_cold_mask')
    config = digits_cold_blur.get_config('runlocal' if 'runlocal' in options else None)
    config.name = 'digits_cold_mask'  # run name: the default workdir is runs/digits_cold_mask

    d = config.diffusion
    d.degradation = 'mask'  # the growing Gaussian-edged hole
    d.num_timesteps = 50  # T (the reference's MNIST inpainting: --time_steps 50)
    d.mask_std_step = 0.025  # the reference's kernel_std 0.1 at 32 px, scaled by 8/32
    d.mask_initial = 11.0  # σ_i = 0.025·(i + 11) px (the reference's initial_mask = 11)
    d.mask_center = 'center'  # the hole at the centre pixel; 'random': the paper's per-image centre
    return config
