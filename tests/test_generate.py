"""The sample driver end to end on tiny networks with random parameters, on the 8 fake CPU
devices.

The run on disk (diffusion_jax.run.resolve_config and load_resolved, tested in test_run.py) is
replaced by a resolved config and random initialisation: these tests are about what the
sampling driver (generate.run_resolved) writes.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import cifar10, model_configs
from diffusion_jax import config_validation, generate, guidance, models, run
from diffusion_jax.diffusion import GaussianDiffusion, create_diffusion

STEP = 7


def _config(model, **sampling):
    config = cifar10.get_config()
    config.model = model
    config.diffusion.num_timesteps = 40
    config.sampling = generate.default_sampling_config()
    config.sampling.update(sampling)
    # The data the model was "trained" on: the shapes and classes the validation checks.
    if 'data_dim' not in model:
        config.data.update(image_size=model.image_size, channels=model.in_channels)
    config.data.num_classes = model.num_classes or config.data.num_classes
    if config.sampling.guidance_scale:
        config.training.label_dropout = 0.1  # classifier-free guidance needs the null label
    return config


@pytest.fixture
def random_params(monkeypatch):
    # XLA's optimisation passes cost most of the time here (a UNet in a loop per program, seven
    # programs); the four-step chains run fast either way.
    previous = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    def load(config, workdir, mesh):  # pylint: disable=unused-argument
        model = models.get_model(config.model)
        return run.Loaded(config=config, variables=models.init_params(model, jax.random.key(0)),
                          step=STEP, model=model, diffusion=create_diffusion(config.diffusion),
                          workdir=workdir)
    monkeypatch.setattr(generate, '_load_params', load)
    yield
    jax.config.update('jax_disable_most_optimizations', previous)


def _png_shape(path):
    with Image.open(path) as image:
        return np.asarray(image).shape


def test_class_conditional_images_with_figures(tmp_path, random_params):
    # One level, no attention: the smallest UNet keeps the many figure programs quick to compile.
    config = _config(model_configs.tiny_unet(image_size=8, in_channels=1, num_classes=3,
                                             ch_mult=(1,), attn_resolutions=()),
                     method='ddim', num_steps='ddim4', num_samples=12, batch_size=8,
                     guidance_scale=1.5, labels='2,0', progressive=True, progress_every=2,
                     interpolation=True, interpolation_lambdas=3)
    folder = generate.run_resolved(config_validation.resolve(config, 'sample'), str(tmp_path))
    assert folder == os.path.join(str(tmp_path), 'samples', str(STEP))
    with np.load(os.path.join(folder, 'samples.npz')) as f:
        assert f['images'].dtype == np.uint8 and f['images'].shape == (12, 8, 8, 1)
        np.testing.assert_array_equal(f['labels'], np.resize([2, 0], 12))
        assert len(np.unique(f['images'])) > 10  # not a blank or saturated image
    for name in ('samples', 'progressive', 'same_xt', 'interpolation_ddpm', 'interpolation_ddim'):
        assert _png_shape(os.path.join(folder, f'{name}.png'))[0] >= 64
    # progressive: 8 rows of steps 3, 1, 0 of the 4-step chain (8 px images, upscaled ×8, pad 1).
    assert _png_shape(os.path.join(folder, 'progressive.png')) == ((8 * 9 + 1) * 8, (3 * 9 + 1) * 8)
    # interpolation: 6 pairs, each row a, λ = 0, 0.5, 1, b.
    assert _png_shape(os.path.join(folder, 'interpolation_ddim.png')) == ((6 * 9 + 1) * 8,
                                                                           (5 * 9 + 1) * 8)
    with open(os.path.join(folder, 'sampling_config.json'), encoding='utf-8') as f:
        assert json.load(f)['num_steps'] == 'ddim4'


def test_points_with_pc_sampler(tmp_path, random_params):
    config = _config(model_configs.swissroll_mlp(), method='pc', num_steps='10',
                     num_samples=40, batch_size=16, progressive=True, interpolation=True)
    folder = generate.run_resolved(config_validation.resolve(config, 'sample'), str(tmp_path))
    with np.load(os.path.join(folder, 'samples.npz')) as f:
        assert f['points'].dtype == np.float32 and f['points'].shape == (40, 2)
        assert np.all(np.isfinite(f['points'])) and 'labels' not in f
    assert _png_shape(os.path.join(folder, 'samples.png')) == (256, 256)
    num_panels = len(generate._progress_steps(10, 0))  # pylint: disable=protected-access
    assert _png_shape(os.path.join(folder, 'progressive.png')) == (256, 256 * num_panels)
    assert not os.path.exists(os.path.join(folder, 'interpolation_ddpm.png'))


def test_classifier_guidance_with_a_flax_classifier(tmp_path, random_params, monkeypatch):
    """The adapter's gradient is the classifier's ∇ log p(y|x_t), and run_sampling guides an
    unconditional model with it (the classifier run's loading is replaced by random init)."""
    classifier = models.get_model(model_configs.adm_classifier(
        image_size=8, num_classes=3, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1,
        attn_resolutions=(), num_head_channels=32, resblock_updown=False))
    variables = models.init_params(classifier, jax.random.key(1))
    grad_fn = guidance.classifier_grad_fn(classifier, variables)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    t, y = jnp.array([3, 30]), jnp.array([0, 2])
    want_fn = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(
        jax.nn.log_softmax(classifier.apply(variables, x, t)), y[:, None], axis=1)))
    got, want = jax.jit(lambda x: (grad_fn(x, t, y), want_fn(x)))(x)  # eager would take 10 s
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(generate, '_load_classifier', lambda config: (grad_fn, 3))
    config = _config(model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                             attn_resolutions=()), num_steps='ddim3',
                     num_samples=8, batch_size=8, classifier_scale=2.0, labels='1')
    folder = generate.run_resolved(config_validation.resolve(config, 'sample'), str(tmp_path))
    with np.load(os.path.join(folder, 'samples.npz')) as f:
        assert f['images'].shape == (8, 8, 8, 1)
        np.testing.assert_array_equal(f['labels'], np.ones(8))


def test_config_and_label_parsing():
    c = generate.default_sampling_config()
    assert c.method in ('ancestral', 'ddim', 'langevin', 'pc') and c.use_ema
    rng = np.random.default_rng(0)
    assert set(generate.parse_labels('', 10, 500, rng)) == set(range(10))
    np.testing.assert_array_equal(generate.parse_labels('3', 10, 4, rng), [3, 3, 3, 3])
    np.testing.assert_array_equal(generate.parse_labels([1, 2], 10, 3, rng), [1, 2, 1])
    with pytest.raises(ValueError, match='labels'):
        generate.parse_labels('10', 10, 3, rng)
    d = generate.respaced(GaussianDiffusion(np.linspace(1e-4, 0.02, 100)), 'ddim10')
    assert d.num_timesteps == 10 and list(d.timestep_map[:2]) == [0, 10]
