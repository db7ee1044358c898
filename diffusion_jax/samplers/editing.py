"""Editing with a trained sampler: DDIM inversion, DDIM and DDPM interpolation, samples of
p_θ(x_0 | x_t) from one x_t.

DDIM inversion runs the deterministic DDIM ODE forwards (data -> noise). Two discretisations
(`ddim_encode(inversion=...)`):
  'reference'     improved/guided-diffusion's `ddim_reverse_sample`: the input of step t is
                  taken at its own level ᾱ_t, ε̂ = ε_θ(x, t) evaluated there, and the step goes
                  t -> t+1:  x̂_0 = (x - √(1-ᾱ_t) ε̂)/√ᾱ_t,  x ← √ᾱ_{t+1} x̂_0 + √(1-ᾱ_{t+1}) ε̂.
                  x_0 enters as the level ᾱ_0 input (as in the reference loop) and the K-1 steps
                  t = 0, …, K-2 end at ᾱ_{K-1}, where decoding starts. (The reference loop takes
                  one more step, to ᾱ_next = 0, i.e. outputs ε̂; we stop at the decoder's level.)
  'target_level'  this project's earlier form, the exact inverse of a decoding step but for its
                  ε̂: step t maps level ᾱ_{t-1} (ᾱ_{-1} = 1, x_0 itself) to ᾱ_t with ε_θ(x, t),
                  the network told the *target* level's timestep (ε_θ(x_{t-1}, t) ≈ ε_θ(x_t, t));
                  K steps t = 0, …, K-1.
tests/test_solvers.py measures both by reconstruction error on the mixture oracle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from diffusion_jax.diffusion import wrap_model
from diffusion_jax.samplers import chain, common

INVERSIONS = ('reference', 'target_level')


def ddim_encode_step(diffusion, model_output, x, t, *, clip_denoised: bool = False):
    """One 'target_level' inversion step: x at level a = ᾱ_{t-1} -> level b = ᾱ_t with
    ε̂ = ε_θ(x, t) evaluated at its input:
        x̂_0 = (x - √(1-a) ε̂)/√a,    x_t = √b x̂_0 + √(1-b) ε̂.

    Shapes: model_output [B, ..., C or 2C], x [B, ..., C], t [B]. Returns x at level ᾱ_t.
    """
    return _target_level_step(diffusion, model_output, x, t, clip_denoised)[0]


def _target_level_step(diffusion, model_output, x, t, clip_denoised):
    """(x at level ᾱ_t, the step's x̂_0 at level ᾱ_{t-1}) of ddim_encode_step."""
    out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
    if diffusion.model_mean_type == 'eps' and not clip_denoised:
        eps = diffusion.split_model_output(model_output, x)[0].astype(x.dtype)
    else:
        eps = diffusion.predict_eps_from_x0(x, t, out['pred_x0'])
    pred_x0 = ((x - common.coef(diffusion, 'one_minus_alphas_cumprod_prev', t, x) ** 0.5 * eps)
               / common.coef(diffusion, 'sqrt_alphas_cumprod_prev', t, x))
    return (common.coef(diffusion, 'sqrt_alphas_cumprod', t, x) * pred_x0
            + common.coef(diffusion, 'sqrt_one_minus_alphas_cumprod', t, x) * eps), pred_x0


def ddim_reverse_step(diffusion, model_output, x, t, *, clip_denoised: bool = False):
    """One 'reference' inversion step, x at level ᾱ_t -> level ᾱ_{t+1} (guided-diffusion's
    ddim_reverse_sample, GaussianDiffusion.ddim_reverse_sample). Returns [B, ...]."""
    return diffusion.ddim_reverse_sample(model_output, x, t, clip_denoised=clip_denoised)['sample']


@functools.partial(jax.jit, static_argnames=('static', 'clip_denoised', 'mesh', 'inversion',
                                             'self_condition'))
def _encode_jit(dynamic, x0, *, static, clip_denoised, mesh, inversion, self_condition):
    diffusion, model_fn = static.merge(dynamic)
    batch = x0.shape[0]
    steps = diffusion.num_timesteps - (1 if inversion == 'reference' else 0)
    net = wrap_model(model_fn, diffusion)

    def body(j, carry):
        x, previous_x0 = carry
        t = jnp.full((batch,), j, jnp.int32)
        # Self-conditioning: the step is fed the previous step's x̂_0 (zeros first), and its
        # own x̂_0 (the one the step encodes with) is fed to the next.
        model_output = net(x, t) if previous_x0 is None else net(x, t, self_cond=previous_x0)
        if inversion == 'reference':
            out = diffusion.ddim_reverse_sample(model_output, x, t, clip_denoised=clip_denoised)
            x_next, x0_hat = out['sample'], out['pred_x0']
        else:
            x_next, x0_hat = _target_level_step(diffusion, model_output, x, t, clip_denoised)
        fed = None if previous_x0 is None else common.constrain(x0_hat.astype(x.dtype), mesh)
        return common.constrain(x_next, mesh), fed

    previous_x0 = jnp.zeros_like(x0) if self_condition else None
    return jax.lax.fori_loop(0, steps, body, (common.constrain(x0, mesh), previous_x0))[0]


def ddim_encode(diffusion, model_fn, x0, *, clip_denoised: bool = False, mesh: Mesh | None = None,
                inversion: str = 'reference', self_condition: bool = False):
    """x_T of x_0 under the deterministic DDIM ODE (Song et al. 2021, Sec. 5.4), [B, ...], at
    level ᾱ_{K-1}, where sample(method='ddim', eta=0, x_T=x_T, clip_denoised=False) starts.

    inversion: 'reference' (guided-diffusion's ddim_reverse_sample, default) or 'target_level'
    (see the module docstring). Decoding reconstructs x_0 up to each step's O(1/K) error.
    self_condition: a self-conditioned network (Chen et al. 2022): each inversion step is fed
    the previous step's x̂_0, zeros at the first, as the decoder is.
    """
    if inversion not in INVERSIONS:
        raise ValueError(f'sampling.inversion={inversion!r} is not valid; choose one of '
                         f'{", ".join(INVERSIONS)}.')
    chain.check_batch(x0.shape[0], mesh, 'ddim_encode')
    dynamic, static = chain.partition((diffusion, model_fn))
    return _encode_jit(dynamic, jnp.asarray(x0, jnp.float32), static=static,
                       clip_denoised=bool(clip_denoised), mesh=mesh, inversion=inversion,
                       self_condition=bool(self_condition))


def slerp(z0, z1, lam):
    """Spherical interpolation sin((1-λ)θ)/sin θ · z0 + sin(λθ)/sin θ · z1 per example, θ the
    angle between z0 and z1 (Song et al. 2021, Sec. 5.3; Shoemake 1985); linear where θ ≈ 0.

    Shapes: z0, z1 [B, ...]; lam scalar or [B]. Returns [B, ...].
    """
    lam = jnp.reshape(jnp.asarray(lam, z0.dtype), (-1,) + (1,) * (z0.ndim - 1))
    cos = (jnp.sum(z0 * z1, axis=tuple(range(1, z0.ndim)), keepdims=True)
           / (common.per_example_norm(z0) * common.per_example_norm(z1)))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    safe = jnp.where(sin > 1e-6, sin, 1.0)
    spherical = (jnp.sin((1.0 - lam) * theta) * z0 + jnp.sin(lam * theta) * z1) / safe
    return jnp.where(sin > 1e-6, spherical, (1.0 - lam) * z0 + lam * z1)


def _flat_lambdas(lambdas, batch):
    lambdas = jnp.asarray(lambdas, jnp.float32)
    return lambdas, jnp.repeat(lambdas, batch)


def interpolate_ddim(diffusion, model_fn, x0_a, x0_b, lambdas, *, clip_denoised: bool = False,
                     mesh: Mesh | None = None, decode_model_fn=None, inversion: str = 'reference',
                     self_condition: bool = False):
    """DDIM interpolation (Song et al. 2021, Sec. 5.3): encode both images to x_T with the ODE,
    slerp the codes, decode each deterministically (η = 0).

    Shapes: x0_a, x0_b [B, ...]; lambdas [L]. Returns [L, B, ...] (λ = 0 reconstructs x0_a).
    model_fn serves the [2B] encoding batch (x0_a then x0_b) and, unless decode_model_fn is
    given, the [L·B] decoding batch (λ-major); a class-conditional model_fn binds labels of
    those batch sizes. self_condition: a self-conditioned network (ddim_encode, chain.sample).
    """
    batch = x0_a.shape[0]
    codes = ddim_encode(diffusion, model_fn, jnp.concatenate([x0_a, x0_b]),
                        clip_denoised=clip_denoised, mesh=mesh, inversion=inversion,
                        self_condition=self_condition)
    lambdas, lam = _flat_lambdas(lambdas, batch)
    num = lambdas.shape[0]
    z0 = jnp.tile(codes[:batch], (num,) + (1,) * (codes.ndim - 1))
    z1 = jnp.tile(codes[batch:], (num,) + (1,) * (codes.ndim - 1))
    x_T = slerp(z0, z1, lam)
    # η = 0 draws no noise: the key is a placeholder.
    out = chain.sample(diffusion, decode_model_fn or model_fn, jax.random.key(0), x_T.shape,
                       method='ddim', eta=0.0, clip_denoised=clip_denoised, x_T=x_T,
                       mesh=mesh, self_condition=self_condition)['samples']
    return out.reshape((num, batch) + x0_a.shape[1:])


def interpolate_ddpm(diffusion, model_fn, rng, x0_a, x0_b, t: int, lambdas, *,
                     clip_denoised: bool = True, mesh: Mesh | None = None,
                     self_condition: bool = False):
    """DDPM interpolation (Ho et al. 2020, Sec. 4.3): x_t, x'_t ~ q(x_t|x_0) with the same noise,
    x̄_t = (1-λ) x_t + λ x'_t, decoded by the ancestral chain from step t with each step's noise
    shared across λ, so the strip varies only with λ.

    Shapes: x0_a, x0_b [B, ...]; t a step index of the (respaced) chain; lambdas [L].
    self_condition: a self-conditioned network (chain.reverse_from). Returns [L, B, ...].
    """
    batch = x0_a.shape[0]
    k_q, k_chain = jax.random.split(rng)
    noise = jax.random.normal(k_q, x0_a.shape, jnp.float32)
    tt = jnp.full((batch,), t, jnp.int32)
    x_a, x_b = diffusion.q_sample(x0_a, tt, noise), diffusion.q_sample(x0_b, tt, noise)
    lambdas, lam = _flat_lambdas(lambdas, batch)
    num = lambdas.shape[0]
    lam = lam.reshape((-1,) + (1,) * (x_a.ndim - 1))
    x_bar = ((1.0 - lam) * jnp.tile(x_a, (num,) + (1,) * (x_a.ndim - 1))
             + lam * jnp.tile(x_b, (num,) + (1,) * (x_b.ndim - 1)))
    out = chain.reverse_from(diffusion, model_fn, k_chain, x_bar, t, clip_denoised=clip_denoised,
                             mesh=mesh, noise_repeat=num, self_condition=self_condition)
    return out.reshape((num, batch) + x0_a.shape[1:])


def same_xt_samples(diffusion, model_fn, rng, x_t, t: int, num_samples: int, *,
                    method: str = 'ancestral', eta: float = 1.0, clip_denoised: bool = True,
                    mesh: Mesh | None = None, self_condition: bool = False):
    """num_samples independent reverse chains from the same x_t (DDPM Fig. 7): samples of
    p_θ(x_0 | x_t). x_t [B, ...] at step t of the chain; returns [num_samples, B, ...].
    self_condition: a self-conditioned network (chain.reverse_from: zeros fed at step t)."""
    x = jnp.tile(jnp.asarray(x_t, jnp.float32), (num_samples,) + (1,) * (x_t.ndim - 1))
    out = chain.reverse_from(diffusion, model_fn, rng, x, t, method=method, eta=eta,
                             clip_denoised=clip_denoised, mesh=mesh,
                             self_condition=self_condition)
    return out.reshape((num_samples,) + x_t.shape)
