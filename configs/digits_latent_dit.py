"""A small DiT on the latents of configs/digits_vae.py: latent diffusion end to end on a CPU.

    python -m diffusion_jax.main --config=configs/digits_vae.py --workdir=runs/digits_vae
    python -m diffusion_jax.main --config=configs/digits_latent_dit.py --workdir=runs/digits_latent_dit
    python -m diffusion_jax.main --workdir=runs/digits_latent_dit --mode=sample   # decoded pixels

Each batch of 8x8 digits is encoded on the fly (diffusion_jax.latents: s·(μ + σ·ε), a fresh ε
each step) into 4x4x2 latents; the model's image_size and in_channels are derived from the
autoencoder (data.latent_size / latent_channels). Samples and FID are of decoded pixels.
DDPM as configs/digits.py (T = 200, linear β, ε-prediction); the DiT (Peebles & Xie 2023)
is tuned here for the CPU: patch 1 (16 tokens), width 128, depth 4, unconditional.
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
    options = configs.parse_arg(arg, OPTIONS, 'digits_latent_dit')
    config = digits.get_config()
    config.name = 'digits_latent_dit'
    # image_size / in_channels None: derived from the autoencoder (latents.derive).
    config.model = model_configs.dit('DiT-S/2', image_size=None, in_channels=None,
                                     num_classes=0, learn_sigma=False)
    m = config.model
    m.patch_size = 1  # 4x4 latents: 16 tokens
    m.hidden_size = 128
    m.depth = 4
    m.num_heads = 4

    d = config.data
    d.latents = 'runs/digits_vae'  # the autoencoder run (a workdir or a converted preset)
    d.latents_cache = ''  # '': encode each batch on the fly; a .npz of `python -m diffusion_jax.encode`
    d.latent_noise = True  # train on μ + σ·ε (LDM, DiT); False: the posterior mean μ alone
    # s = 1/std of the training latents' means (LDM's rule, Rombach et al. 2022, App. G),
    # measured by `python -m diffusion_jax.encode` on runs/digits_vae: std 1.548. 0: the
    # autoencoder's model.scaling_factor.
    d.latent_scale = 0.646
    config.sampling.clip_denoised = False  # latents are not in [-1, 1]

    if 'runlocal' in options:
        t = config.training
        t.num_train_steps = 20
        t.log_every_steps = 5
        t.checkpoint_every_steps = 10
        t.sample_every_steps = 20
        t.num_sample_images = 4
    return config
