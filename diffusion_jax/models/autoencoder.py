"""The KL autoencoder of latent diffusion (Rombach et al. 2022, App. G), the Stable Diffusion VAE.

    mean, logvar = AutoencoderKL.apply(v, x, method='encode')   x [B, H, W, in_channels] in [-1, 1]
                                                                 -> 2 × [B, H/f, W/f, latent_channels]
    x_hat = AutoencoderKL.apply(v, z, method='decode')          z [B, H/f, W/f, latent_channels]
                                                                 -> [B, H, W, out_channels]
    f = 2^(len(block_out_channels) - 1) (8 for SD's four levels). The posterior is
    q(z|x) = N(mean, exp(logvar)) with logvar clamped to [-30, 20] (as diffusers does); a latent
    diffusion model sees z·scaling_factor (0.18215 for SD, configs/model_configs.sd_vae).

Structure (diffusers' AutoencoderKL; C_l = block_out_channels[l], L levels, GN with
norm_num_groups groups and ε = norm_epsilon, Res = GN, SiLU, conv3x3, GN, SiLU, conv3x3 plus a
1x1 skip when the width changes):
    encoder: conv3x3 -> C_0; per level l: layers_per_block × Res(C_l), then (l < L-1) a stride-2
             3x3 conv padded (0, 1); mid: Res, single-head self-attention, Res; GN, SiLU,
             conv3x3 -> 2·latent_channels; then quant_conv (1x1) -> (mean, logvar).
    decoder: post_quant_conv (1x1), conv3x3 -> C_{L-1}; mid: Res, attention, Res; per level
             l = L-1..0: (layers_per_block + 1) × Res(C_l), then (l > 0) nearest x2 + conv3x3;
             GN, SiLU, conv3x3 -> out_channels.
`__call__(x, rng=None)` is the reconstruction decode(z) with z = mean (rng None) or
mean + exp(logvar / 2)·ε, ε ~ N(0, I) (rng given): diffusers' forward(sample_posterior).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


class VAEResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))) without a time embedding (diffusers ResnetBlock2D
    with temb=None); a 1x1 conv on the skip when the width changes."""
    out_ch: int
    num_groups: int
    epsilon: float
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(layers.GroupNorm(self.num_groups, self.dtype, self.epsilon, name='norm1')(x))
        h = layers.conv3x3(self.out_ch, self.dtype, 'conv1')(h)
        h = nn.silu(layers.GroupNorm(self.num_groups, self.dtype, self.epsilon, name='norm2')(h))
        h = layers.conv3x3(self.out_ch, self.dtype, 'conv2')(h)
        if x.shape[-1] != self.out_ch:
            x = layers.dense(self.out_ch, self.dtype, 'skip')(x)
        return x + h


def _mid(m, h, dtype):
    """Res, single-head attention over all positions, Res (diffusers' UNetMidBlock2D)."""
    c = h.shape[-1]
    h = VAEResBlock(c, m.norm_num_groups, m.norm_epsilon, dtype, name='mid_block_1')(h)
    h = layers.AttentionBlock(1, False, m.norm_num_groups, m.attention_implementation, dtype,
                              norm_epsilon=m.norm_epsilon, name='mid_attn')(h)
    return VAEResBlock(c, m.norm_num_groups, m.norm_epsilon, dtype, name='mid_block_2')(h)


def _out(m, h, features, dtype):
    h = nn.silu(layers.GroupNorm(m.norm_num_groups, dtype, m.norm_epsilon, name='norm_out')(h))
    return layers.conv3x3(features, dtype, 'conv_out')(h)


