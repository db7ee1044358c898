"""Negative log-likelihood bounds in bits per dimension (DDPM Table 1's NLL column).

The bound of DDPM eq. 5 for one image, in bits/dim:
    NLL(x0) ≤ L_T + Σ_{t=1}^{T-1} L_t + L_0,
with L_T = prior_bpd, L_t the KL terms and L_0 the discretized decoder (all from
GaussianDiffusion.calc_bpd_loop). Two estimators:

  full_bpd         every term: T network evaluations per image (exact bound, the published way).
  sampled_bpd      K timesteps per image drawn uniformly: Σ_t L_t ≈ (T/K) Σ_k L_{t_k}, unbiased,
                   with a standard error from the spread of the per-image estimates; K ≪ T
                   evaluations per image.

Both are pure functions of (diffusion, model_fn, x0, rng) that run under jit on a batch sharded
over the device mesh; `BpdAccumulator` streams a dataset split through them.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def full_bpd(diffusion, model_fn, x0, rng, clip_denoised: bool = True):
    """Every term of the bound: dict(total, prior, decoder, kl_sum) each [B] bits/dim."""
    out = diffusion.calc_bpd_loop(model_fn, x0, rng, clip_denoised=clip_denoised)
    return dict(total=out['total_bpd'], prior=out['prior_bpd'], decoder=out['vb'][:, 0],
                kl_sum=jnp.sum(out['vb'][:, 1:], axis=1))


def sampled_bpd(diffusion, model_fn, x0, rng, num_timesteps_per_image: int,
                clip_denoised: bool = True):
    """Unbiased Monte Carlo estimate of the bound from K uniformly drawn t per image.

    Σ_{t=0}^{T-1} L_t = T · E_{t~U}[L_t] ≈ (T/K) Σ_k L_{t_k}; L_T is added exactly.
    Returns dict(total=[B], prior=[B]).
    """
    batch, num_t = x0.shape[0], diffusion.num_timesteps
    t_key, n_key = jax.random.split(rng)
    ts = jax.random.randint(t_key, (num_timesteps_per_image, batch), 0, num_t, dtype=jnp.int32)

    def term(carry, inputs):
        t, key = inputs
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        model_output = model_fn(x_t, jnp.asarray(diffusion.timestep_map)[t])
        vb = diffusion.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=clip_denoised)['output']
        return carry + vb, None

    keys = jax.random.split(n_key, num_timesteps_per_image)
    vb_sum, _ = jax.lax.scan(term, jnp.zeros((batch,), x0.dtype), (ts, keys))
    prior = diffusion.prior_bpd(x0)
    return dict(total=vb_sum * (num_t / num_timesteps_per_image) + prior, prior=prior)


@dataclasses.dataclass
class BpdAccumulator:
    """Running sums over a dataset split (float64 on the host) of per-image bound terms."""
    count: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    sq_sums: dict = dataclasses.field(default_factory=dict)

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            value = np.asarray(value, np.float64)
            self.sums[name] = self.sums.get(name, 0.0) + float(value.sum())
            self.sq_sums[name] = self.sq_sums.get(name, 0.0) + float(np.square(value).sum())
        self.count += int(np.asarray(next(iter(terms.values()))).shape[0])

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.count, 1)

    def stderr(self, name: str) -> float:
        """Standard error of the mean over images (spread of images and of the MC estimate)."""
        n = max(self.count, 1)
        var = max(self.sq_sums[name] / n - self.mean(name) ** 2, 0.0)
        return math.sqrt(var / max(n - 1, 1))

    def summary(self) -> dict:
        out = {'num_images': self.count}
        for name in self.sums:
            out[f'{name}_bpd'] = self.mean(name)
            out[f'{name}_bpd_stderr'] = self.stderr(name)
        return out
