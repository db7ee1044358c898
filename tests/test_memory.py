"""Memory (issue #24 item 11): gradient accumulation (training.microbatch), rematerialisation
(model.remat for the UNet and DiT) and the peak memory estimate printed at start.

Truths: the microbatched step computes the whole batch's mean gradient, so parameters after a
few steps equal those of microbatch = 0 up to float32 summation order (<= 1e-5 relative), for the
gaussian chain (with the loss-aware sampler, whose history needs the per-example terms back in
order) and for flow matching; remat recomputes the same function, so outputs and gradients equal
those without it (<= 1e-6); the estimate is XLA's own memory_analysis of the compiled step.
"""
import json
import logging
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import cold, config_validation, input_pipeline, models, sharding, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
# pylint: disable=wrong-import-position
from benchmark_memory import residual_bytes  # noqa: E402
from test_train import leaves, mlp_config  # noqa: E402

try:
    from configs import model_configs
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')
STEPS = 4


def _config(process: str, microbatch: int):
    """The swiss-roll MLP without dropout (dropout masks are drawn per microbatch), batch 32."""
    c = mlp_config(STEPS)
    c.model.dropout = 0.0
    c.training.update(log_every_steps=1, checkpoint_every_steps=STEPS, microbatch=microbatch)
    c.compile_cache_dir = ''
    if process == 'flow':
        c.model.out_dim = 2
        c.diffusion.update(process='flow', model_var_type='fixed_large', loss_type='mse',
                           timestep_sampler='uniform')
        c.sampling.update(method='euler', num_steps='10')
        c.eval.nll_estimator = 'ode'
    return c


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(config, workdir):
    handler = _Capture()
    logging.getLogger('diffusion_jax').addHandler(handler)
    try:
        state = train.train_and_evaluate(config, str(workdir))
    finally:
        logging.getLogger('diffusion_jax').removeHandler(handler)
    with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
        losses = [json.loads(line)['loss'] for line in f]
    return state, losses, handler.lines


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """(process, microbatch) -> (state, logged losses, log lines): batch 32, microbatch 8 (a
    quarter, 1 example per device and chunk) or 0."""
    out = {}
    for process in ('gaussian', 'flow'):
        for microbatch in (0, 8):
            workdir = tmp_path_factory.mktemp(f'{process}{microbatch}')
            out[process, microbatch] = _train(_config(process, microbatch), workdir)
    return out


def _rel(a, b):
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


