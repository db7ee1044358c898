"""'flow': rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023) in the
convention of SD3 (Esser et al. 2024) and diffusers' flow-matching schedulers.

    x_t = (1 - t) x_0 + t ε,   t ∈ [0, 1], t = 1 pure noise;   α = 1 - t, σ = t,
    velocity v = dx_t/dt = ε - x_0   (Liu's and Lipman's papers put noise at t = 0: their v = x_0 - ε),
    x̂_0 = x_t - t v̂,  ε̂ = x_t + (1 - t) v̂.

Training time (SD3, Sec. 3.1): 'uniform' t ~ U(0, 1) or 'logit_normal' t = sigmoid(m + s n),
n ~ N(0, 1); then the resolution shift t' = s t / (1 + (s - 1) t) (SD3 eq. 23, s = `shift`), which
is also applied to the sampling grid t_i = 1 - i/K. Loss: ‖v̂ - (ε - x_0)‖² (velocity prediction)
or ‖x̂_0 - x_0‖² (prediction='x0'), the mean over dimensions, weight 1.

The network is called as model_fn(x_t, time_scale·t): t in [0, 1] with the default time_scale 1
(the sampler contract); SD3/diffusers' transformers take 1000·t (`timestep = sigma * 1000`), which
configs set through diffusion.flow.time_scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.processes.base import Process, bcast, mean_flat, register_process, section

PREDICTIONS = ('velocity', 'x0')
TIME_SAMPLINGS = ('uniform', 'logit_normal')
METHODS = ('euler', 'heun', 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc')


def shift_time(t, shift: float):
    """SD3's resolution shift t' = s t / (1 + (s - 1) t): fixes 0 and 1, s > 1 moves mass to noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclasses.dataclass(frozen=True)
class FlowMatching(Process):
    """Flow matching x_t = (1-t) x_0 + t ε (hashable: a static jit argument).

    Args:
      prediction: 'velocity' (v = ε - x_0) or 'x0'.
      time_sampling: 'uniform' or 'logit_normal' (SD3's rf/lognorm(m, s)).
      logit_mean, logit_std: m, s of 'logit_normal' (SD3's best: 0, 1).
      shift: SD3's s (1: no shift).
      time_scale: the network sees time_scale·t.
    """
    prediction: str = 'velocity'
    time_sampling: str = 'uniform'
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    time_scale: float = 1.0

    name = 'flow'
    methods = METHODS

    def __post_init__(self):
        for field, value, choices in (('prediction', self.prediction, PREDICTIONS),
                                      ('time_sampling', self.time_sampling, TIME_SAMPLINGS)):
            if value not in choices:
                raise ValueError(f'diffusion.flow.{field}={value!r} is not valid; choose one of '
                                 f'{", ".join(choices)}.')
        if not self.shift > 0:
            raise ValueError(f'diffusion.flow.shift={self.shift} must be > 0 (1: no shift; SD3 '
                             'uses 3 at 1024²).')
        if not self.logit_std > 0:
            raise ValueError(f'diffusion.flow.logit_std={self.logit_std} must be > 0.')

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def d_alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -jnp.ones_like(t), jnp.ones_like(t)

    def sigma_tilde(self, t):
        """σ̃ = t/(1 - t) (∞ at t = 1)."""
        t = jnp.asarray(t, jnp.float32)
        return t / (1.0 - t)

    def time_at_sigma_tilde(self, s):
        s = jnp.asarray(s, jnp.float32)
        return s / (1.0 + s)

    def network_sigma(self):
        """t_in -> σ̃ = t/(1-t) of the network's time input t_in = time_scale·t (a pytree)."""
        return Partial(_network_sigma, jnp.float32(self.time_scale))

    def model_input(self, x, t):
        return x, jnp.asarray(t, jnp.float32) * self.time_scale

    def output_to_x0(self, out, x, t):
        out = out.astype(x.dtype)
        if self.prediction == 'x0':
            return out
        return x - bcast(t, x) * out

    def velocity(self, model_fn, x, t):
        """v̂ itself for a velocity network (exact at t = 0, where ε̂ = (x - α x̂_0)/σ is 0/0)."""
        if self.prediction == 'x0':
            return super().velocity(model_fn, x, t)
        return model_fn(*self.model_input(x, t)).astype(x.dtype)

    def ode_limits(self):
        if self.prediction == 'x0':
            raise ValueError("diffusion.flow.prediction='x0': the ODE velocity (x - x̂_0)/t is "
                             "undefined at t = 0; the ODE likelihood needs prediction='velocity'.")
        return 0.0, 1.0

    def prior_logp(self, z):
        """N(0, I) at t = 1 (exact: x_1 = ε)."""
        flat = z.reshape(z.shape[0], -1)
        return -0.5 * jnp.sum(jnp.square(flat), axis=1) - 0.5 * flat.shape[1] * np.log(2 * np.pi)

    def time_grid(self, num_steps: int) -> np.ndarray:
        """t_i = shift(1 - i/K), i = 0..K: [K+1] float64 from 1 down to 0."""
        t = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
        return shift_time(t, self.shift)

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape, jnp.float32)

    def sample_time(self, key, batch: int):
        """t [B] from the training distribution (then shifted)."""
        if self.time_sampling == 'uniform':
            t = jax.random.uniform(key, (batch,), jnp.float32)
        else:
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std
                               * jax.random.normal(key, (batch,), jnp.float32))
        return shift_time(t, self.shift)

    def loss(self, model_fn, x0, key, t=None, noise=None):
        """Per-example flow-matching loss. Returns dict(loss=[B], t=[B], quantile=[B]): quantile
        is t itself (the metrics' loss-per-quarter axis)."""
        t, noise, x_t = self.draw(x0, key, t, noise)
        out = model_fn(*self.model_input(x_t, t)).astype(x0.dtype)
        target = x0 if self.prediction == 'x0' else noise - x0
        loss = mean_flat(jnp.square(out - target))
        return dict(loss=loss, mse=loss, t=t, quantile=t)


def _network_sigma(time_scale, t_in):
    t = jnp.asarray(t_in, jnp.float32) / time_scale
    return t / (1.0 - t)


@register_process('flow')
def _build(diffusion_config):
    return FlowMatching(**section(diffusion_config, 'flow'))
