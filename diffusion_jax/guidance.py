"""Guidance for class-conditional sampling: classifier guidance and classifier-free guidance.

Classifier guidance (Dhariwal & Nichol 2021) tilts the reverse process towards p_φ(y | x_t) with a
noisy-image classifier and a scale s:
    Algorithm 1 (ancestral):  μ ← μ + s Σ ∇_{x_t} log p_φ(y | x_t)
    Algorithm 2 (DDIM):       ε̂ ← ε̂ - s √(1-ᾱ_t) ∇_{x_t} log p_φ(y | x_t)
The two agree as score shifts: ∇ log p(x_t) = -ε/√(1-ᾱ_t) gains s ∇ log p_φ(y|x_t), so s = 1 with
an exact classifier and an exact ε samples p(x | y). The sampler applies the shift
(diffusion_jax.samplers); this module only packages the classifier gradient, the labels and s.

Classifier-free guidance (Ho & Salimans 2021) needs no classifier: one network trained with its
label dropped to a null label ∅ some of the time gives
    ε̃(x_t, y) = (1 + w) ε(x_t, y) - w ε(x_t, ∅),
which is a plain model function, so every sampler takes it unchanged (optionally with the
guidance rescale of Lin et al. 2023, `classifier_free_model_fn(guidance_rescale=φ)`). In this
project the null label is num_classes (the label table has num_classes + 1 rows;
diffusion_jax.models.layers).

Everything returned here is a pytree whose arrays (parameters, labels, scales) are leaves, so a
sampler jitted on it compiles once and is reused for new parameters, labels and scales.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

# grad_log_prob(x_t [B, ...], t_original [B] int32, y [B] int32) -> ∇_{x_t} log p(y | x_t) [B, ...]
GradLogProb = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance towards labels y with scale s (a pytree: all three fields are leaves
    or subtrees, so a Partial-wrapped classifier keeps its parameters dynamic under jit).

    Attributes:
      grad_log_prob: (x_t, t_original, y) -> ∇_{x_t} log p_φ(y | x_t); it receives the original
        (un-respaced) timesteps, as the classifier was trained on them.
      y: [B] int32 target labels.
      scale: scalar float32 s; s = 0 leaves the sampler unguided (to the last bit).
    """
    grad_log_prob: Any
    y: jax.Array
    scale: jax.Array

    def scaled_grad(self, x_t, t_original):
        """s ∇_{x_t} log p_φ(y | x_t): [B, ...] in x_t's dtype."""
        grad = self.grad_log_prob(x_t, t_original, self.y)
        return (self.scale * grad).astype(x_t.dtype)


def classifier_guidance(grad_log_prob: GradLogProb, y, scale) -> ClassifierGuidance:
    """Classifier guidance of scale s towards labels y [B] (Dhariwal & Nichol 2021, Alg. 1 and 2).

    grad_log_prob may be any function (an analytic one in tests) or the Partial returned by
    `classifier_grad_fn` for a trained Flax classifier.
    """
    return ClassifierGuidance(grad_log_prob, jnp.asarray(y, jnp.int32),
                              jnp.asarray(scale, jnp.float32))


def _flax_classifier_grad(model, variables, x_t, t, y):
    from diffusion_jax.models import classifier  # pylint: disable=import-outside-toplevel
    _, grad = classifier.classifier_log_prob_grad(model, variables, x_t, t, y)
    return grad


def classifier_grad_fn(model, variables) -> Partial:
    """∇_{x_t} log p_φ(y | x_t, t) of a Flax classifier (diffusion_jax.models.Classifier) as a
    grad_log_prob for `classifier_guidance`. The module is static, the variables a pytree leaf."""
    return Partial(_flax_classifier_grad, model, variables)


def _apply_with_label(model_apply, variables, y, x_t, t):
    if y is None:
        return model_apply(variables, x_t, t)
    return model_apply(variables, x_t, t, y=y)


def bind_model(model_apply: Callable, variables, y=None) -> Partial:
    """model_fn(x_t, t) = model_apply(variables, x_t, t[, y=y]) as a pytree.

    Prefer this to a lambda: the variables and labels stay jit arguments, so a jitted sampler is
    compiled once and reused for new parameters (a lambda is a new static object each time, and
    the compiled program would bake in its parameters as constants).
    """
    return Partial(_apply_with_label, model_apply, variables,
                   None if y is None else jnp.asarray(y, jnp.int32))


