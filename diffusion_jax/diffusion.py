"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): forward process, posterior,
reverse-process parameterisations, every term of the variational bound and the training losses.

Conventions (shared by the whole package):
  * Images are NHWC float32 in [-1, 1]; uint8 pixel value v maps to v/127.5 - 1. Any data of shape
    [B, ...] works: every method is batched over the leading axis and reduces over the rest.
  * Timesteps t are int32 in [0, T), 0-indexed: t = 0 is the first noising step, so x_t below
    means the paper's x_{t+1}, and the decoder term L_0 sits at t = 0.
  * A learned-variance model outputs 2C channels on the last axis: the first C are the mean output
    (ε, x0 or v), the last C the variance value (a log-variance for 'learned', v ∈ [-1, 1] for
    'learned_range').
  * Likelihoods are in bits per dimension over 256 discrete pixel values.

The forward process (DDPM eq. 2 and 4), with α_t = 1 - β_t and ᾱ_t = ∏_{s<=t} α_s:
    q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I),     q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I).
The forward-process posterior (DDPM eq. 6-7):
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),   μ̃_t = √ᾱ_{t-1} β_t/(1-ᾱ_t) x_0 + √α_t (1-ᾱ_{t-1})/(1-ᾱ_t) x_t,
    β̃_t = (1 - ᾱ_{t-1})/(1 - ᾱ_t) β_t.
The bound (DDPM eq. 5): L = L_T + Σ_{t>1} L_{t-1} + L_0 with L_T = KL(q(x_T|x_0) ‖ N(0, I)),
L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) and L_0 = -log p_θ(x_0|x_1) (discretized decoder).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import respace as respace_lib

MEAN_TYPES = ('eps', 'x0', 'v')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl', 'rescaled_kl', 'hybrid')
# Nichol & Dhariwal 2021, Sec. 3.1: L_hybrid = L_simple + λ L_vlb with λ = 0.001.
HYBRID_VLB_WEIGHT = 0.001

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def wrap_model(model_fn: ModelFn, process) -> ModelFn:
    """The one place where a chain's step index becomes the network's time input (as
    improved-diffusion's _WrappedModel): (x_t, t) -> model_fn(x_t, process.model_time(t)).

    t: [B] indices of `process`'s (possibly respaced) steps; process.model_time maps them to the
    time the network was trained with (GaussianDiffusion: the original timestep, timestep_map[t]).
    Every sampler, the bound, the ODE likelihood and the train step call the network through
    this. The network's own timestep_scale (models.layers.TimeEmbedding) stays with the network:
    it is a property of its embedding (converted weights), applied to whatever time it is given.
    Keyword inputs (self_cond=x̂_0 of a self-conditioned model) pass through unchanged.
    """
    return lambda x_t, t, **inputs: model_fn(x_t, process.model_time(t), **inputs)


# ----------------------------------------------------------------------------------------------
# Gaussian densities
# ----------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation Ho et al. use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _log_sigmoid(z):
    """log σ(z) = -softplus(-z), finite for every z (σ(z) = 1/(1+e^{-z}))."""
    return -jnp.logaddexp(0.0, -z)