@pytest.mark.parametrize('process', ['gaussian', 'flow'])
def test_microbatch_trains_the_parameters_of_the_whole_batch(runs, process):
    (state, losses, _), (ref, ref_losses, _) = runs[process, 8], runs[process, 0]
    assert int(state.step) == STEPS
    for name in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(leaves(getattr(state, name)), leaves(getattr(ref, name))):
            if np.issubdtype(b.dtype, np.floating):
                assert _rel(a, b) <= 1e-5, name
            else:
                np.testing.assert_array_equal(a, b)
    # The gaussian run's loss-aware sampler: its loss history and counts, from terms in order.
    for a, b in zip(leaves(state.sampler_state), leaves(ref.sampler_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Not vacuous: the parameters moved by much more than the tolerance.
    start = train.create_train_state(_config(process, 0), models.get_model(
        _config(process, 0).model), train.create_optimizer(_config(process, 0).optim)[0],
        jax.random.split(jax.random.key(0), 3)[0])
    assert max(_rel(a, b) for a, b in zip(leaves(ref.params), leaves(start.params))) > 1e-2


def _compiled_peak(config, synthetic=False):
    """arguments + outputs - aliased + temporaries of the config's compiled train step on the
    8-device mesh, read from XLA's memory_analysis here (not through the code under test), for
    a batch of the config's data (synthetic: zeros of the model's input shape)."""
    model, mesh = models.get_model(config.model), sharding.make_mesh()
    optimizer, schedule = train.create_optimizer(config.optim)
    state = sharding.shard_state(train.create_train_state(config, model, optimizer,
                                                          jax.random.key(0)), mesh)
    size = config.training.batch_size
    if synthetic:
        batch = {'image': np.zeros((size, *models.example_shape(model)), np.float32),
                 'label': np.zeros(size, np.int32)}
    else:
        batch = next(input_pipeline.train_iterator(
            input_pipeline.get_dataset(config.data, config.data.train_split), size,
            config.training.seed))
    batch = sharding.shard_batch(batch, mesh)
    step = train.make_train_step(config, model, cold.create_for_config(config), optimizer,
                                 schedule)
    stats = train.compile_train_step(step, mesh, state, batch, jax.random.key(1)).memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def test_peak_memory_estimate_is_printed_from_memory_analysis(runs):
    for key, (_, _, lines) in runs.items():
        printed = [line for line in lines if line.startswith('estimated peak memory per device')]
        assert len(printed) == 1, key
        assert "XLA's memory_analysis of the compiled train step" in printed[0]
    mib = float(re.search(r'device: ([\d.]+) MiB', [
        line for line in runs['gaussian', 8][2]
        if line.startswith('estimated peak memory')][0]).group(1))
    want = _compiled_peak(_config('gaussian', 8)) / 2**20
    assert mib == pytest.approx(want, abs=0.006)  # printed with 2 decimals


@pytest.mark.parametrize('microbatch, message', [
    (12, 'training.microbatch=12 does not divide training.batch_size=64: the step sums the '
         'gradients of batch_size / microbatch equal chunks; set --config.training.microbatch=8 '
         '(a divisor of 64) or 0 for the whole batch at once.'),
    (4, 'training.microbatch=4 is not divisible by the 8 devices: each microbatch is split over '
        'every device; set --config.training.microbatch to a multiple of 8 that divides '
        'training.batch_size=64, or 0.'),
    (-8, 'training.microbatch=-8 must be an integer >= 0: the examples per gradient-accumulation '
         'step (0: the whole batch at once).'),
], ids=['not_a_divisor', 'not_a_multiple_of_the_devices', 'negative'])
def test_bad_microbatch_is_one_line_and_writes_nothing(tmp_path, capsys, microbatch, message):
    from test_cli_errors import _override  # pylint: disable=import-outside-toplevel
    from diffusion_jax import main  # pylint: disable=import-outside-toplevel
    config, typed = _override(training__microbatch=microbatch)
    workdir = tmp_path / 'run'
    with pytest.raises(SystemExit) as exit_:
        main.execute(config, str(workdir), 'train', typed, verbosity=0)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f'error: {message}']
    assert not workdir.exists()


def test_microbatch_refused_where_the_loss_draws_its_own_noise():
    config = mlp_config()
    config.training.microbatch = 8
    config.model = model_configs.sd_vae(image_size=8, block_out_channels=(32,),
                                        layers_per_block=1)
    with pytest.raises(ValueError, match=r"^training.microbatch=8 is not supported for "
                                         r"model.name='autoencoder'"):
        config_validation.check_microbatch(config)


def _value_and_grads(config):
    """f(params, x, t, y, dropout_key) -> (output, gradient of a fixed random projection of it)
    in train mode, jitted once."""
    model = models.get_model(config)

    def f(p, x, t, y, key):
        out = model.apply({'params': p}, x, t, y, train=True, rngs={'dropout': key})
        w = jax.random.normal(jax.random.key(7), out.shape)
        return jnp.sum(out * w), out

    grad = jax.jit(jax.value_and_grad(f, has_aux=True))
    return lambda *args: (lambda r: (np.asarray(r[0][1]), leaves(r[1])))(grad(*args))


def _norm_rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_remat_is_the_same_function_outputs_and_gradients(name):
    """model.remat (jax.checkpoint per block) against the same network without it: the same
    parameter tree, outputs and gradients (UNet: one level of res and attention blocks down and
    up, and the middle's; dropout 0.2 live, so the recomputed blocks must draw the same
    masks). Outputs within 1e-6; gradients within float32 summation
    order (the transposed blocks add their cotangents in another order; measured here on the
    shared CPU: about 1e-6 of the whole gradient for the UNet), not bit for bit."""
    if name == 'unet':
        config = model_configs.tiny_unet(image_size=8, in_channels=2, ch_mult=(1,),
                                         num_res_blocks=1, attn_resolutions=(8,), dropout=0.2,
                                         num_classes=3)
    else:
        config = model_configs.tiny_dit(image_size=8, in_channels=2, num_classes=3, depth=3)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
    t = jnp.array([1, 10, 100, 900])
    y = jnp.array([0, 1, 2, 1])
    plain = models.get_model(config)
    params = models.init_params(plain, jax.random.key(0))['params']
    # Non-zero final layers, so that the gradient reaches every block.
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(5), p.shape),
                          params)
    remat_config = config.copy_and_resolve_references()
    remat_config.remat = True
    remat_params = models.init_params(models.get_model(remat_config), jax.random.key(0))['params']
    assert jax.tree.structure(remat_params) == jax.tree.structure(params)
    f, f_remat = _value_and_grads(config), _value_and_grads(remat_config)
    key = jax.random.key(3)
    out, grads = f(params, x, t, y, key)
    out_r, grads_r = f_remat(params, x, t, y, key)
    assert np.abs(out).mean() > 1e-2
    np.testing.assert_allclose(out_r, out, rtol=1e-6, atol=1e-6)
    # Relative to the whole gradient: a bias that a one-channel GroupNorm cancels has a zero
    # gradient in exact arithmetic, rounding noise in float32, and no relative error of its own.
    flat = lambda g: np.concatenate([a.ravel() for a in g])
    whole = _norm_rel(flat(grads_r), flat(grads))
    worst = max(float(np.linalg.norm(a - b)) for a, b in zip(grads_r, grads)) / float(
        np.linalg.norm(flat(grads)))
    print(f'{name}: gradient difference with remat {whole:.2e} (worst leaf {worst:.2e})')
    assert whole <= 5e-6 and worst <= 5e-6  # measured about 1e-6 (UNet, this CPU)
    if name == 'unet':  # dropout is live: another key, other masks, another output
        other, _ = f(params, x, t, y, jax.random.key(4))
        assert np.abs(other - out).max() > 1e-3


