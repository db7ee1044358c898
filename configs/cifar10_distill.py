"""Few-step students of Ho et al.'s CIFAR-10 model, for accelerators: progressive distillation,
consistency distillation or easy consistency tuning from the converted `ddpm_cifar10_32` run.

    python -m diffusion_jax.convert --from=diffusers --preset=ddpm_cifar10_32 \
        --src=ddpm-cifar10-32/ --workdir=runs/ddpm_cifar10                # the teacher
    python -m diffusion_jax.main --config=configs/cifar10_distill.py --workdir=runs/cifar10_pd \
        --config.distill.teacher_workdir=runs/ddpm_cifar10
    python -m diffusion_jax.main --config=configs/cifar10_distill.py:consistency ...
    python -m diffusion_jax.main --config=configs/cifar10_distill.py:ect ...

The model and diffusion sections are the converted teacher's (configs/pretrained.py
ddpm_cifar10_32: linear β, T = 1000, ε-prediction); the student keeps ε (the released
progressive config predicts x, with a teacher trained for it). The students never use
dropout (the network runs with train=False), as the released progressive config's "same as
teacher but with 0 dropout".
  progressive: google-research/diffusion_distillation config/cifar_distill.py: 50,000 steps per
    halving, batch 128, Adam 5e-5 without warm-up, no EMA (ema_decay 0: the student itself
    teaches the next round), gradient clipping 1.0; they start from 8192 steps of a
    continuous-time teacher, this discrete teacher has T = 1000, so 512 -> … -> 1 (9 rounds).
    Not carried over: their learning-rate anneal to 0 within each round.
  consistency: Song et al. 2023, Table 3 (CD, CIFAR-10): N = 18, Heun, Adam 4e-4, batch 512,
    μ = 0.95, 800k iterations; pseudo-Huber (Song & Dhariwal 2023) instead of their LPIPS. Here
    one EMA is both θ⁻ and the sampled network (they sample a separate 0.9999 EMA).
  ect: Geng et al. 2024, released locuslab/ect run_ecm.sh: 25.6 Mimg at batch 128 (200,000
    steps) in 8 stages of 3.2 Mimg (25,000 steps), q = 2, k = 8, b = 1, P_mean = -1.1,
    P_std = 2.0, lr 1e-4 (their RAdam; Adam here), EMA 0.9999 (ct_train.py default); their
    teacher is EDM's VP model, here Ho et al.'s.
Not trained here (no accelerator); tests check the configs validate.
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
from configs import pretrained

OPTIONS = ('progressive', 'consistency', 'ect')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'cifar10_distill')
    config = pretrained.preset_config('ddpm_cifar10_32')
    method = next((m for m in ('consistency', 'ect') if m in options), 'progressive')
    config.name = f'cifar10_{ {"progressive": "pd", "consistency": "cd", "ect": "ect"}[method]}'

    d = config.distill = ml_collections.ConfigDict()
    d.teacher_workdir = ''  # the converted ddpm_cifar10_32 run (required)
    d.teacher_step = -1  # its latest checkpoint
    d.method = method  # 'progressive' | 'consistency' | 'ect'
    d.start_steps = 512  # progressive: 512 -> 256 -> … -> 1 (T = 1000 caps the paper's 8192)
    d.rounds = 9  # progressive: down to one step (the released config's end_num_steps = 1)
    d.steps_per_round = 50_000  # progressive: distill_steps_per_iter = 50000 (released config)
    d.num_scales = 18  # consistency: N = 18 (Song et al. 2023, Table 3, CD on CIFAR-10)
    d.teacher_solver = 'heun'  # consistency: Heun (Song et al. 2023, Table 3)
    d.sigma_data = 0.5  # consistency/ect: σ_data = 0.5 (Song et al. 2023, App. C)
    d.huber_c_per_dim = 0.00054  # pseudo-Huber c = 0.00054 √d (Song & Dhariwal 2023, §3.3)
    d.ect_p_mean = -1.1  # ect: P_mean (locuslab/ect ct_train.py --mean)
    d.ect_p_std = 2.0  # ect: P_std (--std)
    d.ect_q = 2.0  # ect: q (-q)
    d.ect_k = 8.0  # ect: k (-k)
    d.ect_b = 1.0  # ect: b (-b)
    d.ect_stage_steps = 25_000  # ect: --double=250 ticks of 12.8 kimg = 3.2 Mimg / 128

    t, o = config.training, config.optim
    o.warmup_steps = 0
    if method == 'progressive':
        t.batch_size = 128
        t.num_train_steps = d.rounds * d.steps_per_round
        t.ema_decay = 0.0  # ema_decay=0. (released config)
        o.learning_rate = 5e-5
        o.grad_clip = 1.0
        t.checkpoint_every_steps = 10_000
    elif method == 'consistency':
        t.batch_size = 512
        t.num_train_steps = 800_000
        t.ema_decay = 0.95  # μ
        o.learning_rate = 4e-4
        t.checkpoint_every_steps = 10_000
    else:
        t.batch_size = 128
        t.num_train_steps = 8 * d.ect_stage_steps  # 25.6 Mimg
        t.ema_decay = 0.9999
        o.learning_rate = 1e-4
        t.checkpoint_every_steps = 10_000
    config.sampling.num_steps = ''  # derived: the last round's steps / 'trailing2'
    if method != 'progressive':
        config.sampling.method = 'consistency'
    return config