def _log_diff_exp(log_a, log_b, valid):
    """log(e^log_a - e^log_b) for log_a >= log_b, without forming the difference of the two.

    Where `valid` is False the result is unused (a jnp.where branch): the argument is replaced
    by a harmless one so that its gradient is finite, since 0·nan would still poison the sum.
    """
    d = jnp.where(valid, jnp.minimum(log_b - log_a, 0.0), -1.0)
    return log_a + jnp.log(jnp.maximum(-jnp.expm1(d), 1e-30))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data quantised to 256 bins under N(means, e^{2 log_scales}) (DDPM Sec. 3.3).

    Bin i covers [x - 1/255, x + 1/255] for x = i/127.5 - 1; the edge bins are open-ended
    (-∞, -1 + 1/255] and [1 - 1/255, ∞) so the 256 probabilities sum to one. Φ is Ho et al.'s
    approximation ½(1 + tanh(u)), u = √(2/π)(z + 0.044715 z³), which is exactly the logistic
    Φ(z) = σ(2u), 1 - Φ(z) = σ(-2u). Probabilities are floored at 1e-12 before the log, as in
    Ho et al., so numbers compare with the published ones.

    Tail-stable form: a bin in the upper tail (both edges above the mean) is
    S(a) - S(b) with S = 1 - Φ, a bin in the lower tail Φ(b) - Φ(a), each as
    log S(a) + log(1 - S(b)/S(a)) from log σ, so nothing saturates or cancels: the reference
    formula Φ(b) - Φ(a) in float32 loses a bin 5σ from the mean (tanh(u) rounds to 1 above
    u ≈ 9) and floors it at log 1e-12 = -27.6 nats. This function agrees with the reference
    formula evaluated in float64 (tests/test_diffusion.py).

    Args:
      x: data in [-1, 1] on the 256-value grid, any shape.
      means, log_scales: broadcastable to x; log_scales is the log standard deviation.
    Returns:
      log-likelihood in nats, shape of x.
    """
    chex.assert_equal_shape([x, means])
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    two_u = lambda z: 2.0 * math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)
    u_plus = two_u(inv_stdv * (centered + 1.0 / 255.0))  # upper bin edge b
    u_min = two_u(inv_stdv * (centered - 1.0 / 255.0))  # lower bin edge a
    log_cdf_plus = _log_sigmoid(u_plus)  # log Φ(b)
    log_one_minus_cdf_min = _log_sigmoid(-u_min)  # log (1 - Φ(a))
    upper_tail = _log_diff_exp(log_one_minus_cdf_min, _log_sigmoid(-u_plus), u_min > 0)
    lower_tail = _log_diff_exp(log_cdf_plus, _log_sigmoid(u_min), u_plus < 0)
    # A bin around the mean holds at least Φ(b) - Φ(a) >= min(Φ(b) - ½, ½ - Φ(a)): no cancellation.
    middle = jnp.log(jnp.maximum(jax.nn.sigmoid(u_plus) - jax.nn.sigmoid(u_min), 1e-30))
    log_delta = jnp.where(u_min > 0, upper_tail, jnp.where(u_plus < 0, lower_tail, middle))
    # The bin edges ±0.999 stand for the first and last of 256 levels (±1 ± 1/255 rounding slack).
    log_probs = jnp.where(x < -0.999, log_cdf_plus,
                          jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return jnp.maximum(log_probs, math.log(1e-12))


def mean_flat(x):
    """Mean over every axis but the leading (batch) one: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _extract(arr: Any, t: jax.Array, x_shape, dtype) -> jax.Array:
    """arr[t] for a per-timestep constant, shaped [B, 1, ..., 1] to broadcast against x."""
    out = jnp.asarray(arr)[t].astype(dtype)
    return out.reshape(t.shape + (1,) * (len(x_shape) - 1))


# ----------------------------------------------------------------------------------------------
# The diffusion
# ----------------------------------------------------------------------------------------------
_CONSTANTS = (
    'betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'alphas_cumprod_next',
    'one_minus_alphas_cumprod', 'one_minus_alphas_cumprod_prev', 'sqrt_alphas_cumprod_prev',
    'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod',
    'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod', 'posterior_variance',
    'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2',
    'timestep_map',
)


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f'{field}={value!r} is not valid; choose one of {", ".join(choices)}.')


