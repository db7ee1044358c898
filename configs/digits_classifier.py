"""A noisy-image classifier p_φ(y | x_t, t) on the digits, for classifier guidance of the digits
model (Dhariwal & Nichol 2021, Sec. 4).

    python -m diffusion_jax.main --config=configs/digits_classifier.py --workdir=runs/digits_classifier
    python -m diffusion_jax.main --config=configs/digits.py --workdir=runs/digits --mode=sample \
        --config.sampling.classifier_scale=2 --config.sampling.classifier_workdir=runs/digits_classifier \
        --config.sampling.labels=3

The diffusion section is the digits model's (same T and β): the classifier must see the noise
levels the sampler visits. The network is ADM's classifier (the UNet's down half, middle block and
attention pooling) scaled to 8x8 images.
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
from configs import digits, model_configs

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_classifier')
    config = digits.get_config()
    config.name = 'digits_classifier'  # run name: the default workdir is runs/digits_classifier
    # ADM's classifier at 8x8: two levels (8, 4), attention at 4x4, 32 channels per head.
    config.model = model_configs.adm_classifier(
        image_size=8, num_classes=10, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), num_head_channels=32)
    t = config.training
    t.num_train_steps = 1000  # ~45 epochs of the 1,438 training digits
    t.sample_every_steps = 0  # a classifier draws no samples
    t.checkpoint_every_steps = 500
    o = config.optim
    o.learning_rate = 3e-4  # ADM's classifier learning rate (Dhariwal & Nichol 2021, App. H)
    o.weight_decay = 0.05  # AdamW weight decay of ADM's classifiers (Dhariwal & Nichol 2021, App. H)
    o.warmup_steps = 0
    if 'runlocal' in options:
        t.num_train_steps = 20
        t.log_every_steps = 5
        t.checkpoint_every_steps = 10
    return config
