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
diffusion_jax.models.layers). For text the condition is a context dict {'context': [B, L, D],
'mask': [B, L]} (models.unet) and ∅ is the empty prompt's context (a negative prompt's, when
one is given, as the Stable Diffusion pipelines do); training drops captions to it with
`drop_condition` (the caption dropout of latent diffusion).

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


def with_self_cond(x_t, self_cond):
    """The network input of a self-conditioned model (Chen et al. 2022, "Analog Bits"):
    [x_t, x̂_0] concatenated on the last (channel) axis, [B, ..., 2C]; x_t itself when
    self_cond is None (a model trained without it)."""
    if self_cond is None:
        return x_t
    return jnp.concatenate([x_t, self_cond.astype(x_t.dtype)], axis=-1)


def _apply_with_label(model_apply, variables, y, x_t, t, self_cond=None):
    x_t = with_self_cond(x_t, self_cond)
    if y is None:
        return model_apply(variables, x_t, t)
    return model_apply(variables, x_t, t, y=_batched(y, x_t.shape[0]))


def as_condition(y):
    """Labels [B] as int32, or a context dict {'context', 'mask'} (entries None dropped)."""
    if isinstance(y, dict):
        unknown = sorted(set(y) - {'context', 'mask'})
        if unknown or y.get('context') is None:
            raise ValueError(f"a context condition needs the keys 'context' [B, L, D] and "
                             f"optionally 'mask' [B, L]; got {sorted(y)}.")
        return {k: jnp.asarray(v) for k, v in y.items() if v is not None}
    return jnp.asarray(y, jnp.int32)


def _batched(y, batch: int):
    """A context dict with batch 1 (one prompt for every sample) broadcast to `batch` rows."""
    if not isinstance(y, dict):
        return y
    return {k: jnp.broadcast_to(v, (batch,) + v.shape[1:]) if v.shape[0] == 1 else v
            for k, v in y.items()}


def drop_condition(rng, y, null, rate):
    """Caption (or label) dropout for classifier-free guidance training: each example's
    condition is replaced by the null condition ∅ with probability `rate`.

    y: labels [B] (null: the null label, an int) or a context dict (null: the empty prompt's
    context dict with batch 1 or B, the same keys; its context length must match y's).
    Returns (the condition with dropped rows, drop [B] bool).
    """
    y = as_condition(y)
    first = y['context'] if isinstance(y, dict) else y
    drop = jax.random.bernoulli(rng, rate, (first.shape[0],))
    if not isinstance(y, dict):
        return jnp.where(drop, jnp.asarray(null, y.dtype), y), drop
    null = _batched(as_condition(null), first.shape[0])
    if set(null) != set(y):
        raise ValueError(f'the null condition has keys {sorted(null)}, the condition '
                         f'{sorted(y)}: give both a mask or neither.')
    pick = lambda a, b: jnp.where(drop.reshape((-1,) + (1,) * (a.ndim - 1)), b.astype(a.dtype), a)
    return {k: pick(y[k], null[k]) for k in y}, drop


def bind_model(model_apply: Callable, variables, y=None) -> Partial:
    """model_fn(x_t, t) = model_apply(variables, x_t, t[, y=y]) as a pytree.

    Prefer this to a lambda: the variables and labels stay jit arguments, so a jitted sampler is
    compiled once and reused for new parameters (a lambda is a new static object each time, and
    the compiled program would bake in its parameters as constants).
    """
    return Partial(_apply_with_label, model_apply, variables,
                   None if y is None else as_condition(y))


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
                           x_t, t, self_cond=None, interval_t=None):
    # Two calls rather than one on a doubled batch: on a mesh, concatenating two sharded batches
    # would reshuffle examples between devices; the FLOPs are the same.
    x_in = with_self_cond(x_t, self_cond)  # both calls see the same x̂_0 (the sampler's)
    batch = x_t.shape[0]
    null = (_batched(null_label, batch) if isinstance(y, dict)
            else jnp.full_like(y, null_label))
    cond = model_apply(variables, x_in, t, y=_batched(y, batch))
    uncond = model_apply(variables, x_in, t, y=null)
    return _combine(cond, uncond, w, rescale, interval, x_t, t, channels, interval_t)


