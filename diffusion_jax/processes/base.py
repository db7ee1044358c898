"""The process interface every sampler, loss and likelihood reads, and the process registry.

A process is a family of Gaussian marginals x_t = α(t) x_0 + σ(t) ε, ε ~ N(0, I), over its own
time variable t, together with how a network is called on x_t and what it is trained to predict:

  alpha_sigma(t)          (α(t), σ(t)), each of t's shape
  d_alpha_sigma(t)        (dα/dt, dσ/dt) (continuous processes; the ODE samplers need them)
  log_snr(t)              λ(t) = log(α/σ) (the exponential integrators' variable)
  sigma_tilde(t)          σ̃ = σ/α, EDM's σ of the same level (guidance intervals, churn)
  time_at_sigma_tilde(s)  the inverse of sigma_tilde
  model_input(x, t)       (x_in, t_in): what the network is called with
  output_to_x0(out, x, t) the network output as x̂_0
  denoise(model_fn, x, t) x̂_0(x_t, t) = output_to_x0(model_fn(*model_input(x, t)), x, t)
  time_grid(K)            the K + 1 sampling times, from the noise end down to the data end
  velocity(model_fn, x, t) dx/dt of the probability-flow ODE; ode_limits(), prior_logp(z) for
                          the ODE likelihood (evaluation.likelihood.ode_bpd)
  prior_sample(key, shape) x at the first grid time
  sample_time(key, B)     training times t ~ p_train(t), [B]
  loss(model_fn, x0, key, t=None, noise=None)
                          per-example training loss (a dict with 'loss' [B]), pure; t and ε
                          drawn from key unless given
  methods                 the sampler names the process can run

From x̂_0 every other parametrisation follows (shared here, so no sampler needs a process's type):
    ε̂ = (x - α x̂_0)/σ,   score ŝ = -(x - α x̂_0)/σ²,   velocity dx/dt = α' x̂_0 + σ' ε̂
(the last is the probability-flow ODE of the marginals, E[α' x_0 + σ' ε | x_t]: for flow matching
ε̂ - x̂_0, for EDM (x - D)/σ).

A new process is one module in this package: a class with the methods above (subclass `Process`)
and a builder `@register_process('name')` reading its `config.diffusion` section.
"""
from __future__ import annotations

import abc
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# log α is taken of max(α, tiny) so that λ stays finite where α = 0 (flow matching's t = 1):
# e^{-h} then underflows to 0 there and the exponential integrators' first step is exact.
_TINY = float(np.finfo(np.float32).tiny)


