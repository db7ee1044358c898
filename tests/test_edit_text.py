"""Edits with a text condition: the cond pytree {'context': [B, L, D], 'mask': [B, L]} bound into
model_fn as the samplers take it (guidance.bind_model / classifier_free_model_fn with the empty
prompt's context as ∅), on a tiny cross-attention UNet with perturbed random weights. A DDIM
edit to another prompt is the samplers' path (their inversion, then their η = 0 DDIM decode with
the guided prompt); the context's mask reaches the edit (masked tokens change nothing, kept
ones do); SDEdit with a context on a flow process is the process sampler's path."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance, models, processes, respace, samplers, schedules
from diffusion_jax.samplers import process_solvers

pytestmark = pytest.mark.usefixtures('fast_compiles')

B, CTX_LEN, CTX_DIM = 4, 5, 12
TEXT_UNET = dict(name='unet', image_size=8, in_channels=2, out_channels=2, ch=16, ch_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), num_groups=4, num_heads=(1, 2),
                 context_dim=CTX_DIM, transformer_depth=1)


@pytest.fixture(scope='module')
def unet():
    model = models.get_model(TEXT_UNET)
    variables = models.init_params(model, jax.random.key(0))
    leaves, tree = jax.tree.flatten(variables)  # zero-initialised outputs: perturb every leaf
    rng = np.random.default_rng(1)
    variables = jax.tree.unflatten(tree, [v + 0.2 * rng.normal(size=v.shape).astype(np.float32)
                                          for v in leaves])
    return model, variables


def _cond(seed):
    rng = np.random.default_rng(seed)
    return {'context': jnp.asarray(rng.normal(size=(B, CTX_LEN, CTX_DIM)), jnp.float32),
            'mask': jnp.asarray(np.concatenate([np.ones((B, 2)), np.zeros((B, 3))], 1),
                                jnp.float32)}


X = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (B, 8, 8, 2)), jnp.float32)
CHAIN = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 100), 'eps',
                             'fixed_small').respace(respace.space_timesteps(100, 'ddim10'))


def test_ddim_edit_with_a_context_is_the_samplers_path(unet):
    model, v = unet
    source, target = _cond(0), _cond(1)
    empty = {'context': jnp.zeros((1, CTX_LEN, CTX_DIM)), 'mask': jnp.ones((1, CTX_LEN))}
    src_fn = guidance.bind_model(model.apply, v, source)
    tgt_fn = guidance.classifier_free_model_fn(model.apply, v, target, 2.0, uncond=empty)
    out = samplers.ddim_edit(CHAIN, src_fn, X, edit_model_fn=tgt_fn)
    codes = samplers.ddim_encode(CHAIN, src_fn, X)
    np.testing.assert_allclose(out['codes'], codes, atol=1e-5)
    decode = lambda fn: samplers.sample(CHAIN, fn, jax.random.key(5), X.shape,  # noqa: E731
                                        method='ddim', eta=0.0, clip_denoised=False,
                                        x_T=codes)['samples']
    np.testing.assert_allclose(out['edited'], decode(tgt_fn), atol=1e-5)
    np.testing.assert_allclose(out['reconstruction'], decode(src_fn), atol=1e-5)
    # The prompt is read: another target context moves the edit; tokens its mask drops do not.
    assert float(jnp.max(jnp.abs(out['edited'] - out['reconstruction']))) > 1e-2
    dropped = dict(target, context=target['context'].at[:, 2:].add(5.0))
    same = samplers.ddim_edit(CHAIN, src_fn, X, edit_model_fn=guidance.classifier_free_model_fn(
        model.apply, v, dropped, 2.0, uncond=empty))
    np.testing.assert_allclose(same['edited'], out['edited'], atol=1e-5)
    kept = dict(target, context=target['context'].at[:, :2].add(1.0))
    moved = samplers.ddim_edit(CHAIN, src_fn, X, edit_model_fn=guidance.classifier_free_model_fn(
        model.apply, v, kept, 2.0, uncond=empty))
    assert float(jnp.max(jnp.abs(moved['edited'] - out['edited']))) > 1e-2


def test_sdedit_with_a_context_on_flow_is_the_process_samplers_path(unet):
    model, v = unet
    flow = processes.FlowMatching()
    fn = guidance.bind_model(model.apply, v, _cond(2))
    key = jax.random.key(3)
    out = samplers.sdedit(flow, fn, key, X, 0.5, num_steps=8, method='euler',
                          clip_denoised=False)
    k_noise, k_chain = jax.random.split(key)
    grid = flow.time_grid(8)[4:]  # j0 = K - ceil(0.5 K) = 4
    t0 = float(grid[0])
    x_t = (1 - t0) * X + t0 * jax.random.normal(k_noise, X.shape, jnp.float32)
    want = process_solvers.sample(flow, fn, k_chain, X.shape, method='euler', num_steps=4,
                                  x_T=x_t, grid=grid)['samples']
    np.testing.assert_allclose(out, want, atol=1e-5)
    other = samplers.sdedit(flow, guidance.bind_model(model.apply, v, _cond(3)), key, X, 0.5,
                            num_steps=8, method='euler', clip_denoised=False)
    assert float(jnp.max(jnp.abs(other - out))) > 1e-2
