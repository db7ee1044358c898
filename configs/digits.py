"""The offline default: DDPM on scikit-learn's handwritten digits, on a CPU in a few minutes.

    python -m diffusion_jax.main --config=configs/digits.py
    python -m diffusion_jax.main --config=configs/digits.py --mode=eval     # test NLL (bits/dim)

Data: the 1,797 real 8x8 scans shipped inside scikit-learn (UCI "Optical Recognition of
Handwritten Digits"), pixel values 0..16 put on the 8-bit grid (round(v·255/16)) and scaled to
[-1, 1], so bits/dim are on the usual 256-level scale. Split: a permutation seeded by
data.split_seed; its first 80% (1,438 images) train, the last 20% (359) are the held-out test set.

Diffusion as DDPM (Ho et al. 2020: linear β, ε-prediction, L_simple, fixed variance) but with
T = 200; T, the network and the optimisation are not from a paper but tuned here for 8x8 images
on 2 CPU cores. Measured on 2 shared CPU cores: 5 min wall for training and the final grid,
final loss 0.086, test NLL 4.78 bits/dim (full 200-term bound, EMA parameters).
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

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits')
    config = cifar10.get_config()
    config.name = 'digits'  # run name: the default workdir is runs/digits

    # 8x8x1 -> 4x4 with attention at 4x4, 32 channels (GroupNorm's minimum), one res block per
    # level: 0.7M parameters, ~0.15 s per step of 64 images on 2 CPU cores.
    config.model = model_configs.tiny_unet(image_size=8, in_channels=1)

    d = config.diffusion
    # T = 200 with DDPM's linear schedule stretched to it (β 5e-4..0.1, the 1000/T rule of
    # Nichol & Dhariwal 2021): the same grid quality as T = 1000 here, 5x faster sampling and NLL.
    d.num_timesteps = 200
    d.beta_start = None  # None: 1e-4·1000/T (schedules.py)
    d.beta_end = None  # None: 0.02·1000/T
    d.model_var_type = 'fixed_large'  # σ² = β_t as Ho et al.'s CIFAR-10

    data = config.data
    data.dataset = 'digits'  # sklearn.datasets.load_digits, embedded: no download
    data.source = 'embedded'  # not read from files
    data.image_size = 8  # the scans are 8x8
    data.channels = 1  # grey
    data.num_classes = 10  # digits 0-9 (the model is unconditional)
    data.random_flip = False  # a mirrored digit is not a digit
    data.split_seed = 0  # seeds the train/test permutation (fixed: the test set never moves)
    data.test_fraction = 0.2  # the last 20% of the permutation are held out

    t = config.training
    t.batch_size = 64  # ~22 steps per epoch of 1,438 images
    t.num_train_steps = 1500  # ~67 epochs; tuned to fit a few minutes on 2 CPU cores
    t.log_every_steps = 100
    t.checkpoint_every_steps = 500
    t.keep_checkpoints = 2
    t.sample_every_steps = 1500  # one grid, at the end (T = 200 network calls: ~10 s on a CPU)
    t.num_sample_images = 64  # an 8x8 grid of samples
    t.ema_decay = 0.995  # averages ~200 steps; 0.9999 would average over more than this run

    o = config.optim
    o.learning_rate = 1e-3  # small model, small data: a larger step than CIFAR-10's 2e-4
    o.warmup_steps = 100  # a short linear warm-up
    o.grad_clip = 1.0  # as Ho et al.

    e = config.eval
    e.split = 'test'  # the 359 held-out digits
    e.batch_size = 128
    e.num_batches = 0  # 0: the whole split

    if 'runlocal' in options:
        t.num_train_steps = 20
        t.log_every_steps = 5
        t.checkpoint_every_steps = 10
        t.sample_every_steps = 20
        t.num_sample_images = 4
    return config
