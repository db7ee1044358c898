"""What a checkpoint holds: the train state, its optimiser, and how a fresh one is built.

    optimizer, schedule = train_state.create_optimizer(config.optim)
    state = train_state.create_train_state(config, model, optimizer, jax.random.key(seed))

Part of the run layer: training (diffusion_jax.train) updates this state, run.create writes one
for parameters trained elsewhere, and a resume restores into abstract_train_state. The old names
train.TrainState / create_optimizer / create_train_state / abstract_train_state re-export these.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import models, sharding, timestep_sampling


@flax.struct.dataclass
class TrainState:
    """Everything a step updates; checkpointed as a whole."""
    step: jax.Array  # int32 scalar: steps done
    params: Any  # the model's 'params' collection (float32)
    ema_params: Any  # exponential moving average of params (used to sample and evaluate)
    opt_state: Any  # optax state
    sampler_state: Any  # timestep sampler state (diffusion_jax.timestep_sampling)
    skipped: jax.Array  # int32 scalar: steps whose loss or gradient was non-finite


def create_optimizer(optim_config):
    """AdamW with linear warm-up from 0 and global-norm clipping: (transform, lr schedule).

    The chain is the same whatever the values: clip_by_global_norm(∞) when optim.grad_clip = 0
    and AdamW with weight_decay 0 are the identity and Adam exactly (u + 0·θ = u), so turning
    clipping or decay on or off between runs keeps the optimiser state's structure and a resume
    works.
    """
    o = optim_config
    if o.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    else:
        schedule = optax.constant_schedule(o.learning_rate)
    clip = o.grad_clip if o.grad_clip > 0 else math.inf
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay)), schedule


def create_train_state(config, model, optimizer, rng) -> TrainState:
    """A fresh state on the host's default device: params from init, EMA = params."""
    params = models.init_params(model, rng)['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        # Copies, so that params and EMA never share a buffer (both are donated).
        ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
        sampler_state=timestep_sampling.init(config.diffusion.timestep_sampler,
                                             config.diffusion.num_timesteps),
        skipped=jnp.zeros((), jnp.int32))


def abstract_train_state(config, model, optimizer, mesh) -> TrainState:
    """The state's shapes, dtypes and shardings (sharding.state_shardings: replicated, or
    FSDP-sharded for config.sharding.fsdp > 1), computed without initialising: the target a
    checkpoint is restored into (orbax restores onto this mesh whatever mesh saved it)."""
    def build(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=optimizer.init(params),
                          sampler_state=timestep_sampling.init(config.diffusion.timestep_sampler,
                                                               config.diffusion.num_timesteps),
                          skipped=jnp.zeros((), jnp.int32))
    shapes = jax.eval_shape(build, models.param_shapes(model)['params'])
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, sharding.state_shardings(mesh, shapes))
