"""A small KL autoencoder of the 8x8 digits: the latent space of configs/digits_latent_dit.py.

    python -m diffusion_jax.main --config=configs/digits_vae.py --workdir=runs/digits_vae

The network is Stable Diffusion's AutoencoderKL (models/autoencoder.py, Rombach et al. 2022)
shrunk to two levels: f = 2, so 8x8x1 digits become 4x4xLATENT_CHANNELS latents (32 numbers for
64 pixels). The objective (train._autoencoder_loss) is LDM's without its perceptual (LPIPS) and
adversarial terms, which need ImageNet-trained networks we do not have offline:
    L = Σ_pixels |x - x̂| + β·KL(q(z|x) || N(0, I)),  summed per image, averaged over the batch.
β: LDM's kl_weight 1e-6 belongs to its KL-f8 autoencoder at 256x256x3 (196,608 summed pixel
terms against 4,096 latent entries) trained with LPIPS and a discriminator, and leaves the latent
nearly unregularised (its scale then comes from s = 1/std). Here 64 pixel terms meet 32 latent
entries, and there is no perceptual term; β = 1e-3 is our choice (tuned here, not from a paper):
it keeps the KL small against reconstruction while the per-image KL stays bounded. Measured
(1,500 steps, ~2.5 min on 2 shared cores): per-pixel MSE 0.0057 on [-1, 1], KL 154 nats per
image, std of the latent means 1.55 (so the latent run's s = 0.646).
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
LATENT_CHANNELS = 2  # z: 4x4x2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digits_vae')
    config = digits.get_config()
    config.name = 'digits_vae'  # the default workdir is runs/digits_vae
    # Two levels (f = 2), one res block each, 8 GroupNorm groups: ~0.2M parameters.
    config.model = model_configs.sd_vae(
        image_size=8, in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    # The scale the diffusion model sees when data.latent_scale is not set (LDM: 1/std of the
    # training latents; the encode CLI prints it).
    config.model.scaling_factor = 1.0

    t = config.training
    t.reconstruction_loss = 'l1'  # ρ of train._autoencoder_loss: 'l1' (LDM's) | 'l2'
    t.kl_weight = 1e-3  # β: tuned here for 8x8 digits (LDM's 1e-6 is for KL-f8 at 256 px + LPIPS)
    t.batch_size = 64
    t.num_train_steps = 1500
    t.sample_every_steps = 0  # an autoencoder draws no samples
    t.ema_decay = 0.995
    o = config.optim
    o.learning_rate = 1e-3
    o.warmup_steps = 100
    if 'runlocal' in options:
        t.num_train_steps = 20
        t.log_every_steps = 5
        t.checkpoint_every_steps = 10
    return config
