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


SHAPE = (4, 2, 2, 1)


def _calls(target, method, **kwargs):
    """Every network call's (x, t, fed x̂_0) of one self-conditioned sampler run, in order."""
    calls = []

    def recording_model(x, t, self_cond=None):
        """ε̂ (or v̂, F) = 0.3 x + 0.5 x̂_0_fed - 0.01 t."""
        jax.debug.callback(lambda *a: calls.append(tuple(np.asarray(v, np.float64) for v in a)),
                           x, t, self_cond, ordered=True)
        return 0.3 * x + 0.5 * self_cond - 0.01 * jnp.reshape(t, (-1, 1, 1, 1)).astype(x.dtype)

    samplers.sample(target, Partial(recording_model), jax.random.key(0), SHAPE,
                    method=method, self_condition=True, **kwargs)
    jax.effects_barrier()
    return calls


def _x0_of(target, x, t, sc, clip):
    """The x̂_0 a step makes from its call (x, t_network, fed x̂_0), in float64."""
    out = 0.3 * x + 0.5 * sc - 0.01 * np.reshape(t, (-1, 1, 1, 1))
    if isinstance(target, dl.GaussianDiffusion):  # ε-prediction at original timestep t
        abar = np.asarray(target.alphas_cumprod, np.float64)[np.asarray(t, np.int64)].reshape(-1, 1, 1, 1)
        x0 = (x - np.sqrt(1 - abar) * out) / np.sqrt(abar)
        return np.clip(x0, -1, 1) if clip else x0
    if target.name == 'flow':  # velocity: x̂_0 = x - t v̂
        return x - np.reshape(t, (-1, 1, 1, 1)) * out
    sigma = np.exp(4.0 * np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)  # EDM: t_in = c_noise
    x_raw = x * np.sqrt(sigma**2 + 0.25)  # x_in = c_in x
    return (0.25 / (sigma**2 + 0.25) * x_raw + sigma * 0.5 / np.sqrt(sigma**2 + 0.25) * out)


@pytest.mark.parametrize('method', ['ancestral', 'ddim', 'dpmpp_2m'])
def test_chain_feeds_the_previous_steps_x0(method):
    """On a respaced GaussianDiffusion: call k's fed x̂_0 is exactly the (clipped) x̂_0 that
    call k-1 made, zeros at the first; one call per step."""
    diffusion = dl.create_diffusion(_gaussian_config())
    target = diffusion.respace(range(0, 20, 4))
    calls = _calls(target, method)
    assert len(calls) == 5
    np.testing.assert_array_equal(calls[0][2], 0.0)
    for prev, call in zip(calls, calls[1:]):
        np.testing.assert_allclose(call[2], _x0_of(diffusion, *prev, clip=True), atol=2e-5)


def _gaussian_config():
    import ml_collections
    from configs import swissroll
    d = swissroll.get_config().diffusion
    d.update(num_timesteps=20, beta_schedule='linear', beta_start=0.01, beta_end=0.3)
    return ml_collections.ConfigDict(d.to_dict())


@pytest.mark.parametrize('name,method', [('flow', 'euler'), ('edm', 'heun'), ('edm', 'ddim')])
def test_process_solvers_feed_the_previous_steps_x0(name, method):
    """flow/EDM: every call of step i is fed step i-1's x̂_0 (Heun: its two calls the same one,
    the x̂_0 of the step's first call), zeros at step 0."""
    process = processes.FlowMatching() if name == 'flow' else processes.EDM()
    calls = _calls(process, method, num_steps=4, clip_denoised=False)
    per_step = 2 if method == 'heun' else 1
    assert len(calls) == 4 * per_step - (per_step - 1)
    steps = [calls[i:i + per_step] for i in range(0, len(calls), per_step)]
    for call in steps[0]:
        np.testing.assert_array_equal(call[2], 0.0)
    for prev, step in zip(steps, steps[1:]):
        for call in step:
            np.testing.assert_allclose(call[2], _x0_of(process, *prev[0], clip=False),
                                       rtol=1e-4, atol=1e-5)