def _several_blocks(**overrides):
    """A UNet whose activations outweigh its parameters: one 16x16 level of 2 res blocks."""
    return model_configs.tiny_unet(image_size=16, in_channels=1, ch_mult=(1,), num_res_blocks=2,
                                   attn_resolutions=(), **overrides)


def _residual_bytes(config, batch=8):
    """Bytes of what JAX keeps from the forward pass for the backward pass of the network's
    loss (benchmark_memory.residual_bytes: JAX's own list of residuals, the parameters
    excluded): the part of the training memory that remat trades for recomputation, whatever
    the backend's scheduler then does with it. (XLA:CPU's memory_analysis does not drop with
    remat, though the compiled program recomputes: experiments/results/benchmarks.md.)"""
    model = models.get_model(config)
    params = models.init_params(model, jax.random.key(0))['params']
    x = jnp.ones((batch, *models.example_shape(model)))
    t = jnp.arange(batch)

    def loss(p):
        return jnp.sum(jnp.square(model.apply({'params': p}, x, t, train=True,
                                              rngs={'dropout': jax.random.key(0)})))

    return residual_bytes(loss, params)


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_remat_keeps_less_for_the_backward_pass(name):
    if name == 'unet':
        plain, remat = _several_blocks(), _several_blocks(remat=True)
    else:
        plain = model_configs.tiny_dit(image_size=8, in_channels=2, num_classes=3, depth=4)
        remat = model_configs.tiny_dit(image_size=8, in_channels=2, num_classes=3, depth=4,
                                       remat=True)
    without, with_remat = _residual_bytes(plain), _residual_bytes(remat)
    assert with_remat < 0.4 * without, (with_remat, without)


def test_microbatch_lowers_the_compiled_peak_estimate():
    """XLA's estimate for the step (batch 32 over 8 devices): a quarter of the batch at a time
    needs well under the activations of the whole."""
    def config(microbatch):
        c = mlp_config()
        c.model = _several_blocks()
        c.diffusion.update(model_var_type='fixed_large', loss_type='mse',
                           timestep_sampler='uniform')
        c.training.update(batch_size=32, microbatch=microbatch)
        return c
    whole = _compiled_peak(config(0), synthetic=True)
    quarter = _compiled_peak(config(8), synthetic=True)
    assert quarter < 0.6 * whole, (quarter, whole)
