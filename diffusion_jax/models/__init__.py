"""Networks: the DDPM/ADM UNet, the noisy-image classifier and the MLP denoiser.

Tools never name a class: `get_model(config.model)` builds whatever `model_config.name` says
('unet' | 'classifier' | 'mlp' | 'dit' | 'autoencoder'), and every denoising network is called as

    model.apply(variables, x_t, t, y=None, train=False, rngs={'dropout': key})

(y: labels [B], or for a UNet with context_dim > 0 the text condition {'context': [B, L, D],
'mask': [B, L]}; the CLIP text encoder, models.text_encoder.CLIPTextEncoder, is called as
apply({'params': p}, input_ids, attention_mask); the classifier takes no y; the autoencoder is reached through
`apply(variables, x, method='encode')` -> (mean, logvar) and `apply(variables, z,
method='decode')`). `init_params` returns those variables, {'params': float32 pytree}.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.classifier import Classifier, classifier_log_prob_grad
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.text_encoder import (CLIPTextEncoder, SmallTextEncoder, TextConditioned,
                                               make_text_encoder)
from diffusion_jax.models.unet import UNet

MODELS = {'unet': UNet, 'classifier': Classifier, 'mlp': MLP, 'dit': DiT,
          'autoencoder': AutoencoderKL}

__all__ = ['MODELS', 'UNet', 'Classifier', 'MLP', 'DiT', 'AutoencoderKL', 'get_model',
           'CLIPTextEncoder', 'SmallTextEncoder', 'TextConditioned', 'init_params', 'param_shapes', 'count_params', 'example_shape',
           'data_shape', 'to_nnx', 'classifier_log_prob_grad', 'timestep_embedding']


def _as_dict(model_config) -> dict[str, Any]:
    return model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)


def get_model(model_config):
    """Builds the Flax module named by model_config.name from the other fields.

    Raises ValueError for an unknown name, a field the network does not take (a typo would
    otherwise be silently ignored), or an invalid combination of fields.
    """
    fields = _as_dict(model_config)
    name = fields.pop('name', None)
    text_encoder = fields.pop('text_encoder', '') or ''
    text_fields = fields.pop('text', None) or {}
    if text_encoder:  # a UNet with its own text encoder, trained together (TextConditioned)
        if name != 'unet':
            raise ValueError(f'model.text_encoder={text_encoder!r} conditions a UNet; '
                             f"model.name={name!r}: set model.name='unet' or text_encoder=''.")
        encoder = make_text_encoder(text_encoder, _as_dict(text_fields))
        denoiser = get_model(dict(fields, name=name))
        if denoiser.context_dim != encoder.hidden_size:
            raise ValueError(f'model.context_dim={denoiser.context_dim} does not fit '
                             f'model.text.hidden_size={encoder.hidden_size}: the cross-attention '
                             'reads the encoder\'s states; leave context_dim unset to derive it.')
        return TextConditioned(denoiser, encoder, text_encoder)
    if name not in MODELS:
        raise ValueError(f'model_config.name={name!r} is not a known network: '
                         f'set it to one of {sorted(MODELS)}.')
    cls = MODELS[name]
    accepted = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ValueError(f'model_config fields {unknown} are not used by a {name!r} network: '
                         f'remove them (it takes {sorted(accepted)}).')
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**kwargs)


def example_shape(model) -> tuple[int, ...]:
    """Shape of one input example (no batch axis) that `model` expects."""
    if hasattr(model, 'data_dim'):
        return (model.in_dim or model.data_dim,)
    width = getattr(model, 'image_width', 0) or model.image_size  # 0: square
    return (model.image_size, width, model.in_channels)


def data_shape(model, self_condition: bool = False) -> tuple[int, ...]:
    """Shape of one data example x (no batch axis; what a sampler draws): example_shape, with
    the last axis halved for a self-conditioned network (training.self_condition), whose input
    is [x, x̂_0] (Chen et al. 2022)."""
    shape = example_shape(model)
    if not self_condition:
        return shape
    return shape[:-1] + (shape[-1] // 2,)


# Initialisation runs once, so XLA's optimisation passes are wasted on it: on CPU they took 5x
# longer than the whole rest of compiling a small UNet's init.
_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                          'xla_llvm_disable_expensive_passes': True}


def _dummy_inputs(model, spec):
    if spec is None or not isinstance(spec, Sequence):
        shape = example_shape(model if spec is None else get_model(spec))
    else:
        shape = tuple(spec)
    x = jnp.zeros((1, *shape), jnp.float32)
    if not getattr(model, 'takes_timestep', True):  # the autoencoder: an image only
        return (x,)
    t = jnp.zeros((1,), jnp.int32)
    if getattr(model, 'context_dim', 0):  # text-conditioned: a one-token context (any L fits)
        return x, t, {'context': jnp.zeros((1, 1, model.context_dim), jnp.float32)}
    return x, t


def init_params(model, rng: jax.Array, spec=None):
    """Initialises `model` on a batch of 1; returns the variables {'params': float32 pytree}.

    spec: None (input shape from the model's own fields), a model ConfigDict (same), or the
    shape of one example without the batch axis, e.g. (32, 32, 3) or (2,).
    """
    args = _dummy_inputs(model, spec)
    return jax.jit(model.init).lower(rng, *args).compile(_INIT_COMPILER_OPTIONS)(rng, *args)


def param_shapes(model, spec=None):
    """Shapes and dtypes of init_params(model, ., spec), traced without compiling or computing."""
    return jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(model, spec))


def count_params(params) -> int:
    """Number of scalars in a pytree of arrays or jax.ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


def to_nnx(module, variables=None, *, rng: jax.Array | None = None, spec=None):
    """The Linen `module` as a Flax NNX module (flax.nnx.bridge.ToNNX), with its variables.

    variables: {'params': tree} (or the tree itself) to load, e.g. a checkpoint's; None:
    init_params(module, rng, spec) (rng default jax.random.key(0)). The result is called like
    the Linen module's apply without the variables: `nnx_model(x, t, y)`, or for the
    autoencoder `nnx_model(x, method='encode')` / `nnx_model(z, method='decode')`;
    nnx.state(nnx_model, nnx.Param) holds the parameters under the Linen names.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from flax.nnx import bridge  # pylint: disable=import-outside-toplevel
    rng = jax.random.key(0) if rng is None else rng
    if variables is None:
        variables = init_params(module, rng, spec)
    params = variables['params'] if set(variables) == {'params'} else variables
    # The module's structure from shapes only (the bridge's lazy init runs the network eagerly,
    # op by op: a minute for a small UNet on CPU), then the given values put in.
    args = _dummy_inputs(module, spec)
    wrapper = nnx.eval_shape(lambda: bridge.lazy_init(bridge.ToNNX(module, rngs=nnx.Rngs(rng)),
                                                      *args))
    state = nnx.state(wrapper, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    given = {tuple(p.key for p in path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(given) != set(flat):
        names = lambda paths: sorted('/'.join(map(str, p)) for p in paths)[:5]
        raise ValueError(f'to_nnx: variables do not fit the module (missing: '
                         f'{names(set(flat) - set(given))}, unexpected: '
                         f'{names(set(given) - set(flat))}).')
    for path, var in flat.items():
        if tuple(given[path].shape) != tuple(var.value.shape):
            raise ValueError(f'to_nnx: parameter {"/".join(map(str, path))} has shape '
                             f'{tuple(given[path].shape)}, the module {tuple(var.value.shape)}.')
        var.value = jnp.asarray(given[path])
    nnx.update(wrapper, state)
    wrapper.to_nnx__rngs = nnx.Rngs(rng)  # a real stream in place of the traced one
    return wrapper