def test_off_by_default_and_unchanged():
    """training.self_condition defaults to False (the configs, a stored run without the field),
    the network then has the data's channels, and a model that ignores x̂_0 samples to the same
    bits with the option on or off."""
    from configs import cifar10, digits
    from diffusion_jax.samplers import batches
    assert cifar10.get_config().training.self_condition is False
    config = config_validation.resolve(digits.get_config(), 'train')
    assert config.model.in_channels == 1 and config.model.out_channels == 1
    del config.training['self_condition']
    assert not batches.self_conditioned(config)
    on = digits.get_config()
    on.training.self_condition = True
    on = config_validation.resolve(on, 'train', typed={'training.self_condition'})
    assert on.model.in_channels == 2 and on.model.out_channels == 1  # [x_t, x̂_0] -> ε
    ignore = Partial(lambda x, t, self_cond=None: 0.3 * x - 0.001 * jnp.reshape(
        t, (-1, 1, 1, 1)).astype(x.dtype))
    diffusion = dl.create_diffusion(_gaussian_config()).respace(range(0, 20, 4))
    for target, kw in ((diffusion, {}), (processes.EDM(), {'method': 'heun', 'num_steps': 4})):
        a = samplers.sample(target, ignore, jax.random.key(3), SHAPE, **kw)['samples']
        b = samplers.sample(target, ignore, jax.random.key(3), SHAPE, self_condition=True,
                            **kw)['samples']
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_self_condition_configs_are_one_line():
    """An explicit in_channels that is not 2·C, a network or process that cannot take x̂_0."""
    from configs import digits, digits_cold_blur
    cases = []
    config = digits.get_config()
    config.training.self_condition = True  # in the file, not typed: model.in_channels=1 stays
    cases.append((config, r'model.in_channels=1 does not fit data.channels=1 with '
                          r'training.self_condition=True .* set --config.model.in_channels=2'))
    config = digits.get_config()
    config.training.self_condition = True
    config.model.name = 'classifier'
    cases.append((config, r"training.self_condition=True feeds x̂_0 .* not model.name="
                          r"'classifier'"))
    config = digits_cold_blur.get_config()
    config.training.self_condition = True
    cases.append((config, r"training.self_condition=True applies to diffusion.process="))
    for config, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            config_validation.resolve(config, 'train')
        assert '\n' not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Editing and the figures' chains (samplers/edit.py, samplers/editing.py)
# ----------------------------------------------------------------------------------------------
def _recorder():
    """(the recording ε-model of _calls as a pytree, its call list)."""
    calls = []

    def recording_model(x, t, self_cond=None):
        jax.debug.callback(lambda *a: calls.append(tuple(np.asarray(v, np.float64) for v in a)),
                           x, t, self_cond, ordered=True)
        return 0.3 * x + 0.5 * self_cond - 0.01 * jnp.reshape(t, (-1, 1, 1, 1)).astype(x.dtype)

    return Partial(recording_model), calls


def _assert_fed_previous(diffusion, calls, clip, atol=2e-5):
    np.testing.assert_array_equal(calls[0][2], 0.0)
    for prev, call in zip(calls, calls[1:]):
        np.testing.assert_allclose(call[2], _x0_of(diffusion, *prev, clip=clip), atol=atol)


def _images(seed=7):
    return jnp.clip(0.5 * jax.random.normal(jax.random.key(seed), SHAPE), -1, 1)


def test_repaint_feeds_the_previous_reverse_steps_x0():
    """RePaint with jumps (K = 5, j = 2, r = 2) on a respaced chain: 9 reverse steps at the
    original timesteps [16, 12, 16, 12, 8, 4, 8, 4, 0] (levels 4 3 | 4 3 2 1 | 2 1 0 between the
    forward jumps), each fed the x̂_0 of the reverse step before it, zeros at the first."""
    diffusion = dl.create_diffusion(_gaussian_config())
    target = diffusion.respace(range(0, 20, 4))
    model_fn, calls = _recorder()
    mask = np.ones(SHAPE, np.float32)
    mask[:, :, 1:] = 0
    samplers.repaint(target, model_fn, jax.random.key(1), _images(), mask, jump_length=2,
                     jump_n_sample=2, self_condition=True)
    jax.effects_barrier()
    assert [int(c[1][0]) for c in calls] == [16, 12, 16, 12, 8, 4, 8, 4, 0]
    _assert_fed_previous(diffusion, calls, clip=True)


def test_sdedit_feeds_the_previous_steps_x0_from_zeros_at_t0():
    diffusion = dl.create_diffusion(_gaussian_config())
    target = diffusion.respace(range(0, 20, 4))
    for method in ('ancestral', 'ddim'):
        model_fn, calls = _recorder()
        samplers.sdedit(target, model_fn, jax.random.key(2), _images(), 0.6, method=method,
                        self_condition=True)
        jax.effects_barrier()
        assert [int(c[1][0]) for c in calls] == [8, 4, 0]  # t0 = ceil(0.6 · 5) - 1 = 2
        _assert_fed_previous(diffusion, calls, clip=True)