@jax.tree_util.register_pytree_node_class
class GaussianDiffusion:
    """A Gaussian diffusion over T steps with its per-timestep constants (immutable pytree).

    The constants are computed once in float64 numpy from β and named as in the papers:
    betas, alphas_cumprod (ᾱ_t), alphas_cumprod_prev (ᾱ_{t-1}, 1 at t=0), alphas_cumprod_next,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod (1/√ᾱ_t), sqrt_recipm1_alphas_cumprod (√(1/ᾱ_t - 1)),
    posterior_variance (β̃_t), posterior_log_variance_clipped (log β̃_t with β̃_0 := β̃_1, since
    β̃_0 = 0), posterior_mean_coef1/2 (the x0 and x_t coefficients of μ̃_t), and timestep_map (the
    original timestep each step stands for, the identity unless respaced; the model sees these).
    They are the pytree's leaves, so a diffusion can be passed through jit; under jit they are
    computed in the precision JAX runs at (float32 unless x64 is enabled).

    Args:
      betas: [T] float array, each in (0, 1].
      model_mean_type: what the network's mean output predicts: 'eps', 'x0' or 'v'
        (v = √ᾱ_t ε - √(1-ᾱ_t) x0, Salimans & Ho 2022).
      model_var_type: 'fixed_small' (β̃_t), 'fixed_large' (β_t, with β̃_1 at t=0 as Ho et al.),
        'learned' (the network outputs log σ²) or 'learned_range' (Nichol & Dhariwal eq. 15:
        σ² = exp(u log β_t + (1-u) log β̃_t) with u = (v+1)/2).
      loss_type: 'mse' (L_simple), 'kl' (L_t in bits/dim), 'rescaled_kl' (T·L_t: an unbiased
        estimate of L_vlb) or 'hybrid' (L_simple + λ L_vlb, λ = 0.001, mean frozen in L_vlb).
    """

    def __init__(self, betas, model_mean_type: str = 'eps', model_var_type: str = 'fixed_large',
                 loss_type: str = 'mse', *, timestep_map=None):
        _check_choice('model_mean_type', model_mean_type, MEAN_TYPES)
        _check_choice('model_var_type', model_var_type, VAR_TYPES)
        _check_choice('loss_type', loss_type, LOSS_TYPES)
        learned = model_var_type in ('learned', 'learned_range')
        if loss_type == 'mse' and learned:
            raise ValueError(f"loss_type='mse' with model_var_type={model_var_type!r} leaves the "
                             "variance untrained; use loss_type='hybrid' (or 'kl'/'rescaled_kl').")
        if loss_type == 'hybrid' and not learned:
            raise ValueError("loss_type='hybrid' trains the variance through L_vlb, so it needs "
                             "model_var_type='learned' or 'learned_range'; use 'mse' for a fixed "
                             'variance.')
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError('betas must lie in (0, 1]; see diffusion_jax.schedules.')
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.num_timesteps = int(betas.shape[0])
        for name, value in _compute_constants(betas).items():
            object.__setattr__(self, name, value)
        tmap = np.arange(self.num_timesteps) if timestep_map is None else timestep_map
        object.__setattr__(self, 'timestep_map', np.asarray(tmap, dtype=np.int32))
        object.__setattr__(self, '_frozen', True)

    def __setattr__(self, name, value):
        if getattr(self, '_frozen', False):
            raise AttributeError('GaussianDiffusion is immutable; build a new one instead.')
        object.__setattr__(self, name, value)

    # -- pytree protocol: the constants are leaves, the type strings and T static --------------
    def tree_flatten(self):
        leaves = tuple(getattr(self, n) for n in _CONSTANTS)
        aux = (self.model_mean_type, self.model_var_type, self.loss_type, self.num_timesteps)
        return leaves, aux

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = object.__new__(cls)
        for name, value in zip(('model_mean_type', 'model_var_type', 'loss_type', 'num_timesteps'),
                               aux):
            object.__setattr__(obj, name, value)
        for name, value in zip(_CONSTANTS, leaves):
            object.__setattr__(obj, name, value)
        object.__setattr__(obj, '_frozen', True)
        return obj

    def __repr__(self):
        return (f'GaussianDiffusion(T={self.num_timesteps}, mean={self.model_mean_type}, '
                f'var={self.model_var_type}, loss={self.loss_type})')

    def replace(self, **kwargs) -> 'GaussianDiffusion':
        """A copy with other model_mean_type / model_var_type / loss_type."""
        args = dict(model_mean_type=self.model_mean_type, model_var_type=self.model_var_type,
                    loss_type=self.loss_type)
        args.update(kwargs)
        return GaussianDiffusion(np.asarray(self.betas), timestep_map=self.timestep_map, **args)

    @property
    def learns_variance(self) -> bool:
        return self.model_var_type in ('learned', 'learned_range')

    def _c(self, name: str, t, x):
        return _extract(getattr(self, name), t, x.shape, x.dtype)

    def _check_t(self, x, t):
        chex.assert_shape(t, (x.shape[0],))
        chex.assert_type(t, int)

    # -- forward process ------------------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I): returns (mean, variance, log_variance)."""
        self._check_t(x0, t)
        mean = self._c('sqrt_alphas_cumprod', t, x0) * x0
        variance = jnp.broadcast_to(self._c('one_minus_alphas_cumprod', t, x0), x0.shape)
        log_variance = jnp.broadcast_to(self._c('log_one_minus_alphas_cumprod', t, x0), x0.shape)
        return mean, variance, log_variance

    def q_sample(self, x0, t, noise):
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4 reparameterised)."""
        self._check_t(x0, t)
        chex.assert_equal_shape([x0, noise])
        return (self._c('sqrt_alphas_cumprod', t, x0) * x0
                + self._c('sqrt_one_minus_alphas_cumprod', t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I): returns (mean, variance, log_variance_clipped)."""
        self._check_t(x0, t)
        chex.assert_equal_shape([x0, x_t])
        mean = self._c('posterior_mean_coef1', t, x0) * x0 + self._c('posterior_mean_coef2', t,
                                                                      x0) * x_t
        variance = jnp.broadcast_to(self._c('posterior_variance', t, x0), x0.shape)
        log_variance = jnp.broadcast_to(self._c('posterior_log_variance_clipped', t, x0), x0.shape)
        return mean, variance, log_variance

    # -- conversions between ε, x0, v --------------------------------------------------------
    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t = x_t/√ᾱ_t - √(1/ᾱ_t - 1) ε."""
        return (self._c('sqrt_recip_alphas_cumprod', t, x_t) * x_t
                - self._c('sqrt_recipm1_alphas_cumprod', t, x_t) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        """ε = (x_t - √ᾱ_t x_0)/√(1-ᾱ_t) (= (x_t/√ᾱ_t - x_0)/√(1/ᾱ_t - 1) where ᾱ_t > 0).

        Written without 1/√ᾱ_t so it stays finite at ᾱ_T = 0 (a zero-terminal-SNR schedule);
        1 - ᾱ_t > 0 at every t since β_1 > 0.
        """
        return ((x_t - self._c('sqrt_alphas_cumprod', t, x_t) * x0)
                / self._c('sqrt_one_minus_alphas_cumprod', t, x_t))

    def predict_v(self, x0, t, eps):
        """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022)."""
        return (self._c('sqrt_alphas_cumprod', t, x0) * eps
                - self._c('sqrt_one_minus_alphas_cumprod', t, x0) * x0)

    def predict_x0_from_v(self, x_t, t, v):
        """x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v."""
        return (self._c('sqrt_alphas_cumprod', t, x_t) * x_t
                - self._c('sqrt_one_minus_alphas_cumprod', t, x_t) * v)

    def predict_eps_from_v(self, x_t, t, v):
        """ε = √(1-ᾱ_t) x_t + √ᾱ_t v."""
        return (self._c('sqrt_one_minus_alphas_cumprod', t, x_t) * x_t
                + self._c('sqrt_alphas_cumprod', t, x_t) * v)

    def snr(self, t):
        """Signal-to-noise ratio SNR_t = ᾱ_t/(1-ᾱ_t) [shape of t], float32, from the float64
        table (min-SNR-γ weighting, Hang et al. 2023; 0 at a zero-terminal-SNR level)."""
        abar = np.asarray(self.alphas_cumprod, np.float64)
        return jnp.asarray(abar / (1.0 - abar), jnp.float32)[t]

    def score_from_eps(self, x_t, t, eps):
        """∇_x log q(x_t) ≈ -ε_θ(x_t, t)/√(1-ᾱ_t) (the NCSN connection; survey eq. of the score)."""
        return -eps / self._c('sqrt_one_minus_alphas_cumprod', t, x_t)

    # -- reverse process p_θ(x_{t-1} | x_t) --------------------------------------------------
    def split_model_output(self, model_output, x_t):
        """(mean_output [B, ..., C], variance_output [B, ..., C] or None) of a network output."""
        if self.learns_variance:
            c = x_t.shape[-1]
            chex.assert_shape(model_output, x_t.shape[:-1] + (2 * c,))
            return model_output[..., :c], model_output[..., c:]
        chex.assert_equal_shape([model_output, x_t])
        return model_output, None

    def model_variance(self, var_output, x_t, t):
        """(variance, log_variance) of p_θ(x_{t-1}|x_t), broadcast to x_t's shape."""
        if self.model_var_type == 'learned':
            log_variance = var_output.astype(x_t.dtype)
        elif self.model_var_type == 'learned_range':
            min_log = self._c('posterior_log_variance_clipped', t, x_t)
            max_log = _extract(np.log(self.betas) if isinstance(self.betas, np.ndarray)
                               else jnp.log(self.betas), t, x_t.shape, x_t.dtype)
            frac = (var_output.astype(x_t.dtype) + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self.model_var_type == 'fixed_large':
            log_variance = _extract(self._fixed_large_log_variance(), t, x_t.shape, x_t.dtype)
        else:
            log_variance = self._c('posterior_log_variance_clipped', t, x_t)
        log_variance = jnp.broadcast_to(log_variance, x_t.shape)
        return jnp.exp(log_variance), log_variance

    def _fixed_large_log_variance(self):
        # β_t, except at t = 0 where Ho et al. use β̃_1 for a better decoder likelihood.
        xp = np if isinstance(self.betas, np.ndarray) else jnp
        if self.betas.shape[0] == 1:  # a one-step chain (e.g. 'trailing1'): no β̃_1 exists
            return xp.log(self.betas)
        variance = xp.concatenate([self.posterior_variance[1:2], self.betas[1:]])
        return xp.log(variance)

    def pred_x0_from_output(self, mean_output, x_t, t):
        """x̂_0 from the network's mean output, whatever it predicts."""
        if self.model_mean_type == 'eps':
            return self.predict_x0_from_eps(x_t, t, mean_output)
        if self.model_mean_type == 'v':
            return self.predict_x0_from_v(x_t, t, mean_output)
        return mean_output

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None):
        """p_θ(x_{t-1} | x_t) = N(μ̃_t(x̂_0, x_t), σ_t² I) with x̂_0 from the network.

        The mean is the posterior mean at the predicted x̂_0 (DDPM eq. 7 with x_0 := x̂_0, which for
        ε-prediction equals eq. 11). x̂_0 is clipped to [-1, 1] when clip_denoised.

        `variance` at t = 0 differs from improved-diffusion's for 'fixed_small': theirs is the
        exact posterior variance β̃_0 = 0, ours exp(log_variance) = β̃_1 (the clipped value).
        `log_variance` is the same in both (log β̃_1, since log 0 = -∞ is unusable). The bound,
        the decoder and the ancestral step read only log_variance (no noise is added at t = 0),
        so they agree; the one reader of `variance` is classifier guidance's mean shift
        μ + σ²∇log p(y|x_t), which at t = 0 moves x_0 by β̃_1·∇ here and not at all there (β̃_1 is
        ~1e-5 of the data scale for T = 1000). Ours keeps variance = exp(log_variance) so that the
        two fields never disagree. For the other variance types both return exp(log_variance).

        Args:
          model_output: [B, ..., C] or [B, ..., 2C] (learned variance).
          x_t: [B, ..., C]; t: [B] int32.
        Returns:
          dict(mean, variance, log_variance, pred_x0), each of x_t's shape.
        """
        self._check_t(x_t, t)
        mean_output, var_output = self.split_model_output(model_output, x_t)
        mean_output = mean_output.astype(x_t.dtype)
        variance, log_variance = self.model_variance(var_output, x_t, t)
        pred_x0 = self.pred_x0_from_output(mean_output, x_t, t)
        if denoised_fn is not None:
            pred_x0 = denoised_fn(pred_x0)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)

    # -- the DDIM encoding step (the samplers' steps live in diffusion_jax.samplers) -------
    def ddim_reverse_sample(self, model_output, x_t, t, clip_denoised: bool = True):
        """Deterministic DDIM encoding step t -> t+1 (the ODE run forward, η = 0):
        x_{t+1} = √ᾱ_{t+1} x̂_0 + √(1-ᾱ_{t+1}) ε̂."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_x0(x_t, t, out['pred_x0'])
        abar_next = self._c('alphas_cumprod_next', t, x_t)
        sample = out['pred_x0'] * jnp.sqrt(abar_next) + jnp.sqrt(1.0 - abar_next) * eps
        return dict(sample=sample, pred_x0=out['pred_x0'])

    def respace(self, use_timesteps) -> 'GaussianDiffusion':
        """The diffusion restricted to the kept timesteps (Nichol & Dhariwal 2021, Sec. 4).

        β is recomputed from ᾱ so the marginals q(x_t|x_0) at the kept steps are unchanged:
        β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}}. The new timestep_map sends step k to the original timestep
        the model was trained on. See diffusion_jax.respace.space_timesteps for the step sets.
        """
        kept = sorted(set(int(t) for t in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f'use_timesteps must be a non-empty set of ints in [0, '
                             f'{self.num_timesteps}); got {sorted(use_timesteps)[:5]}….')
        betas = respace_lib.respaced_betas(np.asarray(self.alphas_cumprod, np.float64),
                                           np.asarray(self.betas, np.float64), kept)
        return GaussianDiffusion(betas, self.model_mean_type, self.model_var_type,
                                 self.loss_type, timestep_map=np.asarray(self.timestep_map)[kept])

    def model_time(self, t):
        """The time input the network was trained with for (respaced) step t: timestep_map[t],
        the original integer timestep. [B] int32 -> [B] int32. (A continuous-time process
        defines its own, e.g. EDM's c_noise(σ); wrap_model reads it from the process.)"""
        return jnp.asarray(self.timestep_map)[t]

    # -- the variational bound ----------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x0, x_t, t, clip_denoised: bool = False):
        """The bound's term at t, in bits/dim: L_0 = -log p(x_0|x_1) (discretized decoder) at
        t = 0, L_t = KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) otherwise.

        Returns dict(output=[B] bits/dim, pred_x0=x0's shape).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out['mean'], log_scales=0.5 * out['log_variance']))
        output = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
        return dict(output=output, pred_x0=out['pred_x0'])

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T|x_0) ‖ N(0, I)) in bits/dim: [B]. Not trained; ≈ 0 for a good schedule."""
        t = jnp.full((x0.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

    def model_target(self, x0, t, noise):
        """What the mean output regresses on under L_simple: ε, x_0 or v."""
        if self.model_mean_type == 'eps':
            return noise
        if self.model_mean_type == 'v':
            return self.predict_v(x0, t, noise)
        return x0

    def training_losses(self, model_fn: ModelFn, x0, t, noise):
        """Per-example training loss for the configured loss_type.

        mse:          L_simple = ‖target - output‖² averaged over dims (DDPM eq. 14).
        kl:           L_t in bits/dim (the bound's term for the sampled t; decoder NLL at t=0).
        rescaled_kl:  T·L_t, an unbiased single-sample estimate of the whole L_vlb (minus L_T).
        hybrid:       L_simple + λ·T·L_t with λ = 0.001 and the mean output frozen in L_t, so the
                      bound trains only the variance (Nichol & Dhariwal Sec. 3.1).

        Args:
          model_fn: (x_t, timesteps) -> output; it receives the original (un-respaced) timesteps.
          x0, noise: [B, ...]; t: [B] int32.
        Returns:
          dict(loss=[B], plus mse=[B] and/or vb=[B] where they apply).
        """
        self._check_t(x0, t)
        x_t = self.q_sample(x0, t, noise)
        model_output = wrap_model(model_fn, self)(x_t, t)
        terms = {}
        if self.loss_type in ('kl', 'rescaled_kl'):
            vb = self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=False)['output']
            terms['vb'] = vb
            terms['loss'] = vb * self.num_timesteps if self.loss_type == 'rescaled_kl' else vb
            return terms
        mean_output, var_output = self.split_model_output(model_output, x_t)
        target = self.model_target(x0, t, noise)
        terms['mse'] = mean_flat(jnp.square(target - mean_output.astype(target.dtype)))
        terms['loss'] = terms['mse']
        if self.loss_type == 'hybrid':
            frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)['output']
            terms['vb'] = vb * (self.num_timesteps * HYBRID_VLB_WEIGHT)
            terms['loss'] = terms['mse'] + terms['vb']
        return terms

    def calc_bpd_loop(self, model_fn: ModelFn, x0, rng, clip_denoised: bool = True):
        """The full variational bound, every term, for a batch (DDPM Table 1's NLL).

        Runs t = T-1, …, 0 in a lax.scan (one model evaluation per step, constant memory), with a
        fresh q(x_t|x_0) sample per t.

        Returns:
          dict(total_bpd=[B] = Σ_t vb + prior_bpd, prior_bpd=[B], vb=[B, T] (L_t per t in bits/dim,
          L_0 at t=0), xstart_mse=[B, T] (‖x̂_0 - x_0‖²), mse=[B, T] (‖ε̂ - ε‖²)).
        """
        batch = x0.shape[0]

        def step(carry, t_scalar):
            t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
            noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            model_output = wrap_model(model_fn, self)(x_t, t)
            out = self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=clip_denoised)
            eps = self.predict_eps_from_x0(x_t, t, out['pred_x0'])
            return carry, (out['output'], mean_flat(jnp.square(out['pred_x0'] - x0)),
                           mean_flat(jnp.square(eps - noise)))

        ts = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
        _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, ts)
        # Scanned from t = T-1 down: flip to index by t, then move the batch axis first.
        vb, xstart_mse, mse = (jnp.flip(a, axis=0).T for a in (vb, xstart_mse, mse))
        prior = self.prior_bpd(x0)
        return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb,
                    xstart_mse=xstart_mse, mse=mse)


