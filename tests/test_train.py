"""Training end to end on 8 fake CPU devices: files written, loss going down, exact resume after a
preemption, the sharded step against one device, non-finite detection, bad input refused."""
import json
import os
import pathlib
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpointing, input_pipeline, models, sharding, train
from diffusion_jax import run as run_lib
from diffusion_jax import diffusion as diffusion_lib

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits, fashion_mnist, model_configs, swissroll


pytestmark = pytest.mark.usefixtures('fast_compiles')


def mlp_config(steps=8):
    """Swiss roll with a small MLP: learned variance, L_vlb with loss-aware sampling, dropout."""
    c = swissroll.get_config()
    c.model = model_configs.swissroll_mlp(hidden_dim=32, num_layers=2, out_dim=4, dropout=0.1)
    c.diffusion.update(num_timesteps=10, beta_schedule='linear', beta_start=0.01, beta_end=0.5,
                       model_var_type='learned_range', loss_type='rescaled_kl',
                       timestep_sampler='loss_aware')
    c.data.num_train_examples = 64
    c.training.update(batch_size=32, num_train_steps=steps, log_every_steps=2,
                      checkpoint_every_steps=3, sample_every_steps=0, keep_checkpoints=5)
    c.optim.update(learning_rate=3e-3, warmup_steps=2)
    return c


