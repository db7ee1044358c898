"""'edm': Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models"), Table 1, their own ("EDM") column.

    x_σ = x_0 + σ ε   (α = 1, σ the process's time),
    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),
    c_skip = σ_d²/(σ² + σ_d²),  c_out = σ σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),  c_noise = ¼ ln σ,
    training: ln σ ~ N(P_mean, P_std²), loss λ(σ) ‖D(x_0 + σ ε; σ) - x_0‖², λ = (σ² + σ_d²)/(σ σ_d)²,
    sampling grid (eq. 5): σ_i = (σ_max^{1/ρ} + i/(K-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i < K, σ_K = 0.
The network F is what a sampler's model_fn(x_in, c_noise) is. The numbers (σ_min = 0.002,
σ_max = 80, σ_d = 0.5, ρ = 7, P_mean = -1.2, P_std = 1.2) are Table 1's, the defaults here and in
configs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.processes.base import Process, bcast, mean_flat, register_process, section

METHODS = ('euler', 'heun', 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc')


@dataclasses.dataclass(frozen=True)
class EDM(Process):
    """EDM's preconditioned VE process (hashable: a static jit argument)."""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    name = 'edm'
    methods = METHODS

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f'diffusion.edm.sigma_min={self.sigma_min}, sigma_max='
                             f'{self.sigma_max}: need 0 < sigma_min < sigma_max (Karras et al.: '
                             '0.002, 80).')
        for field in ('sigma_data', 'rho', 'p_std'):
            if not getattr(self, field) > 0:
                raise ValueError(f'diffusion.edm.{field}={getattr(self, field)} must be > 0.')

    # -- Table 1 ------------------------------------------------------------------------------
    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / jnp.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma):
        return 1.0 / jnp.sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma):
        return 0.25 * jnp.log(sigma)

    def loss_weight(self, sigma):
        """λ(σ) = (σ² + σ_d²)/(σ σ_d)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # -- the interface ------------------------------------------------------------------------
    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), t

    def d_alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.zeros_like(t), jnp.ones_like(t)

    def sigma_tilde(self, t):
        return jnp.asarray(t, jnp.float32)

    def time_at_sigma_tilde(self, s):
        return jnp.asarray(s, jnp.float32)

    def network_sigma(self):
        """c_noise -> σ = e^{4 c_noise} (a pytree)."""
        return Partial(_network_sigma)

    def model_input(self, x, t):
        sigma = jnp.asarray(t, jnp.float32)
        return bcast(self.c_in(sigma), x) * x, self.c_noise(sigma)

    def output_to_x0(self, out, x, t):
        sigma = jnp.asarray(t, jnp.float32)
        return bcast(self.c_skip(sigma), x) * x + bcast(self.c_out(sigma), x) * out.astype(x.dtype)

    def ode_limits(self):
        """From σ_min (c_noise = ln σ/4 is -∞ at 0) to σ_max, as EDM's sampler spans."""
        return float(self.sigma_min), float(self.sigma_max)

    def prior_logp(self, z):
        """N(0, σ_max² I): x_{σ_max} = x_0 + σ_max ε up to the data's own spread (σ_d² ≪ σ_max²)."""
        flat = z.reshape(z.shape[0], -1)
        dims = flat.shape[1]
        return (-0.5 * jnp.sum(jnp.square(flat), axis=1) / self.sigma_max**2
                - 0.5 * dims * np.log(2 * np.pi * self.sigma_max**2))

    def time_grid(self, num_steps: int) -> np.ndarray:
        """Karras et al. eq. 5 for K = num_steps levels, then 0: [K+1] float64, descending."""
        i = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
        inv = 1.0 / self.rho
        sigmas = (self.sigma_max**inv + i * (self.sigma_min**inv - self.sigma_max**inv)) ** self.rho
        return np.append(sigmas, 0.0)

    def prior_sample(self, key, shape):
        return self.sigma_max * jax.random.normal(key, shape, jnp.float32)

    def sample_time(self, key, batch: int):
        """σ [B] with ln σ ~ N(P_mean, P_std²)."""
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (batch,), jnp.float32))

    def loss(self, model_fn, x0, key, t=None, noise=None):
        """Per-example λ(σ)‖D - x_0‖² (mean over dims). Returns dict(loss, t=σ, quantile) with
        quantile = Φ((ln σ - P_mean)/P_std) ∈ (0, 1), the level's rank in the training law."""
        sigma, _, x_t = self.draw(x0, key, t, noise)
        mse = mean_flat(jnp.square(self.denoise(model_fn, x_t, sigma) - x0))
        quantile = jax.scipy.stats.norm.cdf((jnp.log(sigma) - self.p_mean) / self.p_std)
        return dict(loss=self.loss_weight(sigma) * mse, mse=mse, t=sigma, quantile=quantile)


def _network_sigma(c_noise):
    return jnp.exp(4.0 * jnp.asarray(c_noise, jnp.float32))


@register_process('edm')
def _build(diffusion_config):
    return EDM(**section(diffusion_config, 'edm'))