def _compute_constants(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-timestep constant, in float64, from β (shape [T] each)."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    # 1 - ᾱ_t = -expm1(Σ log α): exact where ᾱ_t is close to 1.
    # (β = 1, e.g. a zero-terminal-SNR schedule's last step, gives log1p(-1) = -inf and 1 - ᾱ = 1.)
    with np.errstate(divide='ignore'):
        one_minus_abar = -np.expm1(np.cumsum(np.log1p(-betas)))
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    one_minus_abar_prev = np.append(0.0, one_minus_abar[:-1])
    posterior_variance = betas * one_minus_abar_prev / one_minus_abar
    # β̃_0 = 0, so the log is clipped to β̃_1 at t = 0 (the decoder's variance there is learned or
    # set separately).
    with np.errstate(divide='ignore', invalid='ignore'):
        safe = np.append(posterior_variance[1], posterior_variance[1:]) if betas.size > 1 \
            else np.maximum(posterior_variance, 1e-20)
        return dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            one_minus_alphas_cumprod=one_minus_abar,
            one_minus_alphas_cumprod_prev=one_minus_abar_prev,
            sqrt_alphas_cumprod_prev=np.sqrt(alphas_cumprod_prev),
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
            log_one_minus_alphas_cumprod=np.log(one_minus_abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus_abar / alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(safe),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus_abar,
            posterior_mean_coef2=one_minus_abar_prev * np.sqrt(alphas) / one_minus_abar,
        )


def create_diffusion(config) -> GaussianDiffusion:
    """A GaussianDiffusion from a config's `diffusion` section (ml_collections.ConfigDict).

    Fields: beta_schedule, num_timesteps, model_mean_type, model_var_type, loss_type and optional
    schedule options (beta_start, beta_end, cosine_s, rescale_zero_terminal_snr: Lin et al. 2023's
    rescale to ᾱ_T = 0, which needs model_mean_type 'v' or 'x0').
    """
    from diffusion_jax import schedules  # pylint: disable=import-outside-toplevel
    kwargs = {}
    for field, key in (('beta_start', 'beta_start'), ('beta_end', 'beta_end'), ('cosine_s', 's')):
        if field in config and config[field] is not None:
            kwargs[key] = config[field]
    betas = schedules.get_beta_schedule(config.beta_schedule, config.num_timesteps, **kwargs)
    if config.get('rescale_zero_terminal_snr', False):
        if config.model_mean_type == 'eps':
            # At ᾱ_T = 0, x̂_0 = (x_T - √(1-ᾱ_T) ε̂)/√ᾱ_T divides by zero (Lin et al. 2023, 3.2).
            raise ValueError("diffusion.rescale_zero_terminal_snr=True with diffusion.model_mean_type"
                             "='eps': at ᾱ_T = 0 an ε-model cannot predict x_0; use "
                             "model_mean_type='v' (Lin et al. 2023) or 'x0'.")
        betas = schedules.rescale_zero_terminal_snr(betas)
    return GaussianDiffusion(betas, config.model_mean_type, config.model_var_type,
                             config.loss_type)