class _Coder(nn.Module):
    """Fields the encoder and the decoder share (those of AutoencoderKL)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    norm_epsilon: float
    attention_implementation: str
    dtype: str
    out_features: int  # encoder: 2·latent_channels; decoder: out_channels


class Encoder(_Coder):
    """x [B, H, W, in_channels] -> [B, H/f, W/f, 2·latent_channels] (mean and logvar moments)."""

    @nn.compact
    def __call__(self, x):
        m = self
        dtype = layers.compute_dtype(m.dtype)
        h = layers.conv3x3(m.block_out_channels[0], dtype, 'conv_in')(x.astype(dtype))
        last = len(m.block_out_channels) - 1
        for level, ch in enumerate(m.block_out_channels):
            for i in range(m.layers_per_block):
                h = VAEResBlock(ch, m.norm_num_groups, m.norm_epsilon, dtype,
                                name=f'down_{level}_block_{i}')(h)
            if level != last:  # diffusers' Downsample2D(padding=0) pads (0, 1) itself
                h = layers.Downsample(dtype, 'same', name=f'down_{level}_downsample')(h)
        h = _mid(m, h, dtype)
        return _out(m, h, m.out_features, dtype)


class Decoder(_Coder):
    """z [B, h, w, latent_channels] -> [B, h·f, w·f, out_channels]."""

    @nn.compact
    def __call__(self, z):
        m = self
        dtype = layers.compute_dtype(m.dtype)
        widths = tuple(reversed(m.block_out_channels))
        h = layers.conv3x3(widths[0], dtype, 'conv_in')(z.astype(dtype))
        h = _mid(m, h, dtype)
        for j, ch in enumerate(widths):  # j: diffusers' up_blocks index (widest first)
            for i in range(m.layers_per_block + 1):
                h = VAEResBlock(ch, m.norm_num_groups, m.norm_epsilon, dtype,
                                name=f'up_{j}_block_{i}')(h)
            if j != len(widths) - 1:
                h = layers.Upsample(dtype, name=f'up_{j}_upsample')(h)
        return _out(m, h, m.out_features, dtype)


def validate_autoencoder_fields(m) -> None:
    """Raises one ValueError naming the offending model_config field and the fix."""
    layers.compute_dtype(m.dtype)
    layers.check_choice('attention_implementation', m.attention_implementation,
                        layers.ATTENTION_IMPLEMENTATIONS)
    if not m.block_out_channels:
        raise ValueError('model_config.block_out_channels=() needs at least one level, e.g. '
                         '(128, 256, 512, 512).')
    for ch in m.block_out_channels:
        if ch % m.norm_num_groups:
            raise ValueError(f'model_config.block_out_channels={tuple(m.block_out_channels)}: '
                             f'{ch} is not divisible by norm_num_groups={m.norm_num_groups}.')
    if m.image_size % m.downsample_factor:
        raise ValueError(f'model_config.image_size={m.image_size} is not divisible by the '
                         f'downsampling factor {m.downsample_factor}: use a multiple of it.')
    if m.layers_per_block < 1 or m.latent_channels < 1:
        raise ValueError(f'model_config.layers_per_block={m.layers_per_block} and '
                         f'latent_channels={m.latent_channels} must be >= 1.')
    if not m.scaling_factor > 0:
        raise ValueError(f'model_config.scaling_factor={m.scaling_factor} must be > 0 (SD: '
                         '0.18215).')


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; fields are those of configs/model_configs.sd_vae."""
    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_epsilon: float = 1e-6
    scaling_factor: float = 0.18215
    attention_implementation: str = 'auto'
    dtype: str = 'float32'
    # Inputs of one example for init_params / param_shapes: an image, no timestep.
    takes_timestep = False

    def __post_init__(self):
        validate_autoencoder_fields(self)
        super().__post_init__()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        dtype = layers.compute_dtype(self.dtype)
        shared = (tuple(self.block_out_channels), self.layers_per_block, self.norm_num_groups,
                  self.norm_epsilon, self.attention_implementation, self.dtype)
        self.encoder = Encoder(*shared, 2 * self.latent_channels)
        self.decoder = Decoder(*shared, self.out_channels)
        self.quant_conv = layers.dense(2 * self.latent_channels, dtype, 'quant_conv')
        self.post_quant_conv = layers.dense(self.latent_channels, dtype, 'post_quant_conv')

    def encode(self, x):
        """x [B, H, W, in_channels] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f'input of shape {x.shape} does not fit model_config.in_channels='
                             f'{self.in_channels}: pass NHWC images with H, W divisible by {f}.')
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z [B, h, w, latent_channels] -> x [B, h·f, w·f, out_channels] float32."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def __call__(self, x, rng: jax.Array | None = None):
        """Reconstruction decode(mean) (rng None) or decode(mean + σ·ε) (a posterior sample)."""
        mean, logvar = self.encode(x)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return self.decode(z)
