"""Latent diffusion end to end at tiny size: an autoencoder trained through the train loop, a DiT
trained on its latents (on the fly and from the encode CLI's cache), decoded samples, latent
bits/dim, and the refusals of a latent run without an autoencoder."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_latent_dit, digits_vae, model_configs
from diffusion_jax import encode, input_pipeline, latents, run, sharding, train
from diffusion_jax.evaluation import evaluate
from diffusion_jax import generate
from diffusion_jax.samplers import batches

pytestmark = pytest.mark.usefixtures('fast_compiles')
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _vae_config():
    config = digits_vae.get_config()
    config.model.update(block_out_channels=(8, 16), norm_num_groups=4)  # f = 2, 4x4x2 latents
    config.model.scaling_factor = 0.7  # s ≠ 1 so that a missing factor would show
    config.training.update(batch_size=16, num_train_steps=4, log_every_steps=2,
                           checkpoint_every_steps=4)
    config.optim.warmup_steps = 0
    return config


def _dit_config(vae_dir, **data):
    config = digits_latent_dit.get_config()
    config.model = model_configs.tiny_dit(image_size=None, in_channels=None, num_classes=0,
                                          learn_sigma=False, patch_size=1, depth=1)
    config.data.latents = vae_dir
    config.data.latent_scale = 0.0  # the autoencoder's model.scaling_factor (0.7)
    config.data.update(data)
    config.diffusion.update(num_timesteps=10, beta_start=1e-3, beta_end=0.2)
    config.training.update(batch_size=16, num_train_steps=2, log_every_steps=1,
                           checkpoint_every_steps=2, sample_every_steps=2, num_sample_images=8)
    config.optim.warmup_steps = 0
    config.sampling.update(num_samples=8, batch_size=8)
    config.eval.update(batch_size=16, num_batches=1, nll_estimator='sampled',
                       nll_timesteps_per_image=2)
    return config


@pytest.fixture(scope='module')
def vae(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('vae'))
    train.train_and_evaluate(_vae_config(), workdir)
    return workdir


@pytest.fixture(scope='module')
def images():
    config = digits_latent_dit.get_config()
    return input_pipeline.get_dataset(config.data, 'train').get(np.arange(16))


def test_autoencoder_loss_is_l1_plus_beta_kl_of_torch():
    """train._autoencoder_loss = Σ|x - decode(μ + σε)| + β Σ KL(N(μ, σ²) || N(0, 1)), the KL
    from torch.distributions."""
    import torch  # pylint: disable=import-outside-toplevel
    config = _vae_config()
    from diffusion_jax import models
    model = models.get_model(config.model)
    params = models.init_params(model, jax.random.key(1))['params']
    x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1), minval=-1, maxval=1)
    rng, beta = jax.random.key(3), 0.01
    loss, terms = train._autoencoder_loss(model, x, rng, 'l1', beta, params)
    mean, logvar = model.apply({'params': params}, x, method='encode')
    eps = jax.random.normal(rng, mean.shape)
    x_hat = model.apply({'params': params}, mean + jnp.exp(0.5 * logvar) * eps, method='decode')
    std = torch.from_numpy(np.exp(0.5 * np.asarray(logvar, np.float64)))
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.from_numpy(np.asarray(mean, np.float64)), std),
        torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).numpy()
    want = np.abs(np.asarray(x - x_hat)).sum(axis=(1, 2, 3)) + beta * kl
    np.testing.assert_allclose(terms['kl'], kl, rtol=1e-5)
    np.testing.assert_allclose(terms['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


def test_resolution_sizes_the_model_from_the_autoencoder(vae):
    config = run.resolve_config('', _dit_config(vae), mode='train')
    assert (config.data.latent_size, config.data.latent_channels) == (4, 2)
    assert (config.model.image_size, config.model.in_channels) == (4, 2)
    assert config.data.latent_scale == pytest.approx(0.7)
    config = run.resolve_config('', _dit_config(vae, latent_scale=2.5), mode='train')
    assert config.data.latent_scale == 2.5  # data.latent_scale overrides the factor


def test_on_the_fly_batch_is_scaled_mean_plus_sigma_eps(vae, images):
    ae = latents.load(vae)
    key = jax.random.key(7)
    got = latents.make_batch_encoder(ae)(dict(images), key)['image']
    mean, logvar = ae.model.apply(ae.variables, images['image'], method='encode')
    eps = jax.random.normal(key, mean.shape)
    want = 0.7 * (mean + np.exp(0.5 * np.asarray(logvar)) * eps)
    assert got.shape == (16, 4, 4, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(np.std(logvar)) > 0 and not np.allclose(got, 0.7 * mean)  # the noise is there
    # K stacked batches [K, B, ...] (training.steps_per_call) encode as one flat batch.
    stacked = {'image': images['image'].reshape(2, 8, 8, 8, 1)}
    np.testing.assert_allclose(latents.make_batch_encoder(ae)(stacked, key)['image'].reshape(
        16, 4, 4, 2), got, rtol=1e-5, atol=1e-6)
    # The decoder undoes the scale: decode(s·μ) is the autoencoder's reconstruction decode(μ).
    np.testing.assert_allclose(
        latents.make_decoder(ae)(0.7 * mean),
        np.clip(ae.model.apply(ae.variables, images['image']), -1, 1), rtol=1e-4, atol=1e-5)


def test_cache_equals_on_the_fly_mean_and_trains_the_same(vae, tmp_path):
    config = _dit_config(vae, latent_noise=False)
    out = str(tmp_path / 'cache.npz')
    stats = encode.encode_dataset(vae, config.data, out, batch_size=100)
    data = np.load(out)
    ds = input_pipeline.get_dataset(config.data, 'train')
    assert data['mean'].shape == (len(ds), 4, 4, 2) and stats['num_examples'] == len(ds)
    ae = latents.load(vae)
    idx = np.arange(0, len(ds), 97)
    flight = latents.make_batch_encoder(ae, noise=False)(ds.get(idx), None)['image']
    np.testing.assert_allclose(0.7 * data['mean'][idx], flight, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(data['label'][idx], ds.get(idx)['label'])
    # A whole run from the cache trains the parameters of the run encoding on the fly.
    a = train.train_and_evaluate(config, str(tmp_path / 'fly'))
    cached = _dit_config(vae, latent_noise=False, latents_cache=out)
    cached.training.sample_every_steps = 0
    b = train.train_and_evaluate(cached, str(tmp_path / 'cache'))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_latent_run_samples_decoded_pixels_and_latent_bpd(vae, tmp_path):
    workdir = str(tmp_path / 'dit')
    train.train_and_evaluate(_dit_config(vae), workdir)
    grid = np.load(os.path.join(workdir, 'samples', '2', 'ema_grid.npz'))['images']
    assert grid.shape == (8, 8, 8, 1) and grid.dtype == np.uint8  # pixels, not 4x4x2 latents
    folder = generate.run_sampling(None, workdir)
    assert np.load(os.path.join(folder, 'samples.npz'))['images'].shape == (8, 8, 8, 1)
    # The sampler's pixels are the decoder's image of the chain's latents, within [-1, 1].
    loaded = run.load(workdir)
    decoder = latents.make_decoder(latents.for_config(loaded.config))
    sampler, shape = batches.build_sampler(loaded.config, loaded.variables, sharding.make_mesh(),
                                           decoder=decoder)
    assert shape == (4, 4, 2)
    out = sampler.sample(jax.random.key(0), (8, *shape))
    assert out['latents'].shape == (8, 4, 4, 2) and out['samples'].shape == (8, 8, 8, 1)
    np.testing.assert_allclose(out['samples'], decoder(out['latents']), atol=1e-6)
    assert float(jnp.min(out['samples'])) >= -1 and float(jnp.max(out['samples'])) <= 1
    result = evaluate.run_eval(None, workdir)['nll']
    assert result['bits_per_dim_of'] == 'latent' and 'not image bits/dim' in result['note']
    written = json.loads(pathlib.Path(workdir, 'eval', 'nll_2.json').read_text())
    assert written['bits_per_dim_of'] == 'latent'


@pytest.mark.parametrize('kind', ['missing', 'not_autoencoder'])
def test_latent_run_without_an_autoencoder_is_one_line_and_writes_nothing(vae, tmp_path, kind):
    target = str(tmp_path / 'nothing')
    if kind == 'not_autoencoder':  # a run, but a DiT's: its config.json says model.name='dit'
        target = str(tmp_path / 'notvae')
        os.makedirs(target)
        pathlib.Path(target, 'config.json').write_text(
            json.dumps({'model': {'name': 'dit'}}))
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError, match=r'^data\.latents=.*autoencoder') as e:
        train.train_and_evaluate(_dit_config(target), str(workdir))
    assert '\n' not in str(e.value) and not workdir.exists()


def test_encode_cli_refuses_a_non_autoencoder_in_one_line(tmp_path):
    target = tmp_path / 'notvae'
    target.mkdir()
    (target / 'config.json').write_text(json.dumps({'model': {'name': 'unet'}}))
    out = tmp_path / 'cache.npz'
    proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.encode', f'--workdir={target}',
                           f'--config={ROOT / "configs" / "digits_latent_dit.py"}',
                           f'--out={out}'], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 1
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and "model.name='unet'" in errors[0], proc.stderr
    assert not out.exists()


def test_guidance_channels_guide_the_first_k_and_keep_the_rest_conditional():
    """DiT's forward_with_cfg: channels [:k] of ε guided, [k:C] and the variance conditional."""
    from diffusion_jax import guidance
    null = 5

    def apply(variables, x, t, y):  # C = 4 mean channels + 4 variance channels, label-dependent
        scale = (y.astype(jnp.float32) + 1.0).reshape(-1, 1, 1, 1)
        return jnp.concatenate([x * scale + variables['b'], x - scale], axis=-1)

    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    t, y, w, v = jnp.zeros((2,), jnp.int32), jnp.array([1, 2]), 1.5, {'b': 0.3}
    cond, uncond = apply(v, x, t, y), apply(v, x, t, jnp.full_like(y, null))
    full = (1 + w) * cond[..., :4] - w * uncond[..., :4]
    out = guidance.classifier_free_model_fn(apply, v, y, w, null, channels=3)(x, t)
    np.testing.assert_allclose(out[..., :3], full[..., :3], rtol=1e-6)
    np.testing.assert_allclose(out[..., 3:], cond[..., 3:], rtol=1e-6)  # ε_4 and Σ conditional
    assert not np.allclose(full[..., 3], cond[..., 3])  # so the test can tell them apart
    for k in (0, 4):  # 0 and C: every channel guided
        np.testing.assert_allclose(
            guidance.classifier_free_model_fn(apply, v, y, w, null, channels=k)(x, t)[..., :4],
            full, rtol=1e-6)


def test_guidance_channels_beyond_the_model_is_one_line():
    from configs import digits
    config = digits.get_config()
    config.sampling.guidance_channels = 2  # the digits UNet has 1 channel
    with pytest.raises(ValueError, match=r'^sampling\.guidance_channels=2 must lie in \[0, '):
        run.resolve_config('', config, mode='train')
