"""EDM (Karras et al. 2022) on CIFAR-10 with Ho et al.'s network, for accelerators.

    python -m diffusion_jax.main --config=configs/cifar10_edm.py
    python -m diffusion_jax.main --config=configs/cifar10_edm.py:runlocal   # tiny, for a laptop

The process, preconditioning and sampler of EDM's Table 1 ("Ours": σ_data = 0.5,
ln σ ~ N(-1.2, 1.2²), λ(σ) = (σ² + σ_d²)/(σ σ_d)², Heun over the ρ = 7 grid, 18 steps = 35
network calls, Table 2) and the training of its Table 7, CIFAR-10 column: 200 Mimg at
minibatch 512, learning rate 10·10⁻⁴ with a 10 Mimg linear ramp-up, no gradient clipping, EMA
half-life 0.5 Mimg, dropout 13%. Not carried over: their DDPM++/NCSN++ networks (the network
here is Ho et al.'s 35.7M UNet of configs/cifar10.py) and their 12% non-leaking augmentation
(no augmentation pipeline here). Images here are counted in steps: 200 Mimg / 512 = 390,625
steps, 10 Mimg / 512 = 19,531 warm-up steps, and the half-life of 0.5 Mimg = 976.6 steps is the
per-step EMA decay 0.5^(1/976.6) = 0.99929.
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
from configs import cifar10

OPTIONS = cifar10.OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'cifar10_edm')
    config = cifar10.get_config()
    config.name = 'cifar10_edm'  # the default workdir is runs/cifar10_edm

    d = config.diffusion
    d.process = 'edm'  # diffusion_jax.processes.EDM; the GaussianDiffusion fields are not read
    d.edm = e = ml_collections.ConfigDict()
    e.sigma_min = 0.002  # Karras et al. 2022, Table 1
    e.sigma_max = 80.0  # Table 1
    e.sigma_data = 0.5  # σ_data (Table 1; data in [-1, 1])
    e.rho = 7.0  # ρ of the sampling grid (eq. 5, Table 1)
    e.p_mean = -1.2  # P_mean of ln σ (Table 1)
    e.p_std = 1.2  # P_std (Table 1)

    t = config.training
    t.batch_size = 512  # minibatch (Table 7, CIFAR-10)
    t.num_train_steps = 390_625  # 200 Mimg (Table 7) / 512
    t.ema_decay = 0.99929  # EMA half-life 0.5 Mimg (Table 7) = 976.6 steps of 512: 0.5^(1/976.6)

    o = config.optim
    o.learning_rate = 1e-3  # 10·10⁻⁴ (Table 7, CIFAR-10)
    o.warmup_steps = 19_531  # LR ramp-up 10 Mimg (Table 7) / 512
    o.grad_clip = 0.0  # no gradient clipping (Table 7)

    s = config.sampling
    s.method = 'heun'  # EDM Algorithm 2 with S_churn = 0 (Algorithm 1, deterministic)
    s.num_steps = '18'  # N = 18: 35 network calls (Table 2, CIFAR-10)
    s.clip_denoised = False  # the ODE's own D
    s.s_churn = 0.0  # deterministic (Table 5 tunes S_churn for ImageNet only)

    config.eval.nll_estimator = 'ode'  # the probability-flow ODE's bits/dim (no bound here)

    config.model.dropout = 0.13  # dropout probability 13% (Table 7, CIFAR-10)

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