def bcast(a, x):
    """a [B] (or scalar) shaped [B, 1, …, 1] to broadcast against x [B, ...], in x's dtype."""
    a = jnp.asarray(a, x.dtype)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def mean_flat(x):
    """Mean over every axis but the leading one: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class Process(abc.ABC):
    """The shared part of every process: conversions from x̂_0 (see the module docstring).
    A process implements the four abstract methods; the optional ones raise a one-line error
    naming what the process does not have."""

    name = ''
    methods: tuple[str, ...] = ()

    # -- to be provided by a process ----------------------------------------------------------
    @abc.abstractmethod
    def alpha_sigma(self, t):
        """See the module docstring."""

    def d_alpha_sigma(self, t):
        raise ValueError(f'process {self.name!r} has no continuous time derivative.')

    @abc.abstractmethod
    def model_input(self, x, t):
        """See the module docstring."""

    @abc.abstractmethod
    def output_to_x0(self, out, x, t):
        """See the module docstring."""

    @abc.abstractmethod
    def time_grid(self, num_steps: int) -> np.ndarray:
        """See the module docstring."""

    def sigma_tilde(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    # -- shared -------------------------------------------------------------------------------
    def log_snr(self, t):
        """λ(t) = log α - log σ, float32 of t's shape (+∞ where σ = 0, finite where α = 0)."""
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32)
        return jnp.log(jnp.maximum(alpha, _TINY)) - jnp.log(sigma)

    def denoise(self, model_fn: Callable, x, t):
        """x̂_0(x_t, t) [B, ...] from the network model_fn(x_in, t_in); t [B]."""
        x_in, t_in = self.model_input(x, t)
        return self.output_to_x0(model_fn(x_in, t_in), x, t)

    def eps_from_x0(self, x0, x, t):
        """ε̂ = (x - α x̂_0)/σ."""
        alpha, sigma = self.alpha_sigma(t)
        return (x - bcast(alpha, x) * x0) / bcast(sigma, x)

    def x0_from_eps(self, eps, x, t):
        """x̂_0 = (x - σ ε̂)/α."""
        alpha, sigma = self.alpha_sigma(t)
        return (x - bcast(sigma, x) * eps) / bcast(alpha, x)

    def score_from_x0(self, x0, x, t):
        """∇_x log p_t(x) ≈ -(x - α x̂_0)/σ² (Tweedie)."""
        alpha, sigma = self.alpha_sigma(t)
        return -(x - bcast(alpha, x) * x0) / bcast(sigma, x) ** 2

    def velocity_from_x0(self, x0, x, t):
        """The probability-flow ODE's dx/dt = α'(t) x̂_0 + σ'(t) ε̂."""
        d_alpha, d_sigma = self.d_alpha_sigma(t)
        return bcast(d_alpha, x) * x0 + bcast(d_sigma, x) * self.eps_from_x0(x0, x, t)

    def velocity(self, model_fn, x, t):
        """The probability-flow ODE's dx/dt at (x [B, ...], t [B]) from the network."""
        return self.velocity_from_x0(self.denoise(model_fn, x, t), x, t)

    def ode_limits(self) -> tuple[float, float]:
        """(t_data, t_noise): where the likelihood ODE starts and ends."""
        raise ValueError(f'process {self.name!r} has no probability-flow ODE limits.')

    def prior_logp(self, z):
        """log p_{t_noise}(z) per example [B] of the (approximate) prior at t_noise."""
        raise ValueError(f'process {self.name!r} has no prior density for the ODE likelihood.')

    def draw(self, x0, key, t=None, noise=None):
        """(t [B], ε [B, ...], x_t) of one training draw from key: t ~ sample_time unless
        given, ε ~ N(0, I) unless given, x_t = α x_0 + σ ε; the draw `loss(model_fn, x0, key,
        t, noise)` trains on (so a self-conditioning first pass can see the same x_t, and a
        microbatch can train on its slice of the whole batch's draw: train.make_train_step)."""
        if t is not None and noise is not None:
            t = jnp.asarray(t, jnp.float32)
            return t, noise, self.marginal_sample(x0, t, noise)
        t_key, noise_key = jax.random.split(key)
        t = self.sample_time(t_key, x0.shape[0]) if t is None else jnp.asarray(t, jnp.float32)
        if noise is None:
            noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        return t, noise, self.marginal_sample(x0, t, noise)

    def marginal_sample(self, x0, t, noise):
        """x_t = α(t) x_0 + σ(t) ε; x0, noise [B, ...], t [B]."""
        alpha, sigma = self.alpha_sigma(t)
        return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise

    def check_method(self, method: str) -> None:
        """ValueError in one line unless this process can run `method`."""
        if method not in self.methods:
            raise ValueError(f'sampling.method={method!r} cannot run on diffusion.process='
                             f'{self.name!r}; it runs {", ".join(self.methods)}.')


# ----------------------------------------------------------------------------------------------
# Registry: config.diffusion.process -> builder(diffusion_config) -> Process
# ----------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable] = {}


def register_process(name: str):
    """Decorator registering `builder(diffusion_config) -> Process` under `name`."""
    def deco(builder):
        if name in _REGISTRY:
            raise ValueError(f'process {name!r} is registered twice.')
        _REGISTRY[name] = builder
        return builder
    return deco


def names() -> tuple[str, ...]:
    """The registered process names, in registration order."""
    return tuple(_REGISTRY)


def check_name(name) -> None:
    if name not in _REGISTRY:
        raise ValueError(f'diffusion.process={name!r} is not a process; choose one of '
                         f'{", ".join(names())}.')


def get_process(diffusion_config):
    """The process of a run from its `config.diffusion` section (`process`, default 'gaussian')."""
    name = diffusion_config.get('process', 'gaussian')
    check_name(name)
    return _REGISTRY[name](diffusion_config)


def section(diffusion_config, name: str) -> dict:
    """The process's own sub-section (`diffusion.flow`, `diffusion.edm`) as a dict ({} if none)."""
    sub = diffusion_config.get(name, None)
    return {} if sub is None else dict(sub)
