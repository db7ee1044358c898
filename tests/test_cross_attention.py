"""Latent diffusion's spatial transformer against diffusers' Transformer2DModel with random
weights (tiny), and the UNet's text conditioning: cond = {'context', 'mask'} where labels go."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import convert, models
from diffusion_jax.convert import tables
from diffusion_jax.models import layers

import torch  # noqa: E402  (the test extra installs it)
import diffusers  # noqa: E402  (the test extra installs it)

C, HEADS, DEPTH, GROUPS, CTX_DIM, CTX_LEN = 16, 2, 2, 4, 12, 5
RTOL = 1e-4


def params_from_table(entries, state):
    params = {}
    for e in entries:
        arrays = [state[k].detach().float().numpy() for k in e.sources]
        node = params
        for part in e.path[:-1]:
            node = node.setdefault(part, {})
        node[e.path[-1]] = e.transform.to_ours(*arrays)
    used = {k for e in entries for k in e.sources}
    assert used == set(state), set(state) ^ used  # the table covers the reference exactly
    return params


def rel_err(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize('linear,with_mask', [(False, False), (True, True)])
def test_spatial_transformer_equals_diffusers(linear, with_mask):
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(num_attention_heads=HEADS, attention_head_dim=C // HEADS,
                                       in_channels=C, num_layers=DEPTH, norm_num_groups=GROUPS,
                                       cross_attention_dim=CTX_DIM,
                                       use_linear_projection=linear).eval()
    with torch.no_grad():  # norms start at 1/0: randomise every parameter so the test sees it
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, C)).astype(np.float32)
    ctx = rng.normal(size=(2, CTX_LEN, CTX_DIM)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32) if with_mask else None
    with torch.no_grad():
        out_t = ref(torch.tensor(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.tensor(ctx),
                    encoder_attention_mask=None if mask is None else torch.tensor(mask),
                    return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    params = params_from_table(tables.diffusers_spatial_transformer('', 'st', DEPTH, linear),
                               {'.' + k: v for k, v in ref.state_dict().items()})
    block = layers.SpatialTransformer(HEADS, DEPTH, GROUPS)
    out = block.apply({'params': params['st']}, x, ctx, mask)
    assert rel_err(out, out_t) <= RTOL, rel_err(out, out_t)
    # The block really reads the context (and, masked, ignores the dropped tokens).
    ctx2 = ctx.copy()
    ctx2[0, 3:] += 5.0
    out2 = block.apply({'params': params['st']}, x, ctx2, mask)
    changed = float(np.max(np.abs(np.asarray(out2[0]) - np.asarray(out[0]))))
    assert (changed < 1e-5) if with_mask else (changed > 1e-2), changed


def test_fresh_spatial_transformer_is_identity():
    block = layers.SpatialTransformer(HEADS, 1, GROUPS)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, C))
    ctx = jax.random.normal(jax.random.key(1), (1, CTX_LEN, CTX_DIM))
    variables = jax.jit(block.init)(jax.random.key(2), x, ctx)
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, x, ctx), x)


TINY_UNET = dict(name='unet', image_size=8, in_channels=2, out_channels=2, ch=16, ch_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), num_groups=4, num_heads=2)


def test_unet_without_context_dim_is_unchanged():
    """context_dim=0 (the default) builds today's UNet: the same parameter tree and output as
    a UNet built without the new fields."""
    base = models.get_model(TINY_UNET)
    explicit = models.get_model({**TINY_UNET, 'context_dim': 0, 'transformer_depth': 3,
                                 'use_linear_projection': True})
    v = models.init_params(base, jax.random.key(0))
    assert jax.tree.structure(v) == jax.tree.structure(models.param_shapes(explicit))
    assert not any('transformer' in str(p) or 'attn2' in str(p)
                   for p in jax.tree_util.tree_flatten_with_path(v)[0])
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    t = jnp.array([3, 7])
    np.testing.assert_array_equal(jax.jit(base.apply)(v, x, t), jax.jit(explicit.apply)(v, x, t))


@pytest.fixture(scope='module')
def text_unet():
    model = models.get_model({**TINY_UNET, 'context_dim': CTX_DIM, 'transformer_depth': 1,
                              'num_heads': (1, 2)})
    variables = models.init_params(model, jax.random.key(0))  # a context model's dummy cond
    # proj_out / conv_out start at zero: perturb every parameter so the context reaches the output
    leaves, treedef = jax.tree.flatten(variables)
    rng = np.random.default_rng(1)
    variables = jax.tree.unflatten(treedef, [l + 0.2 * rng.normal(size=l.shape).astype(np.float32)
                                             for l in leaves])
    return model, variables


def test_unet_cross_attention_reads_context_and_mask(text_unet):
    model, v = text_unet
    assert 'down_1_attn_0' in v['params'] and 'attn2' in v['params']['mid_attn']['block_0']
    # per-level heads: level 1 has 2 heads (32 channels), the mid block the last level's
    assert model.num_heads == (1, 2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
    t = jnp.array([5, 9])
    ctx = jnp.asarray(rng.normal(size=(2, CTX_LEN, CTX_DIM)), jnp.float32)
    mask = jnp.asarray([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    apply = jax.jit(model.apply)
    out = apply(v, x, t, {'context': ctx, 'mask': mask})
    ctx2 = ctx.at[:, 2:].add(3.0)
    out2 = apply(v, x, t, {'context': ctx2, 'mask': mask})
    np.testing.assert_allclose(out2[0], out[0], atol=1e-5)       # masked tokens are ignored
    assert float(jnp.max(jnp.abs(out2[1] - out[1]))) > 1e-2     # kept tokens are read
    # No mask = every token kept.
    np.testing.assert_allclose(apply(v, x, t, {'context': ctx})[1], out[1], atol=1e-5)


def test_unet_condition_errors(text_unet):
    model, v = text_unet
    x, t = jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match='context_dim=12'):
        model.apply(v, x, t, None)
    with pytest.raises(ValueError, match=r'\[B, L, 12\]'):
        model.apply(v, x, t, {'context': jnp.zeros((1, 3, 7))})
    plain = models.get_model(TINY_UNET)
    with pytest.raises(ValueError, match='model_config.context_dim=0'):
        plain.apply(models.init_params(plain, jax.random.key(0)), x, t,
                    {'context': jnp.zeros((1, 3, 7))})
    with pytest.raises(ValueError, match='model_config.num_heads'):
        models.get_model({**TINY_UNET, 'num_heads': (1, 2, 3)})
    with pytest.raises(ValueError, match='model_config.transformer_depth=0'):
        models.get_model({**TINY_UNET, 'context_dim': 4, 'transformer_depth': 0})


def test_text_unet_equals_diffusers_unet2dconditionmodel():
    """A tiny SD-layout UNet (CrossAttnDownBlock2D, DownBlock2D / UpBlock2D, CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn) converted through convert's diffusers table, on random weights."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=CTX_DIM,
        attention_head_dim=2, norm_num_groups=4).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    # diffusers' SD UNet: Timesteps(flip_sin_to_cos=True, freq_shift=0) = our 'improved' sinusoid,
    # PyTorch GroupNorm ε 1e-5, Downsample2D padding=1 ('symmetric'); heads = attention_head_dim.
    config = dict(name='unet', image_size=8, in_channels=4, out_channels=4, ch=16, ch_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(8,), num_groups=4, num_heads=2,
                  timestep_embedding='improved', norm_epsilon=1e-5,
                  downsample_padding='symmetric', context_dim=CTX_DIM, transformer_depth=1,
                  use_linear_projection=False)
    params = convert.convert_state_dict(ref.state_dict(), 'diffusers',
                                        ml_collections.ConfigDict(config))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, CTX_LEN, CTX_DIM)).astype(np.float32)
    t = np.array([3, 870])
    with torch.no_grad():
        out_t = ref(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t),
                    encoder_hidden_states=torch.tensor(ctx)).sample.permute(0, 2, 3, 1).numpy()
    model = models.get_model(config)
    out = jax.jit(model.apply)({'params': params}, x, jnp.asarray(t), {'context': ctx})
    assert rel_err(out, out_t) <= RTOL, rel_err(out, out_t)
