"""'gaussian': today's discrete-time GaussianDiffusion (the DDPM family) behind the process
interface. Its time is the (respaced) step index t ∈ {0, …, K-1} (int32), α = √ᾱ_t,
σ = √(1-ᾱ_t); the network sees timestep_map[t]. Its samplers are the registered chain samplers
(diffusion_jax.samplers), run over the wrapped diffusion exactly as before.

Loss: GaussianDiffusion.training_losses (unchanged), optionally weighted by min-SNR-γ
(Hang et al. 2023; `diffusion.loss_weighting='min_snr'`, `diffusion.min_snr_gamma`) for the
network's parametrisation (ε, x0, v); it applies to loss_type='mse' only (the bound terms of
'kl', 'rescaled_kl', 'hybrid' have their own weighting).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.processes import weighting
from diffusion_jax.processes.base import Process, register_process


class GaussianProcess(Process):
    """The process interface over a GaussianDiffusion (a pytree: the diffusion is its child)."""

    name = 'gaussian'
    # Its samplers are the chain's registry (diffusion_jax.samplers, a higher layer), which
    # validates the method itself.
    methods = ()

    def check_method(self, method: str) -> None:  # the chain's get_sampler checks it
        del method

    def __init__(self, diffusion, loss_weighting: str = 'none', min_snr_gamma: float = 5.0):
        check_weighting(diffusion, loss_weighting, min_snr_gamma)
        self.diffusion = diffusion
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)

    def tree_flatten(self):
        return (self.diffusion,), (self.loss_weighting, self.min_snr_gamma)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.diffusion, (obj.loss_weighting, obj.min_snr_gamma) = children[0], aux
        return obj

    def respace(self, use_timesteps) -> 'GaussianProcess':
        return GaussianProcess(self.diffusion.respace(use_timesteps), self.loss_weighting,
                               self.min_snr_gamma)

    def alpha_sigma(self, t):
        d = self.diffusion
        return (jnp.asarray(d.sqrt_alphas_cumprod)[t].astype(jnp.float32),
                jnp.asarray(d.sqrt_one_minus_alphas_cumprod)[t].astype(jnp.float32))

    def log_snr(self, t):
        # From the float64-built log tables: exact near ᾱ = 1 (as samplers.common.log_snr).
        d = self.diffusion
        return 0.5 * (jnp.log(jnp.asarray(d.alphas_cumprod)[t])
                      - jnp.asarray(d.log_one_minus_alphas_cumprod)[t]).astype(jnp.float32)

    def sigma_tilde(self, t):
        return jnp.asarray(self.diffusion.sqrt_recipm1_alphas_cumprod)[t].astype(jnp.float32)

    def network_sigma(self):
        """Original timestep -> σ = √((1-ᾱ)/ᾱ) (a pytree); needs the un-respaced diffusion."""
        d = self.diffusion
        if not np.array_equal(np.asarray(d.timestep_map), np.arange(d.num_timesteps)):
            raise ValueError('network_sigma reads σ by original timestep: take it from the '
                             'un-respaced process (processes.get_process(config.diffusion)).')
        return Partial(_table_sigma, jnp.asarray(d.sqrt_recipm1_alphas_cumprod, jnp.float32))

    def model_input(self, x, t):
        return x, jnp.asarray(self.diffusion.timestep_map)[t]

    def output_to_x0(self, out, x, t):
        return self.diffusion.p_mean_variance(out, x, t, clip_denoised=False)['pred_x0']

    def time_grid(self, num_steps: int) -> np.ndarray:
        """The K steps K-1, …, 0 of the (respaced) chain (num_steps must be its K)."""
        k = self.diffusion.num_timesteps
        if num_steps != k:
            raise ValueError(f'sampling.num_steps={num_steps}: a gaussian process runs the K={k} '
                             'steps of its respaced diffusion (generate.respaced).')
        return np.arange(k - 1, -1, -1)

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape, jnp.float32)

    def sample_time(self, key, batch: int):
        return jax.random.randint(key, (batch,), 0, self.diffusion.num_timesteps, jnp.int32)

    def loss_weight(self, t):
        """Per-example weight [B] of the configured loss_weighting (1 for 'none')."""
        if self.loss_weighting == 'none':
            return jnp.ones(jnp.shape(t), jnp.float32)
        return weighting.min_snr_weight(self.diffusion.snr(t), self.min_snr_gamma,
                                        self.diffusion.model_mean_type)

    def loss(self, model_fn, x0, key, t=None, noise=None):
        """training_losses at t (uniform if not given) and ε (N(0, I) if not given) times
        loss_weight(t): dict(loss=[B], t, quantile=t/T, and the diffusion's terms)."""
        t_key, noise_key = jax.random.split(key)
        if t is None:
            t = self.sample_time(t_key, x0.shape[0])
        if noise is None:
            noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        terms = dict(self.diffusion.training_losses(model_fn, x0, t, noise))
        terms['loss'] = self.loss_weight(t) * terms['loss']
        terms.update(t=t, quantile=t.astype(jnp.float32) / self.diffusion.num_timesteps)
        return terms


jax.tree_util.register_pytree_node_class(GaussianProcess)


def _table_sigma(table, t_in):
    return table[jnp.asarray(t_in, jnp.int32)]


def check_weighting(diffusion, loss_weighting: str, gamma: float) -> None:
    """One-line ValueErrors for a weighting that does not apply."""
    if loss_weighting not in weighting.WEIGHTINGS:
        raise ValueError(f'diffusion.loss_weighting={loss_weighting!r} is not valid; choose one '
                         f'of {", ".join(weighting.WEIGHTINGS)}.')
    if loss_weighting == 'min_snr':
        if diffusion.loss_type != 'mse':
            raise ValueError(f"diffusion.loss_weighting='min_snr' with diffusion.loss_type="
                             f"{diffusion.loss_type!r}: min-SNR weights the MSE of L_simple; use "
                             "loss_type='mse' or loss_weighting='none'.")
        if not gamma > 0:
            raise ValueError(f'diffusion.min_snr_gamma={gamma} must be > 0 (Hang et al.: 5).')


@register_process('gaussian')
def _build(diffusion_config):
    return GaussianProcess(diffusion_lib.create_diffusion(diffusion_config),
                           diffusion_config.get('loss_weighting', 'none'),
                           diffusion_config.get('min_snr_gamma', 5.0))
