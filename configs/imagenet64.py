"""Class-conditional improved DDPM on ImageNet 64x64 (Nichol & Dhariwal 2021), tfds
`imagenet_resized/64x64` (1.28M images, 1000 classes; the box-resized images of Chrabaszcz et
al. 2017, the downsampled ImageNet of the paper).

    python -m diffusion_jax.main --config=configs/imagenet64.py --config.data.data_dir=DIR

Cosine schedule with T = 4000, learned_range variance, L_hybrid, the UNet with 128 channels,
ch_mult (1, 2, 3, 4), 3 res blocks, 4 heads at 16 and 8, scale-shift norm, Adam 1e-4 at batch 128,
EMA 0.9999 (improved-diffusion README ImageNet-64 flags, with --class_cond True). Labels are dropped
to the null label 10% of the time so that one model also samples with classifier-free guidance
(Ho & Salimans 2021 use p_uncond ∈ {0.1, 0.2} on ImageNet 64; set 0 for the plain
class-conditional model of the paper).
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
from configs import cifar10_improved

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'imagenet64')
    config = cifar10_improved.get_config()
    config.name = 'imagenet64'  # run name: the default workdir is runs/imagenet64

    m = config.model
    m.image_size = 64  # 64x64
    m.ch_mult = (1, 2, 3, 4)  # improved-diffusion's widths for 64x64
    m.num_res_blocks = 3  # README ImageNet-64 flags: --num_res_blocks 3
    m.attn_resolutions = (16, 8)  # improved-diffusion default attention_resolutions "16,8"
    m.dropout = 0.0  # README ImageNet-64 flags set no dropout
    m.num_classes = 1000  # class-conditional (--class_cond True); label 1000 is the null label

    data = config.data
    data.dataset = 'imagenet_resized/64x64'  # tfds name
    data.image_size = 64  # already 64x64
    data.num_classes = 1000  # ImageNet classes
    data.random_flip = False  # improved-diffusion's image_datasets does not flip
    data.train_split = 'train'  # 1,281,167 images

    t = config.training
    t.batch_size = 128  # README ImageNet-64 flags: --batch_size 128
    t.num_train_steps = 1_500_000  # Nichol & Dhariwal 2021, App. A: 1.5M ImageNet-64 iterations
    t.label_dropout = 0.1  # P(y -> null), classifier-free guidance (Ho & Salimans 2021)

    config.optim.learning_rate = 1e-4  # README ImageNet-64 flags: --lr 1e-4
    config.eval.split = 'validation'  # 50,000 images

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
