"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic
Models").

    python -m diffusion_jax.main --config=configs/cifar10_improved.py         # L_hybrid
    python -m diffusion_jax.main --config=configs/cifar10_improved.py:vlb     # L_vlb, loss-aware t
    python -m diffusion_jax.main --config=configs/cifar10_improved.py:runlocal

Cosine schedule with T = 4000, learned_range variance, L_hybrid (or, with `vlb`, L_vlb with
loss-aware importance sampling of t, Sec. 3.3), the 52.5M UNet (3 res blocks, 4 heads, attention
at 16 and 8, scale-shift norm, dropout 0.3), Adam at 1e-4 without warm-up or clipping, batch 128,
EMA 0.9999, 500k steps. Citations: the paper's Sec. 3 and Appendix A, and the CIFAR-10 flags of the
released improved-diffusion README.
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
from configs import cifar10, model_configs

OPTIONS = ('runlocal', 'vlb')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'cifar10_improved')
    config = cifar10.get_config()
    config.name = 'cifar10_improved' + ('_vlb' if 'vlb' in options else '')  # run name

    config.model = model_configs.improved_ddpm_cifar10()  # 52,546,438 parameters, dropout 0.3

    d = config.diffusion
    d.beta_schedule = 'cosine'  # Nichol & Dhariwal 2021, Sec. 3.2, eq. 17
    d.num_timesteps = 4000  # their CIFAR-10 runs (README: --diffusion_steps 4000)
    d.beta_start = None  # the linear schedule's endpoints do not apply to the cosine one
    d.beta_end = None
    d.cosine_s = 0.008  # offset s (Nichol & Dhariwal 2021, Sec. 3.2)
    d.model_mean_type = 'eps'  # ε-prediction (Nichol & Dhariwal 2021, Sec. 3.1)
    d.model_var_type = 'learned_range'  # Σ = exp(v log β + (1-v) log β̃) (eq. 15)
    d.loss_type = 'hybrid'  # L_simple + 0.001 L_vlb (Sec. 3.1)
    d.timestep_sampler = 'uniform'  # L_hybrid samples t uniformly (Sec. 3.3)
    if 'vlb' in options:
        # L_vlb alone: T·L_t per example, t drawn ∝ sqrt(E[L_t²]) (Sec. 3.3, eq. 18).
        d.loss_type = 'rescaled_kl'
        d.timestep_sampler = 'loss_aware'

    t = config.training
    t.batch_size = 128  # README CIFAR-10 flags: --batch_size 128
    t.num_train_steps = 500_000  # Nichol & Dhariwal 2021, App. A: 500K CIFAR-10 iterations
    t.ema_decay = 0.9999  # Nichol & Dhariwal 2021, App. A

    o = config.optim
    o.learning_rate = 1e-4  # README CIFAR-10 flags: --lr 1e-4
    o.warmup_steps = 0  # improved-diffusion uses no warm-up
    o.grad_clip = 0.0  # nor gradient clipping
    o.weight_decay = 0.0  # improved-diffusion's AdamW default weight_decay=0.0

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
