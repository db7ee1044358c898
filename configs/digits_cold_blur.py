"""Cold diffusion by blurring (Bansal et al. 2022) on scikit-learn's 8x8 digits, on a CPU in a
few minutes: the digits default's data, network and optimisation, the degradation and loss of
Cold Diffusion.

    python -m diffusion_jax.main --config=configs/digits_cold_blur.py --workdir=runs/cold_blur
    python -m diffusion_jax.main --config=configs/digits_cold_blur.py --workdir=runs/cold_blur \
        --mode=sample

Degradation (diffusion_jax.cold): D(x_0, s) composes s Gaussian blurs of std
σ_i = 0.35 + i/100 (i = 0 … s-1), 11x11 kernel, reflect padding, T = 50: Bansal et al.'s CIFAR-10
schedule (github.com/arpitbansal297/Cold-Diffusion-Models, deblurring-diffusion-pytorch:
`--time_steps 50 --blur_routine 'Special_6_routine'`, whose kernels are 11x11, std i/100 + 0.35,
padding_mode='reflect'); at s = T the spatial mean follows (their `--discrete` generation), so
x_T is one grey level per image. The network restores x_0 from D(x_0, s) under the L1 loss
(their loss_type='l1'). Sampling: their Algorithm 2 ('cold', the reference's
sampling_routine='x0_step_down') from x_T drawn from a 10-component full-covariance Gaussian
mixture over the training images' channel means plus N(0, 0.002²) pixel noise (the reference
Trainer's GMM generation: clusters=10, noise_level=0.002).
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
from configs import digits

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_cold_blur')
    config = digits.get_config('runlocal' if 'runlocal' in options else None)
    config.name = 'digits_cold_blur'  # run name: the default workdir is runs/digits_cold_blur

    d = config.diffusion
    d.process = 'cold'  # Bansal et al. 2022's deterministic degradation (diffusion_jax.cold)
    d.degradation = 'blur'  # blur | mask | pixelate | fade
    d.num_timesteps = 50  # T: Bansal et al.'s CIFAR-10 deblurring (--time_steps 50)
    d.blur_std_start = 0.35  # σ_0 of the per-step blur ('Special_6_routine': i/100 + 0.35)
    d.blur_std_step = 0.01  # σ_i = σ_0 + i·step (the same routine's 1/100)
    d.blur_kernel_size = 11  # taps per side ('Special_6_routine': ks = 11)
    d.blur_padding = 'reflect'  # reflect | circular ('Special_6_routine': mode='reflect')
    d.blur_to_mean = True  # D(x_0, T) = the spatial mean (their --discrete generation)
    d.mask_std_step = 0.1  # (mask only) σ_i = mask_std_step·(i + mask_initial)
    d.mask_initial = 11.0  # (mask only) the reference's initial_mask default
    d.mask_center = 'center'  # (mask only) 'center' | 'random' (a centre per image, training key)
    d.prior_components = 10  # x_T's Gaussian mixture over channel means (reference: clusters=10)
    d.prior_noise_std = 0.002  # pixel noise added to x_T (reference: noise_level=0.002)
    d.prior_fit_examples = 10000  # training images the mixture is fitted to (at most)
    d.model_var_type = 'fixed_large'  # unused by cold diffusion; keeps out_channels = channels

    config.sampling.method = 'cold'  # Algorithm 2 (x_s - D(x̂_0, s) + D(x̂_0, s-1)); 'cold_naive'
    config.sampling.num_samples = 64  # an 8x8 grid
    return config