@pytest.mark.parametrize('inversion', ['reference', 'target_level'])
def test_ddim_edit_inversion_and_decoder_feed_the_previous_steps_x0(inversion):
    """ddim_edit: the inversion's steps (t = 0, 4, … up), then the decoder's (down), each chain
    fed its previous step's x̂_0 (the inversion's: the x̂_0 it encodes with), zeros at its first."""
    diffusion = dl.create_diffusion(_gaussian_config())
    target = diffusion.respace(range(0, 20, 4))
    model_fn, calls = _recorder()
    samplers.ddim_edit(target, model_fn, _images(), inversion=inversion, self_condition=True)
    jax.effects_barrier()
    up = [0, 4, 8, 12] if inversion == 'reference' else [0, 4, 8, 12, 16]
    assert [int(c[1][0]) for c in calls] == up + [16, 12, 8, 4, 0]
    encode, decode = calls[:len(up)], calls[len(up):]
    _assert_fed_previous(diffusion, decode, clip=False)
    np.testing.assert_array_equal(encode[0][2], 0.0)
    abar = np.asarray(diffusion.alphas_cumprod, np.float64)
    for prev, call in zip(encode, encode[1:]):
        want = _x0_of(diffusion, *prev, clip=False)
        if inversion == 'target_level':  # x̂_0 at level ᾱ_{t-1}: (x - √(1-a) ε̂)/√a
            t = int(prev[1][0])
            a = abar[t - 4] if t else 1.0
            eps = 0.3 * prev[0] + 0.5 * prev[2] - 0.01 * t
            want = (prev[0] - np.sqrt(1 - a) * eps) / np.sqrt(a)
        np.testing.assert_allclose(call[2], want, atol=2e-5)


def test_figure_chains_feed_the_previous_steps_x0():
    """The figures' library calls (sampling.progressive / interpolation): samples of p(x_0|x_t)
    from one x_t and the DDPM and DDIM interpolation strips."""
    diffusion = dl.create_diffusion(_gaussian_config())
    target = diffusion.respace(range(0, 20, 4))
    x = _images()
    model_fn, calls = _recorder()
    samplers.same_xt_samples(target, model_fn, jax.random.key(3), x[:2], 3, 2,
                             self_condition=True)
    jax.effects_barrier()
    assert [int(c[1][0]) for c in calls] == [12, 8, 4, 0]
    _assert_fed_previous(diffusion, calls, clip=True)
    model_fn, calls = _recorder()
    samplers.interpolate_ddpm(target, model_fn, jax.random.key(4), x[:2], x[2:], 2,
                              jnp.asarray([0.0, 1.0]), self_condition=True)
    jax.effects_barrier()
    assert [int(c[1][0]) for c in calls] == [8, 4, 0]
    _assert_fed_previous(diffusion, calls, clip=True)
    model_fn, calls = _recorder()
    samplers.interpolate_ddim(target, model_fn, x[:2], x[2:], jnp.asarray([0.0, 1.0]),
                              self_condition=True)
    jax.effects_barrier()
    assert [int(c[1][0]) for c in calls] == [0, 4, 8, 12, 16, 12, 8, 4, 0]
    _assert_fed_previous(diffusion, calls[:4], clip=False)
    _assert_fed_previous(diffusion, calls[4:], clip=False)


def test_edits_without_self_conditioning_are_unchanged():
    """A model that ignores x̂_0 edits to the same bits with the option on or off (so the off
    path is the old program), for repaint, sdedit and ddim_edit."""
    diffusion = dl.create_diffusion(_gaussian_config()).respace(range(0, 20, 4))
    ignore = Partial(lambda x, t, self_cond=None: 0.3 * x - 0.001 * jnp.reshape(
        t, (-1, 1, 1, 1)).astype(x.dtype))
    x, mask = _images(), np.tile(np.array([[[1.0], [0.0]]], np.float32), (4, 2, 1, 1))
    runs = {
        'repaint': lambda sc: samplers.repaint(diffusion, ignore, jax.random.key(5), x, mask,
                                               jump_length=2, jump_n_sample=2,
                                               self_condition=sc),
        'sdedit': lambda sc: samplers.sdedit(diffusion, ignore, jax.random.key(5), x, 0.6,
                                             self_condition=sc),
        'ddim_edit': lambda sc: samplers.ddim_edit(diffusion, ignore, x,
                                                   self_condition=sc)['edited'],
    }
    for name, edit in runs.items():
        np.testing.assert_array_equal(np.asarray(edit(False)), np.asarray(edit(True)),
                                      err_msg=name)
