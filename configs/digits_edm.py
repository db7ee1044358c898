"""EDM (Karras et al. 2022) on the digits (the offline default's data, network and optimisation).

    python -m diffusion_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
    python -m diffusion_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm \\
        --mode=sample

x_σ = x_0 + σ ε with EDM's preconditioning, training law and loss weight (Table 1, "Ours"
column: σ_data = 0.5, ln σ ~ N(-1.2, 1.2²), λ(σ) = (σ² + σ_d²)/(σ σ_d)²) and its deterministic
Heun sampler over the ρ = 7 grid from σ_max = 80 to σ_min = 0.002 with 18 steps (35 network
calls, their CIFAR-10 setting, Table 2). Everything else is configs/digits.py's.
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

OPTIONS = digits.OPTIONS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = digits.get_config(arg)
    config.name = 'digits_edm'  # the default workdir is runs/digits_edm

    d = config.diffusion
    d.process = 'edm'  # diffusion_jax.processes.EDM
    # The GaussianDiffusion fields above stay as digits.py's; the EDM process does not read them.
    d.edm = e = ml_collections.ConfigDict()
    e.sigma_min = 0.002  # Karras et al. 2022, Table 1
    e.sigma_max = 80.0  # Table 1
    e.sigma_data = 0.5  # σ_data (Table 1; data in [-1, 1])
    e.rho = 7.0  # ρ of the sampling grid (eq. 5, Table 1)
    e.p_mean = -1.2  # P_mean of ln σ (Table 1)
    e.p_std = 1.2  # P_std (Table 1)

    s = config.sampling
    s.method = 'heun'  # EDM Algorithm 2 (S_churn = 0: Algorithm 1, deterministic)
    s.num_steps = '18'  # N = 18: 35 network calls (Table 2, CIFAR-10)
    s.clip_denoised = False  # the ODE's own D
    s.s_churn = 0.0  # deterministic (Table 5 tunes S_churn for ImageNet only)

    # The bound of the discrete chain does not exist here: bits/dim through the probability-flow
    # ODE (evaluation.likelihood.ode_bpd; dopri5, Hutchinson, uniform dequantisation).
    config.eval.nll_estimator = 'ode'
    return config
