"""Flow matching (rectified flow in SD3's convention) on CIFAR-10 with Ho et al.'s network,
for accelerators.

    python -m diffusion_jax.main --config=configs/cifar10_flow.py
    python -m diffusion_jax.main --config=configs/cifar10_flow.py:runlocal   # tiny, for a laptop

x_t = (1 - t) x_0 + t ε, the network predicts v = ε - x_0 (Esser et al. 2024, SD3, Sec. 2), with
training times from SD3's best-ranked law, logit-normal(0, 1) ("rf/lognorm(0.00, 1.00)", Table
1), no resolution shift at 32x32 (SD3's shift s is for high resolutions, eq. 23), the network
fed 1000·t as SD3's and diffusers' flow-matching models are, and Euler sampling (SD3, Sec. 5.1)
with 50 steps. The network, data and optimisation are Ho et al.'s CIFAR-10 setting
(configs/cifar10.py): only the process changes, so the run compares with DDPM's directly.
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
    config = cifar10.get_config(arg)
    config.name = 'cifar10_flow'  # the default workdir is runs/cifar10_flow

    d = config.diffusion
    d.process = 'flow'  # diffusion_jax.processes.FlowMatching; the GaussianDiffusion fields are not read
    d.flow = f = ml_collections.ConfigDict()
    f.prediction = 'velocity'  # v = ε - x_0 (SD3, Sec. 2)
    f.time_sampling = 'logit_normal'  # SD3, Sec. 3.1 ("lognorm")
    f.logit_mean = 0.0  # m (SD3, Table 1: rf/lognorm(0.00, 1.00) ranks first)
    f.logit_std = 1.0  # s
    f.shift = 1.0  # SD3's resolution shift s (eq. 23); 1: none at 32x32
    f.time_scale = 1000.0  # the network sees 1000·t (SD3's / diffusers' `timestep = sigma * 1000`)

    s = config.sampling
    s.method = 'euler'  # Euler on dx/dt = v (SD3 samples with Euler, Sec. 5.1)
    s.num_steps = '50'  # K = 50 steps: 50 network calls
    s.clip_denoised = False  # the ODE's own x̂_0 (clipping x̂_0 would change the velocity)

    config.eval.nll_estimator = 'ode'  # the probability-flow ODE's bits/dim (no bound here)
    return config
