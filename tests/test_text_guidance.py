"""Classifier-free guidance and caption dropout with a context condition ({'context', 'mask'}),
through the guidance layer and the samplers, on a model whose output is affine in the context."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance, samplers, schedules

B, L, D = 6, 4, 3


def model_apply(variables, x, t, y=None):
    """a·x + (masked mean of the context over L): affine in the context at a fixed mask."""
    ctx = y['context']
    mask = y.get('mask', jnp.ones(ctx.shape[:2]))
    m = jnp.sum(ctx * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
    return variables['a'] * x + m + 0.0 * t[:, None]


def contexts(seed=0):
    rng = np.random.default_rng(seed)
    cond = {'context': jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32),
            # the first token always kept (BOS), the others at random
            'mask': jnp.asarray(np.concatenate([np.ones((B, 1)),
                                                rng.integers(0, 2, size=(B, L - 1))], 1),
                                jnp.float32)}
    empty = {'context': jnp.asarray(rng.normal(size=(1, L, D)), jnp.float32),
             'mask': jnp.ones((1, L))}
    return cond, empty


VARS = {'a': jnp.float32(0.7)}


def test_cfg_with_context_is_the_guided_combination():
    cond, empty = contexts()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
    t = jnp.arange(B)
    w = 2.5
    fn = guidance.classifier_free_model_fn(model_apply, VARS, cond, w, uncond=empty)
    full_empty = {k: jnp.broadcast_to(v, (B,) + v.shape[1:]) for k, v in empty.items()}
    want = (1 + w) * model_apply(VARS, x, t, cond) - w * model_apply(VARS, x, t, full_empty)
    np.testing.assert_allclose(fn(x, t), want, rtol=1e-6, atol=1e-6)
    zero = guidance.classifier_free_model_fn(model_apply, VARS, cond, 0.0, uncond=empty)
    np.testing.assert_array_equal(zero(x, t), model_apply(VARS, x, t, cond))
    # One prompt (batch 1) for every sample = that prompt repeated.
    one = {k: v[:1] for k, v in cond.items()}
    rep = {k: jnp.repeat(v, B, 0) for k, v in one.items()}
    np.testing.assert_array_equal(
        guidance.classifier_free_model_fn(model_apply, VARS, one, w, uncond=empty)(x, t),
        guidance.classifier_free_model_fn(model_apply, VARS, rep, w, uncond=empty)(x, t))
    with pytest.raises(ValueError, match='needs uncond'):
        guidance.classifier_free_model_fn(model_apply, VARS, cond, w)


@pytest.mark.parametrize('method', ['ddim', 'dpmpp_2m'])
def test_samplers_take_a_guided_context(method):
    """CFG over an affine-in-context model = the plain model at the context (1+w)c - w·∅, so
    both must sample the same chain (to float rounding)."""
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 100), 'eps', 'fixed_small')
    rng = np.random.default_rng(2)
    cond = {'context': jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)}
    neg = {'context': jnp.asarray(rng.normal(size=(1, L, D)), jnp.float32)}
    w = 3.0
    guided = guidance.classifier_free_model_fn(model_apply, VARS, cond, w, uncond=neg)
    mixed = {'context': (1 + w) * cond['context'] - w * neg['context']}
    plain = guidance.bind_model(model_apply, VARS, mixed)
    kw = dict(method=method, clip_denoised=False)
    a = samplers.sample(d, guided, jax.random.key(0), (B, D), **kw)['samples']
    b = samplers.sample(d, plain, jax.random.key(0), (B, D), **kw)['samples']
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(a - samplers.sample(
        d, guidance.bind_model(model_apply, VARS, cond), jax.random.key(0), (B, D),
        **kw)['samples']))) > 1e-2  # guidance changes the samples


def test_drop_condition_replaces_whole_rows_at_the_rate():
    cond, empty = contexts()
    big = {k: jnp.tile(v, (500, 1, 1)[:v.ndim]) for k, v in cond.items()}   # 3000 rows
    out, drop = guidance.drop_condition(jax.random.key(0), big, empty, 0.2)
    n = drop.shape[0]
    rate = float(jnp.mean(drop))
    assert abs(rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n), rate   # Monte Carlo, 4σ
    for k in big:
        dropped = np.asarray(out[k])[np.asarray(drop)]
        kept = np.asarray(out[k])[~np.asarray(drop)]
        np.testing.assert_array_equal(dropped, np.broadcast_to(empty[k], dropped.shape))
        np.testing.assert_array_equal(kept, np.asarray(big[k])[~np.asarray(drop)])
    same, none = guidance.drop_condition(jax.random.key(1), cond, empty, 0.0)
    assert not bool(jnp.any(none))
    np.testing.assert_array_equal(same['context'], cond['context'])
    labels, drop = guidance.drop_condition(jax.random.key(2), jnp.arange(B), 10, 1.0)
    np.testing.assert_array_equal(labels, np.full(B, 10))
    with pytest.raises(ValueError, match='both a mask or neither'):
        guidance.drop_condition(jax.random.key(0), cond, {'context': empty['context']}, 0.5)
