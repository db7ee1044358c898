"""Few-step students of the digits teacher (configs/digits.py): progressive distillation
(Salimans & Ho 2022), consistency distillation (Song et al. 2023) or easy consistency tuning
(Geng et al. 2024), trained as ordinary runs.

    python -m diffusion_jax.main --config=configs/digits_distill.py --workdir=runs/digits_pd \
        --config.distill.teacher_workdir=runs/digits
    python -m diffusion_jax.main --config=configs/digits_distill.py:consistency \
        --workdir=runs/digits_cd --config.distill.teacher_workdir=runs/digits
    python -m diffusion_jax.main --config=configs/digits_distill.py:ect \
        --workdir=runs/digits_ect --config.distill.teacher_workdir=runs/digits
    python -m diffusion_jax.main --workdir=runs/digits_pd --mode=sample   # the last round's steps

The network and diffusion sections are the teacher's (configs/digits.py; the run refuses a
teacher whose stored sections differ). Progressive: distill.rounds rounds of
distill.steps_per_round steps in one run, 32 -> 16 -> 8 -> 4 -> 2 -> 1 teacher DDIM steps; each
round's student is the checkpoint at the round's last step, listed with its step count in
<workdir>/distill_rounds.json; --mode=sample with no flags samples the last round's.
The FID-against-calls table of these three runs: experiments/distill_table.py.
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

OPTIONS = ('progressive', 'consistency', 'ect', 'runlocal')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_distill')
    config = digits.get_config('runlocal' if 'runlocal' in options else None)
    method = next((m for m in ('consistency', 'ect') if m in options), 'progressive')
    config.name = {'progressive': 'digits_pd', 'consistency': 'digits_cd',
                   'ect': 'digits_ect'}[method]
    steps = 1500 if 'runlocal' not in options else 20

    d = config.distill = ml_collections.ConfigDict()
    d.teacher_workdir = ''  # the teacher run (required): its EMA weights start the student
    d.teacher_step = -1  # the teacher's checkpoint; -1: its latest valid one
    d.method = method  # 'progressive' (Salimans & Ho 2022, Alg. 2) | 'consistency' (Song et al. 2023) | 'ect' (Geng et al. 2024)
    # progressive: the teacher's DDIM steps of the first round; each round halves them.
    # Salimans & Ho start from 1024 (CIFAR-10); the digits teacher has T = 200 levels.
    d.start_steps = 32
    d.rounds = 5 if 'runlocal' not in options else 2  # progressive: 32 -> 16 -> 8 -> 4 -> 2 -> 1
    d.steps_per_round = steps // d.rounds  # progressive: train steps per round (not the paper's 50k: a CPU budget)
    d.num_scales = 18  # consistency: N levels (Song et al. 2023, CIFAR-10 CD: N = 18)
    d.teacher_solver = 'heun'  # consistency: the teacher's ODE step, 'heun' (Song et al. 2023, CIFAR-10 CD) | 'ddim'
    d.sigma_data = 0.5  # consistency/ect: σ_data of c_skip (Song et al. 2023, App. C: 0.5)
    d.huber_c_per_dim = 0.00054  # pseudo-Huber c = 0.00054 √d (Song & Dhariwal 2023, §3.3)
    # ect (Geng et al. 2024, released code locuslab/ect: ct_train.py defaults, run_ecm.sh):
    d.ect_p_mean = -1.1  # ect: log t ~ N(P_mean, P_std²), P_mean = -1.1
    d.ect_p_std = 2.0  # ect: P_std = 2.0
    d.ect_q = 2.0  # ect: Δt shrinks by q = 2 per stage
    d.ect_k = 8.0  # ect: n(t) = 1 + k sigmoid(-b t), k = 8
    d.ect_b = 1.0  # ect: b = 1
    # ect: steps per stage d; their CIFAR-10 run has 8 stages (25.6 Mimg, a stage per 3.2 Mimg)
    d.ect_stage_steps = max(steps // 8, 1)

    t = config.training
    t.num_train_steps = d.steps_per_round * d.rounds if method == 'progressive' else steps
    # consistency: θ⁻'s EMA rate μ (Song et al. 2023, CD on CIFAR-10: 0.95); progressive and
    # ect: the sampling EMA, as the teacher's (ECT's 0.9999 is for 200k iterations).
    t.ema_decay = 0.95 if method == 'consistency' else 0.995
    t.checkpoint_every_steps = d.steps_per_round if method == 'progressive' else 500
    o = config.optim
    o.learning_rate = 2e-4  # a fine-tune of the teacher's weights: a smaller step
    o.warmup_steps = 0

    s = config.sampling
    # '' = derived by the run (diffusion_jax.distill.derive): progressive, ddim over
    # 'trailing<the last round's steps>'; consistency/ect, 'consistency' over 'trailing2'.
    s.num_steps = ''
    if method != 'progressive':
        s.method = 'consistency'
    s.clip_denoised = True
    return config
