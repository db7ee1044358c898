"""DDPM on Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images of 10 clothing classes.

    python -m diffusion_jax.main --config=configs/fashion_mnist.py              # IDX files
    python -m diffusion_jax.main --config=configs/fashion_mnist.py \
        --config.data.source=tfds                                              # tfds fashion_mnist

Two sources give the same images: the original IDX files (offline on Debian/Ubuntu:
`apt-get install -y dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist), or
tfds's `fashion_mnist` (set data.data_dir to its tfds data_dir). Train 60,000 / test 10,000.
Diffusion as DDPM (Ho et al. 2020: T = 1000, linear β 1e-4..0.02, ε-prediction, L_simple, Adam
2e-4, EMA 0.9999, clipping 1); no paper fixes a Fashion-MNIST network, so the UNet is a 3-level
28 -> 14 -> 7 version of Ho et al.'s with half the width.
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
IDX_DIR = '/usr/share/datasets/fashion-mnist'  # where Debian's dataset-fashion-mnist installs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'fashion_mnist')
    config = cifar10.get_config()
    config.name = 'fashion_mnist'  # run name: the default workdir is runs/fashion_mnist

    # 28 -> 14 -> 7, attention at 14x14 (as Ho et al. attend at 16x16 of 32x32).
    config.model = model_configs.tiny_unet(
        image_size=28, in_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
        attn_resolutions=(14,), dropout=0.1)

    data = config.data
    data.dataset = 'fashion_mnist'  # tfds name; the IDX source reads the same images
    data.source = 'idx'  # 'idx' (original files, offline) | 'tfds'
    data.data_dir = IDX_DIR  # the IDX files, or a tfds data_dir with source='tfds'
    data.image_size = 28  # 28x28
    data.channels = 1  # grey
    data.num_classes = 10  # clothing classes (the model is unconditional)
    data.random_flip = False  # keep the data as published
    data.train_split = 'train'  # 60,000 images

    t = config.training
    t.num_train_steps = 100_000  # not from a paper: ~213 epochs of 60k at batch 128
    t.checkpoint_every_steps = 5000
    t.sample_every_steps = 10_000

    config.eval.split = 'test'  # 10,000 images

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