def _rescale(cond, guided, phi):
    """Lin et al. 2023, Sec. 3.4, eq. 15-16: x_rescaled = x_cfg σ(x_pos)/σ(x_cfg) per example
    (σ the std over every non-batch axis), x_final = φ x_rescaled + (1-φ) x_cfg."""
    axes = tuple(range(1, cond.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    # A constant output has σ = 0: leave it unscaled rather than divide by zero.
    ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
    return phi * (guided * ratio) + (1.0 - phi) * guided


def _classifier_free_apply(model_apply, variables, y, w, null_label, rescale, interval, channels,
                           x_t, t):
    # Two calls rather than one on a doubled batch: on a mesh, concatenating two sharded batches
    # would reshuffle examples between devices; the FLOPs are the same.
    cond = model_apply(variables, x_t, t, y=y)
    uncond = model_apply(variables, x_t, t, y=jnp.full_like(y, null_label))
    # Guide the mean output only: ε, x0 and v are all affine in one another at fixed (x_t, t), so
    # the guided combination means the same for each; a learned variance stays the conditional's.
    c = x_t.shape[-1]
    if interval is not None:  # w = 0 outside (lo, hi]: exactly the conditional output
        lo, hi, sigma_fn = interval
        sigma = sigma_fn(t)
        w = jnp.where((sigma > lo) & (sigma <= hi), w, 0.0).reshape((-1,) + (1,) * (x_t.ndim - 1))
    guided = (1.0 + w) * cond[..., :c] - w * uncond[..., :c]
    if rescale is not None:
        guided = _rescale(cond[..., :c], guided, rescale)
    if 0 < channels < c:  # DiT's partial guidance: channels k.. keep the conditional output
        guided = jnp.concatenate([guided[..., :channels], cond[..., channels:c]], axis=-1)
    return jnp.concatenate([guided, cond[..., c:]], axis=-1) if cond.shape[-1] > c else guided


def classifier_free_model_fn(model_apply: Callable, variables, y, w, null_label: int, *,
                             guidance_rescale=0.0, interval=None, channels: int = 0) -> Partial:
    """ε̃(x_t, y) = (1 + w) ε(x_t, y) - w ε(x_t, ∅) (Ho & Salimans 2021, eq. 6) as a model_fn.

    Args:
      model_apply: (variables, x_t, t, y=labels) -> output, e.g. a UNet's `apply`.
      variables: the network's variables.
      y: [B] int labels in [0, num_classes).
      w: guidance weight; w = 0 is the conditional model, exactly.
      null_label: the label meaning "no class", num_classes for this project's networks.
      guidance_rescale: φ of Lin et al. 2023 (eq. 15-16; they use 0.7): the guided output is
        rescaled to the conditional output's per-example std and mixed back with weight φ,
        against the over-exposure of large w. Applied to the network's mean output in its own
        parameterisation, as diffusers does. 0 (the default) is plain guidance, exactly.
      interval: (lo, hi, sigma_fn) or None: the guidance interval of Kynkäänniemi et al. 2024,
        w applied only where σ = sigma_fn(t) of the network's time input lies in (lo, hi], the
        conditional output elsewhere (per example; sigma_fn: a process's network_sigma(), σ in
        EDM units √((1-ᾱ)/ᾱ), t/(1-t), σ). It is decided per network evaluation: a Heun step
        whose two evaluations straddle a bound guides one of them (the reference code decides
        once per step).
      channels: guide only the first `channels` of the C mean-output channels (the rest stay
        the conditional output); 0 = all C. DiT's sampler guides 3 of the 4 SD-VAE latent
        channels (facebookresearch/DiT, models.py forward_with_cfg), which its FID-50K 2.27
        was measured with (sampling.guidance_channels=3).
    """
    rescale = float(guidance_rescale)
    if int(channels) < 0:
        raise ValueError(f'sampling.guidance_channels={channels} must be >= 0 (0: every '
                         'channel; 3: DiT\'s sampler on SD-VAE latents).')
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f'sampling.guidance_rescale={guidance_rescale} must lie in [0, 1] '
                         '(Lin et al. 2023 use 0.7; 0 turns it off).')
    if interval is not None:
        lo, hi, sigma_fn = interval
        if not 0.0 <= float(lo) < float(hi):
            raise ValueError(f"sampling.guidance_interval='{lo},{hi}' needs 0 <= lo < hi "
                             '(EDM2-XXL: 0.28,1.61).')
        interval = (jnp.float32(lo), jnp.float32(hi), sigma_fn)
    return Partial(_classifier_free_apply, model_apply, variables, jnp.asarray(y, jnp.int32),
                   jnp.asarray(w, jnp.float32), int(null_label),
                   jnp.asarray(rescale, jnp.float32) if rescale else None, interval,
                   int(channels))


def parse_guidance_interval(text) -> tuple[float, float] | None:
    """'lo,hi' -> (lo, hi) with 0 <= lo < hi (sampling.guidance_interval, Kynkäänniemi et al.
    2024); '' -> None. ValueError naming the field otherwise."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(','))
    except ValueError:
        raise ValueError(f'sampling.guidance_interval={text!r} is not \'lo,hi\' (two numbers, '
                         "e.g. '0.28,1.61'); '' turns it off.") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f'sampling.guidance_interval={text!r} needs 0 <= lo < hi '
                         "(e.g. '0.28,1.61').")
    return lo, hi
