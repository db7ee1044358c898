"""Self-conditioning (Chen et al. 2022, "Analog Bits"; training.self_condition): the train step
is the paper's two-pass loss (Algorithm 1), the samplers feed the previous step's x̂_0
(Algorithm 2), and with the option off nothing changes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import config_validation, guidance, models, processes, samplers
from diffusion_jax import diffusion as dl

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _config(process='gaussian'):
    from configs import model_configs, swissroll
    config = swissroll.get_config()
    config.model = model_configs.swissroll_mlp(hidden_dim=32, num_layers=2, out_dim=2,
                                               dropout=0.0)
    config.diffusion.update(num_timesteps=10, beta_schedule='linear', beta_start=0.01,
                            beta_end=0.5, model_mean_type='v', process=process)
    config.data.num_train_examples = 32
    config.training.self_condition = True
    if process != 'gaussian':
        config.sampling.update(method='euler', num_steps='10')
        config.eval.nll_estimator = 'ode'
    return config_validation.resolve(config, 'train', typed={'training.self_condition'})


def _coin(seed):
    rng = jax.random.fold_in(jax.random.key(seed), 0)  # step 0
    return bool(jax.random.bernoulli(jax.random.fold_in(rng, 4), 0.5))


def _seeds():
    """A train key whose batch coin lands heads (first pass fed) and one landing tails."""
    coins = {_coin(seed): seed for seed in range(20)}
    return coins[True], coins[False]


@pytest.mark.parametrize('process', ['gaussian', 'flow'])
def test_train_step_is_the_two_pass_loss(process):
    """Loss and gradient norm of the jitted step equal the hand-written Algorithm 1 on the same
    draw: heads -> second pass fed stop_gradient(x̂_0 of a zeros-fed first pass), tails -> fed
    zeros; the two branches differ, and the gradient does not flow through the first pass."""
    from diffusion_jax import input_pipeline, timestep_sampling, train
    config = _config(process)
    assert config.model.in_dim == 4  # [x_t, x̂_0] of 2-D points: derived once
    model = models.get_model(config.model)
    diffusion = dl.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    state = train.create_train_state(config, model, optimizer, jax.random.key(0))
    # Random weights everywhere (the zero-initialised output layer would ignore its input).
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    state = state.replace(params=jax.tree.unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    batch = next(input_pipeline.train_iterator(
        input_pipeline.get_dataset(config.data, 'train'), 32, seed=0))
    step = jax.jit(train.make_train_step(config, model, diffusion, optimizer, schedule))
    x0 = jnp.asarray(batch['image'])
    proc = processes.get_process(config.diffusion)
    losses = {}
    for heads, seed in zip((True, False), _seeds()):
        _, metrics = step(state, batch, jax.random.key(seed))
        rng = jax.random.fold_in(jax.random.key(seed), 0)
        t_rng, noise_rng, dropout_rng, _ = jax.random.split(rng, 4)

        def hand_loss(params):
            def net(x_in, t_in, sc):
                return model.apply({'params': params}, jnp.concatenate([x_in, sc], -1), t_in,
                                   None, train=True, rngs={'dropout': dropout_rng})
            zeros = jnp.zeros_like(x0)
            if process == 'gaussian':
                t, _ = timestep_sampling.sample(state.sampler_state, t_rng, 32)
                noise = jax.random.normal(noise_rng, x0.shape)
                a = jnp.sqrt(jnp.asarray(diffusion.alphas_cumprod, jnp.float32))[t][:, None]
                s = jnp.sqrt(1 - jnp.asarray(diffusion.alphas_cumprod, jnp.float32))[t][:, None]
                x_t = a * x0 + s * noise
                sc = zeros
                if heads:  # v-prediction: x̂_0 = α x_t - σ v̂
                    sc = jax.lax.stop_gradient(a * x_t - s * net(x_t, t, zeros))
                target = a * noise - s * x0
                return jnp.mean(jnp.square(net(x_t, t, sc) - target))
            t_key, n_key = jax.random.split(noise_rng)
            t = jax.random.uniform(t_key, (32,))
            noise = jax.random.normal(n_key, x0.shape)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            sc = zeros
            if heads:  # velocity v = ε - x_0: x̂_0 = x_t - t v̂
                sc = jax.lax.stop_gradient(x_t - t[:, None] * net(x_t, t, zeros))
            return jnp.mean(jnp.square(net(x_t, t, sc) - (noise - x0)))

        loss, grads = jax.value_and_grad(hand_loss)(state.params)
        np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=2e-5)
        np.testing.assert_allclose(float(metrics['grad_norm']),
                                   float(jnp.sqrt(sum(jnp.sum(g**2)
                                                      for g in jax.tree.leaves(grads)))),
                                   rtol=2e-4)
        losses[heads] = float(loss)
    assert abs(losses[True] - losses[False]) > 1e-3 * losses[False]
