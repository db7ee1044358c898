"""models.to_nnx: every network through flax.nnx.bridge equals its Linen apply.

Truth: the Linen module's own apply on the same (perturbed, so nothing is zero) parameters.
Beyond the forward pass: the NNX state holds exactly those parameters, and a gradient step
taken through NNX (nnx.grad) equals one through jax.grad of the Linen apply.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax import models

try:
    from configs import model_configs
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')

NETWORKS = {
    'unet': lambda: model_configs.tiny_unet(8, 1, 2, num_classes=3),
    'classifier': lambda: model_configs.adm_classifier(8, num_classes=3, in_channels=1, ch=32,
                                                       ch_mult=(1, 2), attn_resolutions=(4,),
                                                       num_res_blocks=1, num_head_channels=32),
    'mlp': lambda: model_configs.swissroll_mlp(num_classes=3),
    'dit': lambda: model_configs.tiny_dit(8, 4, num_classes=3),
    'autoencoder': lambda: model_configs.sd_vae(8, block_out_channels=(8, 16),
                                                layers_per_block=1, norm_num_groups=4),
}


def _perturbed(model, seed):
    """Random parameters of the module's shapes (nothing zero; no init program compiled)."""
    leaves, tree = jax.tree.flatten(models.param_shapes(model))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, a.shape) / max(a.shape[0], 1)
                                     ** 0.5 + (1.0 if len(a.shape) == 1 else 0.0)
                                     for a, k in zip(leaves, keys)])


def _inputs(name, model):
    shape = (2, *models.example_shape(model))
    x = jax.random.normal(jax.random.key(7), shape)
    t, y = jnp.array([3, 9]), (None if name in ('classifier', 'autoencoder') else jnp.array([0, 2]))
    return x, t, y


@pytest.mark.parametrize('name', list(NETWORKS))
def test_nnx_equals_linen(name):
    model = models.get_model(NETWORKS[name]())
    variables = _perturbed(model, 0)
    wrapped = models.to_nnx(model, variables)
    state = nnx.state(wrapped, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    expected = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    assert len(flat) == len(expected)
    for path, leaf in expected:
        np.testing.assert_array_equal(np.asarray(flat[tuple(p.key for p in path)].value), leaf)
    x, t, y = _inputs(name, model)
    if name == 'autoencoder':
        z = jax.random.normal(jax.random.key(8), (2, 4, 4, 4))  # f = 2 latents of 8x8 images
        for method, arg in (('encode', x), ('decode', z)):
            ours = nnx.jit(lambda m, a, method=method: m(a, method=method))(wrapped, arg)
            ref = jax.jit(lambda v, a, method=method: model.apply(v, a, method=method))(
                variables, arg)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return
    args = (x, t) if name == 'classifier' else (x, t, y)
    ours = nnx.jit(lambda m, *a: m(*a))(wrapped, *args)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.jit(model.apply)(variables,
                                                                                    *args)))


def test_nnx_gradient_step_equals_linen():
    model = models.get_model(NETWORKS['dit']())
    variables = _perturbed(model, 3)
    x, t, y = _inputs('dit', model)
    wrapped = models.to_nnx(model, variables)

    grads_nnx = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, t, y) ** 2)))(wrapped)
    grads_linen = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x, t, y) ** 2)))(
        variables['params'])
    flat_nnx = dict(nnx.to_flat_state(grads_nnx))
    flat_linen = {path: leaf for path, leaf in
                  jax.tree_util.tree_flatten_with_path(grads_linen)[0]}
    assert len(flat_nnx) == len(flat_linen)
    for path, leaf in flat_linen.items():
        key = tuple(p.key for p in path)
        np.testing.assert_allclose(np.asarray(flat_nnx[key].value), np.asarray(leaf),
                                   rtol=1e-6, atol=1e-7)


def test_to_nnx_refuses_variables_of_another_network():
    model = models.get_model(NETWORKS['dit']())
    other = models.param_shapes(models.get_model(NETWORKS['unet']()))
    with pytest.raises(ValueError, match='to_nnx: variables do not fit'):
        models.to_nnx(model, other)
    # Without variables: init_params' for the same rng.
    mlp = models.get_model(NETWORKS['mlp']())
    fresh = models.to_nnx(mlp, rng=jax.random.key(5))
    init = models.init_params(mlp, jax.random.key(5))['params']
    flat = dict(nnx.to_flat_state(nnx.state(fresh, nnx.Param)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        np.testing.assert_array_equal(np.asarray(flat[tuple(p.key for p in path)].value), leaf)
