"""DDPM on CelebA at 64x64 (Liu et al. 2015), from tfds `celeb_a`.

    python -m diffusion_jax.main --config=configs/celeba64.py --config.data.data_dir=DIR

Images (218x178) are centre-cropped to 140x140 and resized to 64x64, the usual CelebA-64
preparation (NCSNv2 / score_sde). Diffusion and optimisation as Ho et al. 2020's CIFAR-10 run;
the UNet and batch follow DDIM's CelebA-64 model (Song et al. 2021, their released
configs/celeba.yml: ch 128, ch_mult (1, 2, 2, 2, 4), 2 res blocks, attention at 16x16,
dropout 0.1, flips, Adam 2e-4, batch 128, EMA 0.9999, clipping 1).
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
    options = configs.parse_arg(arg, OPTIONS, 'celeba64')
    config = cifar10.get_config()
    config.name = 'celeba64'  # run name: the default workdir is runs/celeba64

    config.model = m = model_configs.ddpm_cifar10()
    m.image_size = 64  # 64x64
    m.ch_mult = (1, 2, 2, 2, 4)  # 5 levels 64..4 (DDIM configs/celeba.yml)
    m.attn_resolutions = (16,)  # DDIM configs/celeba.yml
    m.dropout = 0.1  # DDIM configs/celeba.yml

    data = config.data
    data.dataset = 'celeb_a'  # tfds name
    data.image_size = 64  # resized to 64x64
    data.crop_size = 140  # centre crop of the 218x178 images (NCSNv2 / score_sde CelebA-64)
    data.num_classes = 0  # no class labels (tfds has attributes only)
    data.random_flip = True  # DDIM configs/celeba.yml: random_flip true
    data.train_split = 'train'  # 162,770 images

    t = config.training
    t.num_train_steps = 500_000  # not fixed by a paper for this model; DDIM trained far longer
    config.eval.split = 'test'  # 19,962 images

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