def unet_config():
    """Digits with the smallest UNet (one level, no attention) and T = 20 for quick sampling."""
    c = digits.get_config()
    c.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                      attn_resolutions=())
    c.diffusion.update(num_timesteps=20, beta_start=5e-3, beta_end=0.3)
    c.training.update(batch_size=16, num_train_steps=8, log_every_steps=2,
                      checkpoint_every_steps=4, sample_every_steps=8, num_sample_images=8)
    c.optim.update(learning_rate=2e-3, warmup_steps=0)
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def snapshot(folder):
    """Every file under folder with its size and modification time (to prove nothing changed)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[path] = (os.path.getsize(path), os.path.getmtime(path))
    return out


def test_end_to_end_unet_writes_everything_and_the_loss_falls(tmp_path):
    workdir = str(tmp_path / 'run')
    state = train.train_and_evaluate(unet_config(), workdir)
    assert int(state.step) == 8
    assert len(state.params['conv_in']['kernel'].sharding.device_set) == 8  # replicated on 8
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    assert [r['step'] for r in rows] == [2, 4, 6, 8]
    losses = [r['loss'] for r in rows]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    assert {'grad_norm', 'learning_rate', 'steps_per_sec', 'images_per_sec'} <= set(rows[-1])
    assert any(k.startswith('loss_q') for k in rows[-1])
    assert checkpointing._steps_on_disk(workdir) == [4, 8]
    samples = np.load(os.path.join(workdir, 'samples', '8', 'ema_grid.npz'))['images']
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8 and np.ptp(samples) > 0
    assert os.path.getsize(os.path.join(workdir, 'samples', '8', 'ema_grid.png')) > 0
    assert os.listdir(os.path.join(workdir, 'tensorboard'))
    with open(os.path.join(workdir, 'train.log'), encoding='utf-8') as f:
        assert 'compiling the train step' in f.read()
    assert tuple(run_lib.Run(workdir).config.model.ch_mult) == (1,)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """An uninterrupted 8-step MLP run: (workdir, final state)."""
    workdir = str(tmp_path_factory.mktemp('reference'))
    return workdir, train.train_and_evaluate(mlp_config(), workdir)


def test_preempted_and_resumed_run_matches_the_uninterrupted_one_bit_for_bit(
        reference_run, tmp_path):
    _, reference = reference_run
    workdir = str(tmp_path / 'resumed')

    def preempt_at_5(step, _):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.train_and_evaluate(mlp_config(), workdir, on_step=preempt_at_5)
    assert int(stopped.step) == 5 and checkpointing._steps_on_disk(workdir) == [3, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    resumed = train.train_and_evaluate(mlp_config(), workdir)
    assert int(resumed.step) == 8
    for field in ('params', 'ema_params', 'opt_state', 'sampler_state'):
        for got, want in zip(leaves(getattr(resumed, field)), leaves(getattr(reference, field))):
            np.testing.assert_array_equal(got, want, err_msg=field)


def test_the_loader_restores_what_training_saved(reference_run):
    workdir, reference = reference_run
    ema, raw = run_lib.load(workdir), run_lib.load(workdir, use_ema=False)
    assert ema.step == 8
    for got, want in zip(leaves(ema.variables['params']), leaves(reference.ema_params)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(leaves(raw.variables['params']), leaves(reference.params)):
        np.testing.assert_array_equal(got, want)


def test_sharded_step_equals_the_single_device_step():
    config = mlp_config()
    model = models.get_model(config.model)
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    traces = []

    def step_fn(*args):  # counts traces: each compile traces once, every call reuses it
        traces.append(1)
        return train.make_train_step(config, model, diffusion, optimizer, schedule)(*args)

    ds = input_pipeline.get_dataset(config.data, 'train')
    batch = next(input_pipeline.train_iterator(ds, 32, seed=0))
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = sharding.make_mesh(devices)
        state = sharding.replicate(
            train.create_train_state(config, model, optimizer, jax.random.key(0)), mesh)
        placed = sharding.shard_batch(batch, mesh)
        compiled = train.compile_train_step(step_fn, mesh, state, placed, jax.random.key(1))
        for _ in range(2):
            state, metrics = compiled(state, placed, jax.random.key(1))
        results.append((leaves(state.params), float(metrics['loss'])))
    (sharded, loss8), (single, loss1) = results
    assert len(traces) == 2  # one per mesh, none per step
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_raises_and_saves_nothing(tmp_path):
    config = mlp_config(steps=4)
    config.diffusion.update(model_var_type='fixed_large', loss_type='mse',
                            timestep_sampler='uniform')
    config.model.out_dim = 2
    config.optim.update(learning_rate=1e30, grad_clip=0.0, warmup_steps=0)
    config.training.checkpoint_every_steps = 100
    with pytest.raises(FloatingPointError, match='non-finite.*optim.learning_rate'):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpointing._steps_on_disk(str(tmp_path)) == []


def _bad(field, value):
    config = mlp_config()
    section, name = field.split('.')
    config[section][name] = value
    return config


@pytest.mark.parametrize('make_config, match', [
    (lambda: _bad('data.dataset', 'no_such_dataset'), 'data.dataset'),
    (lambda: _bad('training.batch_size', 12), 'training.batch_size=12'),
    (lambda: _bad('diffusion.timestep_sampler', 'fancy'), 'diffusion.timestep_sampler'),
])
def test_bad_config_is_refused_before_anything_is_written(make_config, match, tmp_path):
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(make_config(), str(workdir))
    assert not workdir.exists()


def test_image_size_the_unet_cannot_halve_is_refused(tmp_path):
    config = unet_config()
    config.model.update(image_size=7, ch_mult=(1, 2), attn_resolutions=())
    config.data.image_size = 7
    with pytest.raises(ValueError, match='image_size=7'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_missing_data_directory_is_refused(tmp_path):
    config = fashion_mnist.get_config()
    config.data.data_dir = str(tmp_path / 'absent')
    with pytest.raises(FileNotFoundError, match='data.data_dir=.*apt-get install'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_checkpoint_of_another_model_is_refused_and_left_alone(reference_run, tmp_path):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(reference_run[0], workdir)
    before = snapshot(workdir)
    config = mlp_config(steps=12)
    config.model.hidden_dim = 48
    with pytest.raises(ValueError, match=r'model.hidden_dim: 32 -> 48'):
        train.train_and_evaluate(config, workdir)
    # Without config.json the stored parameter shapes still tell.
    os.remove(os.path.join(workdir, 'config.json'))
    before.pop(os.path.join(workdir, 'config.json'))
    with pytest.raises(ValueError, match='different model: parameter'):
        train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before


def test_label_dropout_replaces_labels_by_the_null_label():
    labels = jnp.arange(1000) % 10
    dropped = train._labels(labels, 10, 0.25, jax.random.key(0))
    share = float(jnp.mean(dropped == 10))
    assert 0.2 < share < 0.3
    np.testing.assert_array_equal(dropped[dropped != 10], labels[dropped != 10])
    assert train._labels(labels, 0, 0.25, jax.random.key(0)) is None
