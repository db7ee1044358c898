"""DDPM on LSUN 256x256 (Yu et al. 2015) as Ho et al. 2020, from tfds `lsun/<category>`.

    python -m diffusion_jax.main --config=configs/lsun.py:church_outdoor --config.data.data_dir=DIR
    python -m diffusion_jax.main --config=configs/lsun.py:bedroom,runlocal

The argument picks the category: church_outdoor (default), bedroom or cat. Images are
centre-cropped to a square and resized to 256x256. The 114M-parameter UNet (ch 128,
ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16x16, no dropout), T = 1000 linear,
ε-prediction with L_simple, Adam 2e-5 with 5000 warm-up steps, batch 64, clipping 1, EMA 0.9999,
random flips except for cats: Ho et al. 2020, App. B and their released scripts/run_lsun.py.
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

CATEGORIES = ('church_outdoor', 'bedroom', 'cat')
OPTIONS = CATEGORIES + ('runlocal',)
# Ho et al. 2020, App. B: training steps per category.
TRAIN_STEPS = {'church_outdoor': 1_200_000, 'bedroom': 2_400_000, 'cat': 1_800_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'lsun')
    chosen = [c for c in CATEGORIES if c in options]
    if len(chosen) > 1:
        raise ValueError(f'lsun: pick one category of {CATEGORIES}, not {chosen}.')
    category = chosen[0] if chosen else 'church_outdoor'
    config = cifar10.get_config()
    config.name = f'lsun_{category}'  # run name: the default workdir is runs/lsun_<category>

    config.model = m = model_configs.ddpm_cifar10()
    m.image_size = 256  # 256x256 (Ho et al. 2020, App. B)
    m.ch_mult = (1, 1, 2, 2, 4, 4)  # 6 levels 256..8 (run_lsun.py: unet2d16b2c112244)
    m.attn_resolutions = (16,)  # attention at 16x16 (run_lsun.py)
    m.dropout = 0.0  # run_lsun.py: dropout=0.0

    data = config.data
    data.dataset = f'lsun/{category}'  # tfds name
    data.image_size = 256  # 256x256
    data.crop_size = 0  # centre crop of the shorter side, then resize
    data.num_classes = 0  # unlabelled
    data.random_flip = category != 'cat'  # run_lsun.py: randflip=1, --randflip 0 for cats
    data.train_split = 'train'

    t = config.training
    t.batch_size = 64  # run_lsun.py: total_bs=64
    t.num_train_steps = TRAIN_STEPS[category]  # Ho et al. 2020, App. B

    config.optim.learning_rate = 2e-5  # 2e-5 for 256x256 (Ho et al. 2020, App. B; run_lsun.py)
    config.eval.split = 'validation'  # LSUN's 300 validation images per category

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
