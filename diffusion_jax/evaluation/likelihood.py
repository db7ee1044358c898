"""Negative log-likelihood bounds in bits per dimension (DDPM Table 1's NLL column).

The bound of DDPM eq. 5 for one image, in bits/dim:
    NLL(x0) ≤ L_T + Σ_{t=1}^{T-1} L_t + L_0,
with L_T = prior_bpd, L_t the KL terms and L_0 the discretized decoder (all from
GaussianDiffusion.calc_bpd_loop). Two estimators:

  full_bpd         every term: T network evaluations per image (exact bound, the published way).
  sampled_bpd      K timesteps per image drawn from p(t): Σ_t L_t ≈ (1/K) Σ_k L_{t_k}/p(t_k),
                   unbiased for any p > 0, with a standard error from the spread of the per-image
                   estimates; K ≪ T evaluations per image. p uniform gives (T/K) Σ_k L_{t_k};
                   importance_probs gives Nichol & Dhariwal's p(t) ∝ √E[L_t²] (eq. 18) from a
                   pilot batch's terms, which concentrates the K evaluations where L_t is large.

Both are pure functions of (diffusion, model_fn, x0, rng) that run under jit on a batch sharded
over the device mesh; `BpdAccumulator` streams a dataset split through them.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import timestep_sampling


def full_bpd(diffusion, model_fn, x0, rng, clip_denoised: bool = True):
    """Every term of the bound: dict(total, prior, decoder, kl_sum) each [B] bits/dim, and
    vb [B, T] (L_t per t)."""
    out = diffusion.calc_bpd_loop(model_fn, x0, rng, clip_denoised=clip_denoised)
    return dict(total=out['total_bpd'], prior=out['prior_bpd'], decoder=out['vb'][:, 0],
                kl_sum=jnp.sum(out['vb'][:, 1:], axis=1), vb=out['vb'])


def importance_probs(vb_terms, uniform_prob: float = timestep_sampling.UNIFORM_PROB):
    """p(t) ∝ √(mean over images of L_t²) from pilot terms vb_terms [B, T], mixed with a small
    uniform share so every t keeps p > 0 (Nichol & Dhariwal 2021, eq. 18): the loss-aware
    training sampler's distribution with the pilot batch as its history. Returns [T]."""
    history = jnp.asarray(vb_terms, jnp.float32).T  # [T, B]: B values of each L_t
    state = timestep_sampling.LossAwareState(
        loss_history=history, counts=jnp.full((history.shape[0],), history.shape[1], jnp.int32),
        uniform_prob=uniform_prob)
    return timestep_sampling.probabilities(state)


def sampled_bpd(diffusion, model_fn, x0, rng, num_timesteps_per_image: int,
                clip_denoised: bool = True, probs=None):
    """Unbiased Monte Carlo estimate of the bound from K timesteps per image drawn from p(t).

    Σ_{t=0}^{T-1} L_t = E_{t~p}[L_t/p(t)] ≈ (1/K) Σ_k L_{t_k}/p(t_k); L_T is added exactly.
    probs: [T] (default uniform, which gives (T/K) Σ_k L_{t_k}).
    Returns dict(total=[B], prior=[B]).
    """
    batch, num_t = x0.shape[0], diffusion.num_timesteps
    t_key, n_key = jax.random.split(rng)
    if probs is None:
        probs = jnp.full((num_t,), 1.0 / num_t, jnp.float32)
    ts = jax.random.choice(t_key, num_t, (num_timesteps_per_image, batch), p=probs).astype(
        jnp.int32)

    def term(carry, inputs):
        t, key = inputs
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        model_output = model_fn(x_t, jnp.asarray(diffusion.timestep_map)[t])
        vb = diffusion.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=clip_denoised)['output']
        return carry + vb / probs[t], None

    keys = jax.random.split(n_key, num_timesteps_per_image)
    vb_sum, _ = jax.lax.scan(term, jnp.zeros((batch,), x0.dtype), (ts, keys))
    prior = diffusion.prior_bpd(x0)
    return dict(total=vb_sum / num_timesteps_per_image + prior, prior=prior)


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