def _combine(cond, uncond, w, rescale, interval, x_t, t, channels=0, interval_t=None):
    """(1 + w) cond - w uncond on the mean output, the variance channels (if any) cond's;
    channels > 0 guides only the first `channels` mean channels (DiT's partial guidance).
    interval_t: the network time input whose σ decides the guidance interval (a Heun step's
    first evaluation's, passed to both of its evaluations); None: t itself."""
    # Guide the mean output only: ε, x0 and v are all affine in one another at fixed (x_t, t), so
    # the guided combination means the same for each; a learned variance stays the conditional's.
    c = x_t.shape[-1]
    if interval is not None:  # w = 0 outside (lo, hi]: exactly the conditional output
        lo, hi, sigma_fn = interval
        sigma = sigma_fn(t if interval_t is None else interval_t)
        w = jnp.where((sigma > lo) & (sigma <= hi), w, 0.0).reshape((-1,) + (1,) * (x_t.ndim - 1))
    guided = (1.0 + w) * cond[..., :c] - w * uncond[..., :c]
    if rescale is not None:
        guided = _rescale(cond[..., :c], guided, rescale)
    if 0 < channels < c:  # DiT's partial guidance: channels k.. keep the conditional output
        guided = jnp.concatenate([guided[..., :channels], cond[..., channels:c]], axis=-1)
    return jnp.concatenate([guided, cond[..., c:]], axis=-1) if cond.shape[-1] > c else guided


def classifier_free_model_fn(model_apply: Callable, variables, y, w, null_label=None, *,
                             guidance_rescale=0.0, interval=None, uncond=None,
                             channels: int = 0) -> Partial:
    """ε̃(x_t, y) = (1 + w) ε(x_t, y) - w ε(x_t, ∅) (Ho & Salimans 2021, eq. 6) as a model_fn.

    Args:
      model_apply: (variables, x_t, t, y=labels) -> output, e.g. a UNet's `apply`.
      variables: the network's variables.
      y: [B] int labels in [0, num_classes), or a context dict {'context': [B or 1, L, D],
        'mask': [B or 1, L] (optional)} (batch 1: the same prompt for every sample).
      w: guidance weight; w = 0 is the conditional model, exactly.
      null_label: the label meaning "no class", num_classes for this project's networks
        (labels only).
      uncond: for a context y, the ∅ condition: the empty prompt's context dict (or a negative
        prompt's), batch 1 or B.
      guidance_rescale: φ of Lin et al. 2023 (eq. 15-16; they use 0.7): the guided output is
        rescaled to the conditional output's per-example std and mixed back with weight φ,
        against the over-exposure of large w. Applied to the network's mean output in its own
        parameterisation, as diffusers does. 0 (the default) is plain guidance, exactly.
      interval: (lo, hi, sigma_fn) or None: the guidance interval of Kynkäänniemi et al. 2024,
        w applied only where σ = sigma_fn(t) of the network's time input lies in (lo, hi], the
        conditional output elsewhere (per example; sigma_fn: a process's network_sigma(), σ in
        EDM units √((1-ᾱ)/ᾱ), t/(1-t), σ). The returned model_fn takes the keyword
        interval_t=t_in (a network time input): the interval is then decided at σ(t_in)
        instead of at its own t. The Heun samplers pass their step's first time input to both
        evaluations, so the interval is decided once per step from the step's current σ, as
        the reference code does (samplers pass it where `has_interval(model_fn)`).
      channels: guide only the first `channels` of the C mean-output channels (the rest stay
        the conditional output); 0 = all C. DiT's sampler guides 3 of the 4 SD-VAE latent
        channels (facebookresearch/DiT, models.py forward_with_cfg), which its FID-50K 2.27
        was measured with (sampling.guidance_channels=3).
    """
    rescale, interval = _options(guidance_rescale, interval)
    if int(channels) < 0:
        raise ValueError(f'sampling.guidance_channels={channels} must be >= 0 (0: every '
                         'channel; 3: DiT\'s sampler on SD-VAE latents).')
    if isinstance(y, dict):
        if uncond is None:
            raise ValueError('classifier-free guidance of a text condition needs uncond: the '
                             "empty prompt's (or sampling.negative_prompt's) context.")
        null = as_condition(uncond)
    elif null_label is None:
        raise ValueError('classifier-free guidance of labels needs null_label (num_classes).')
    else:
        null = int(null_label)
    return Partial(_classifier_free_apply, model_apply, variables, as_condition(y),
                   jnp.asarray(w, jnp.float32), null, rescale, interval, int(channels))


