"""'cold': Bansal et al. 2022's deterministic degradations (diffusion_jax.cold.ColdDiffusion) in
the process registry.

A cold process's tables (blur and pixelate operators [T+1, H, H], masks [T+1, H, W]) are built
for one image shape, which a `config.diffusion` section alone does not hold: the builder reads
`diffusion.image_shape` = [H, W, C], which config_validation.resolve (so run.resolve_config,
once per command) derives from data.image_size/data.channels, or the latent grid
(data.latent_size/latent_channels) of a latent run. A cold process is not a Gaussian-marginal
`Process`: it has degrade/restore/loss and runs the 'cold'/'cold_naive' samplers
(samplers/cold.py); `check_method` names them.
"""
from __future__ import annotations

from diffusion_jax import cold
from diffusion_jax.processes.base import register_process


def image_shape_of(diffusion_config) -> tuple[int, int, int]:
    """(H, W, C) from diffusion.image_shape; one ValueError line if it is unset or malformed."""
    shape = diffusion_config.get('image_shape', None)
    try:
        shape = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"diffusion.image_shape={diffusion_config.get('image_shape', None)!r}: "
                         "diffusion.process='cold' builds its degradation for one image shape "
                         '[H, W, C]; resolve the config (run.resolve_config / '
                         'config_validation.resolve derive it from data.image_size and '
                         'data.channels) or set it, e.g. diffusion.image_shape=(8, 8, 1).')
    return shape


@register_process('cold')
def build(diffusion_config) -> cold.ColdDiffusion:
    """The ColdDiffusion of diffusion.degradation and its fields at diffusion.image_shape."""
    return cold.create_cold_diffusion(diffusion_config, image_shape_of(diffusion_config))
