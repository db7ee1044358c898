"""Latent diffusion (Rombach et al. 2022): the diffusion model runs on z = s·(μ + σ·ε), the
scaled posterior sample of a frozen KL autoencoder, and its samples are decoded to pixels.

    config.data.latents = 'runs/digits_vae'       # a run workdir or a converted preset folder
    ae = latents.load(config.data.latents)        # model, EMA variables, scaling factor s
    z = ae.latents(x, rng)                        # x [B, H, W, C] in [-1, 1] -> [B, H/f, W/f, c]
    x = ae.decode(z)                              # decoder(z / s) -> [B, H, W, C]

q(z|x) = N(μ(x), diag σ²(x)) (models/autoencoder.py); s is the autoencoder's
model.scaling_factor unless data.latent_scale > 0 overrides it (LDM picks s = 1/std of the
latents of a first batch, App. G; the encode CLI prints that std). data.latent_noise=True (the
default) trains on μ + σ·ε, a fresh ε each step (LDM's and DiT's training), False on μ alone.

Why encoding on the fly is the default (data.latents_cache='' ): every step sees a new posterior
sample ε, as LDM and DiT train, the data augmentation (random flips) stays correct (the latent of
a flipped image is not the flipped latent), and nothing needs to be kept in step with the
autoencoder. The cache (`python -m diffusion_jax.encode`) stores μ and log σ² of each training
image once, so a step costs no encoder pass (what helps when the encoder dominates, e.g. SD's
VAE under a small DiT) and the same ε law is kept: the batch from the cache equals the one
encoded on the fly for the same key, up to float32 rounding.

Part of the run layer: it reads the autoencoder's run (config.json and checkpoint) through
run.py, whose resolve_config derives the latent shapes (run.derive_latents).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import run as run_lib

# The data fields a latent run adds (configs/__init__ and the latent configs set them).
CACHE_KEYS = ('mean', 'logvar', 'label')


def is_latent(config) -> bool:
    return bool(config.get('data', {}).get('latents', ''))


# The autoencoder's stored config and the derived data fields live in the run layer's run.py
# (resolve_config fills them before validation); the names stay importable from here.
autoencoder_config = run_lib.autoencoder_config
derive = run_lib.derive_latents


@dataclasses.dataclass
class Autoencoder:
    """A loaded autoencoder: model (AutoencoderKL), variables {'params': ...}, scale s."""
    model: Any
    variables: dict
    scale: float

    def moments(self, x):
        """x [B, H, W, C] in [-1, 1] -> (μ, log σ²), each [B, h, w, c] (unscaled)."""
        return self.model.apply(self.variables, x, method='encode')

    def latents(self, x, rng=None):
        """s·(μ + σ·ε) (rng given) or s·μ (rng None): what the diffusion model trains on."""
        return from_moments(*self.moments(x), self.scale, rng)

    def decode(self, z):
        """decoder(z / s): latents [B, h, w, c] -> pixels [B, H, W, C] (about [-1, 1])."""
        return self.model.apply(self.variables, z / self.scale, method='decode')


def from_moments(mean, logvar, scale: float, rng=None):
    """s·(μ + exp(log σ² / 2)·ε), ε ~ N(0, I) from rng; s·μ when rng is None."""
    z = mean
    if rng is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return scale * z


def load(path: str, scale: float = 0.0, mesh=None) -> Autoencoder:
    """The autoencoder run at path (its EMA parameters, latest checkpoint, replicated on mesh);
    scale > 0 overrides its model.scaling_factor."""
    run_lib.autoencoder_config(path)
    loaded = run_lib.load(path, mesh=mesh)
    s = scale or float(loaded.config.model.scaling_factor)
    return Autoencoder(loaded.model, loaded.variables, s)


def for_config(config, mesh=None) -> Autoencoder | None:
    """The autoencoder of a latent run (config resolved: data.latent_scale filled), else None."""
    if not is_latent(config):
        return None
    return load(config.data.latents, config.data.latent_scale, mesh)


def make_batch_encoder(ae: Autoencoder, noise: bool = True, from_cache: bool = False,
                       out_sharding=None):
    """encode(batch, rng) -> batch with 'image' replaced by the latents.

    batch['image']: pixels [..., H, W, C] (from_cache False) or the cached moments
    [..., h, w, 2c] (μ then log σ², from_cache True); any leading axes ([B] or [K, B]) are
    kept. rng: this call's key (the loop passes fold_in(key, step)); unused when noise is False.
    One jitted program with the autoencoder's variables an argument (not constants baked into
    it); out_sharding (e.g. the train step's batch sharding) places the result.
    """
    def encode(variables, batch, rng):
        x = batch['image']
        lead = x.shape[:-3]
        flat = x.reshape((-1, *x.shape[-3:]))
        if from_cache:
            mean, logvar = jnp.split(flat, 2, axis=-1)
        else:
            mean, logvar = ae.model.apply(variables, flat, method='encode')
        z = from_moments(mean, logvar, ae.scale, rng if noise else None)
        return dict(batch, image=z.reshape((*lead, *z.shape[1:])))

    jitted = jax.jit(encode, out_shardings=out_sharding)
    return lambda batch, rng: jitted(ae.variables, batch, rng)


def make_decoder(ae: Autoencoder):
    """decode(z): latent samples -> pixels clipped to [-1, 1] (the data's range), jitted."""
    jitted = jax.jit(lambda variables, z: jnp.clip(
        ae.model.apply(variables, z / ae.scale, method='decode'), -1.0, 1.0))
    return lambda z: jitted(ae.variables, z)


def cache_dataset(path: str, split: str, num_classes: int):
    """The input_pipeline.Dataset of an encode CLI cache: 'image' = concat(μ, log σ²) [N, h, w,
    2c] (make_batch_encoder(from_cache=True) turns a batch of it into latents)."""
    from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    from diffusion_jax import image_utils  # pylint: disable=import-outside-toplevel
    with image_utils.as_path(path).open('rb') as f:  # a local path or a URI
        arrays = np.load(f)
        missing = [k for k in CACHE_KEYS if k not in arrays]
        if missing:
            raise ValueError(f'data.latents_cache={path!r} lacks {missing}: write it with '
                             '`python -m diffusion_jax.encode`.')
        moments = np.concatenate([arrays['mean'], arrays['logvar']], axis=-1)
        labels = arrays['label']
    return input_pipeline._in_memory('latents_cache', split, moments, labels,  # pylint: disable=protected-access
                                     num_classes)