def _options(guidance_rescale, interval):
    """(φ as a float32 leaf or None, the interval with float32 bounds or None), validated."""
    rescale = float(guidance_rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f'sampling.guidance_rescale={guidance_rescale} must lie in [0, 1] '
                         '(Lin et al. 2023 use 0.7; 0 turns it off).')
    if interval is not None:
        lo, hi, sigma_fn = interval
        if not 0.0 <= float(lo) < float(hi):
            raise ValueError(f"sampling.guidance_interval='{lo},{hi}' needs 0 <= lo < hi "
                             '(EDM2-XXL: 0.28,1.61).')
        interval = (jnp.float32(lo), jnp.float32(hi), sigma_fn)
    return (jnp.asarray(rescale, jnp.float32) if rescale else None), interval


def _autoguided_apply(model_fn, guide_fn, w, rescale, interval, x_t, t, self_cond=None,
                      interval_t=None):
    main = model_fn(x_t, t, self_cond=self_cond) if self_cond is not None else model_fn(x_t, t)
    weak = guide_fn(x_t, t, self_cond=self_cond) if self_cond is not None else guide_fn(x_t, t)
    return _combine(main, weak, w, rescale, interval, x_t, t, interval_t=interval_t)


def autoguidance_model_fn(model_fn, guide_fn, w, *, guidance_rescale=0.0,
                          interval=None) -> Partial:
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself", eq. 2): the model guided by a weaker model of the same kind, as a model_fn

        out = (1 + w) out(x_t, t) - w out_weak(x_t, t) = out_weak + (1 + w)(out - out_weak),

    on the network's mean output (for D the same: D is affine in the output with coefficients
    the two models share, so D̃ = D_weak + (1 + w)(D - D_weak)). w is this project's
    sampling.guidance_scale convention (classifier-free: (1 + w) ε_cond - w ε_uncond), so
    w = 0 is the model itself and Karras et al.'s weight is 1 + w.

    Args:
      model_fn, guide_fn: (x_t, t[, self_cond=]) -> output, e.g. bind_model(apply, params, y)
        of the main run and of the guide (an early checkpoint of the same run, or a smaller /
        shorter-trained run of the same process and data), both with the labels they take.
      w: guidance weight (a leaf: new w reuses the compilation).
      guidance_rescale, interval: as classifier_free_model_fn.
    """
    rescale, interval = _options(guidance_rescale, interval)
    return Partial(_autoguided_apply, model_fn, guide_fn, jnp.asarray(w, jnp.float32), rescale,
                   interval)


def has_interval(model_fn) -> bool:
    """Whether model_fn is a guided model (classifier_free_model_fn, autoguidance_model_fn)
    with a guidance interval, i.e. takes the keyword interval_t (the samplers' static check)."""
    func = getattr(model_fn, 'func', None)
    if func is _classifier_free_apply:
        return model_fn.args[6] is not None
    if func is _autoguided_apply:
        return model_fn.args[4] is not None
    return False


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
