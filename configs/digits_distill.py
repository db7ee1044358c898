"""Few-step students of the digits teacher (configs/digits.py): progressive distillation
(Salimans & Ho 2022) or consistency distillation (Song et al. 2023), trained as ordinary runs.

    python -m diffusion_jax.main --config=configs/digits_distill.py --workdir=runs/digits_pd \
        --config.distill.teacher_workdir=runs/digits
    python -m diffusion_jax.main --config=configs/digits_distill.py:consistency \
        --workdir=runs/digits_cd --config.distill.teacher_workdir=runs/digits

The network and diffusion sections are the teacher's (configs/digits.py; the run refuses a
teacher whose stored sections differ). One progressive round per run: from
distill.start_steps teacher DDIM steps to half as many; the next round is a run with this one as
its teacher and start_steps halved. Not measured yet on this CPU (no FID table here).
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

OPTIONS = ('progressive', 'consistency', 'runlocal')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_distill')
    config = digits.get_config('runlocal' if 'runlocal' in options else None)
    method = 'consistency' if 'consistency' in options else 'progressive'
    config.name = f'digits_{"cd" if method == "consistency" else "pd"}'

    d = config.distill = ml_collections.ConfigDict()
    d.teacher_workdir = ''  # the teacher run (required): its EMA weights start the student
    d.teacher_step = -1  # the teacher's checkpoint; -1: its latest valid one
    d.method = method  # 'progressive' (Salimans & Ho 2022, Alg. 2) | 'consistency' (Song et al. 2023)
    # progressive: the teacher's DDIM steps of this round; the student takes half as many.
    # Salimans & Ho start from 1024 (CIFAR-10); the digits teacher has T = 200 levels: 8 -> 4.
    d.start_steps = 8
    d.num_scales = 18  # consistency: N levels (Song et al. 2023, CIFAR-10 CD: N = 18)
    d.sigma_data = 0.5  # consistency: σ_data of c_skip (Song et al. 2023, App. C: 0.5)
    d.huber_c_per_dim = 0.00054  # pseudo-Huber c = 0.00054 √d (Song & Dhariwal 2023, §3.3)

    t = config.training
    t.num_train_steps = 500 if 'runlocal' not in options else 20
    # consistency: θ⁻'s EMA rate μ (Song et al. 2023, CD on CIFAR-10: 0.95); progressive:
    # the sampling EMA, as the teacher's.
    t.ema_decay = 0.95 if method == 'consistency' else 0.995
    o = config.optim
    o.learning_rate = 2e-4  # a fine-tune of the teacher's weights: a smaller step
    o.warmup_steps = 0

    s = config.sampling
    if method == 'consistency':
        s.method, s.num_steps = 'consistency', 'trailing2'
    else:
        s.method, s.num_steps = 'ddim', f'trailing{d.start_steps // 2}'
    s.clip_denoised = True
    return config
