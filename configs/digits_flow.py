"""Flow matching on the digits (the offline default's data, network and optimisation).

    python -m diffusion_jax.main --config=configs/digits_flow.py --workdir=runs/digits_flow
    python -m diffusion_jax.main --config=configs/digits_flow.py --workdir=runs/digits_flow \\
        --mode=sample

Rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023) in SD3's
convention (Esser et al. 2024): x_t = (1-t) x_0 + t ε, the UNet predicts v = ε - x_0, trained
with SD3's logit-normal t (m = 0, s = 1: their rf/lognorm(0.00, 1.00), Sec. 5.1, Table 1), no
resolution shift (8x8 images); sampled with Euler over 50 uniform steps (50 network calls).
Everything else is configs/digits.py's (same UNet, steps, batch, EMA), so the two compare.
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
    config.name = 'digits_flow'  # the default workdir is runs/digits_flow

    d = config.diffusion
    d.process = 'flow'  # diffusion_jax.processes.FlowMatching
    # The GaussianDiffusion fields above stay as digits.py's; the flow process does not read them.
    d.flow = f = ml_collections.ConfigDict()
    f.prediction = 'velocity'  # v = ε - x_0 (SD3, Sec. 2)
    f.time_sampling = 'logit_normal'  # SD3, Sec. 3.1 ("lognorm")
    f.logit_mean = 0.0  # m (SD3, Table 1: rf/lognorm(0.00, 1.00) ranks first)
    f.logit_std = 1.0  # s
    f.shift = 1.0  # SD3's resolution shift s (eq. 23); 1: none at 8x8
    # The network sees 1000·t, the timestep scale of SD3's and diffusers' flow-matching
    # transformers (`timestep = sigma * 1000`), so the sinusoidal embedding spans its range.
    f.time_scale = 1000.0

    s = config.sampling
    s.method = 'euler'  # Euler on dx/dt = v (SD3 samples with Euler, Sec. 5.1)
    s.num_steps = '50'  # K = 50 steps: 50 network calls (a string, as every spacing)
    s.clip_denoised = False  # the ODE's own x̂_0 (clipping x̂_0 would change the velocity)

    # The bound of the discrete chain does not exist here: bits/dim through the probability-flow
    # ODE (evaluation.likelihood.ode_bpd; dopri5, Hutchinson, uniform dequantisation).
    config.eval.nll_estimator = 'ode'
    return config
