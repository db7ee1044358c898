"""`--mode=edit` on flow, EDM and latent runs (tiny networks, perturbed random parameters, made
with run.create): the edit equals the library path on the process (samplers.repaint / sdedit /
ddim_edit with the run's process and grid), the kept pixels equal the input exactly, and a
latent run writes decoded pixels (its RePaint mask min-pooled to the latent grid)."""
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import edit, guidance, image_utils, latents, models, processes, samplers
from diffusion_jax import main as main_lib
from diffusion_jax import run as run_lib

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_edm, digits_flow, digits_latent_dit, digits_vae, model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _perturbed(params, seed):
    """Random parameters with the zero-initialised output layers made nonzero (an edit of a
    zero network would not depend on the chain)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])


def _images(folder):
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    path = str(folder / 'in.npz')
    np.savez(path, images=images, labels=np.arange(8) % 10)
    return path, images


@pytest.fixture(scope='module', params=['flow', 'edm'])
def process_run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    config = (digits_flow if request.param == 'flow' else digits_edm).get_config()
    config.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                           attn_resolutions=())
    config.sampling.num_steps = '6'
    model = models.get_model(config.model)
    params = _perturbed(models.init_params(model, jax.random.key(0)), 1)
    workdir = str(folder / 'run')
    run_lib.create(workdir, config, params)
    return (workdir, *_images(folder))


def _edit_config(workdir, **fields):
    config = run_lib.with_mode_defaults(run_lib.Run(workdir).config)
    config.edit.update(batch_size=8, **fields)
    return config


def _library(workdir, method, x, **kwargs):
    """The edit through the library: the run's process, its model bound as the samplers bind
    it, K = sampling.num_steps, the mode's key for batch 0."""
    loaded = run_lib.load(workdir)
    fn = guidance.bind_model(loaded.model.apply, loaded.variables)
    proc = processes.get_process(loaded.config.diffusion)
    key = jax.random.fold_in(jax.random.key(0), 0)
    k = int(loaded.config.sampling.num_steps)
    clip = bool(loaded.config.sampling.clip_denoised)
    if method == 'repaint':
        return samplers.repaint(proc, fn, key, x, kwargs['mask'], num_steps=k, jump_length=2,
                                jump_n_sample=2, clip_denoised=clip)
    if method == 'sdedit':
        return samplers.sdedit(proc, fn, key, x, 0.5, num_steps=k, method='ancestral',
                               clip_denoised=clip)
    return samplers.ddim_edit(proc, fn, x, num_steps=k)['edited']


@pytest.mark.parametrize('method', ['repaint', 'sdedit', 'ddim_edit'])
def test_process_run_edit_is_the_library_edit_on_the_process(process_run, method):
    workdir, path, images = process_run
    fields = dict(images=path, method=method)
    if method == 'repaint':
        fields.update(mask='right_half', jump_length=2, jump_n_sample=2)
    folder = main_lib.run(_edit_config(workdir, **fields), workdir, 'edit')
    with np.load(os.path.join(folder, 'edited.npz')) as f:
        out = dict(f)
    x = jnp.asarray(image_utils.from_uint8(images))
    mask = jnp.asarray(samplers.make_mask('right_half', images.shape))
    want = image_utils.to_uint8(np.asarray(_library(workdir, method, x, mask=mask)))
    if method == 'repaint':
        assert np.array_equal(out['images'][:, :, :4], images[:, :, :4])  # kept: exactly
        want = np.where(np.asarray(mask) == 1, images, want)
    # The same program up to XLA's batch-dependent rounding: uint8 values within 1.
    assert np.max(np.abs(out['images'].astype(int) - want.astype(int))) <= 1
    assert not np.array_equal(out['images'], images)  # an edit
    if method == 'ddim_edit':
        assert 'reconstruction_error' in out and np.all(np.isfinite(out['reconstruction_error']))


def test_process_run_refuses_a_sampler_it_cannot_run(process_run):
    workdir, path, _ = process_run
    before = sorted(str(p) for p in pathlib.Path(workdir).rglob('*'))
    with pytest.raises(ValueError, match=r"edit.sdedit_method='langevin' cannot run on "
                                         r"diffusion.process="):
        main_lib.run(_edit_config(workdir, images=path, method='sdedit', sdedit_method='langevin'),
                     workdir, 'edit')
    assert sorted(str(p) for p in pathlib.Path(workdir).rglob('*')) == before


# ----------------------------------------------------------------------------------------------
# Latent runs
# ----------------------------------------------------------------------------------------------
def test_latent_mask_keeps_a_cell_only_where_all_its_pixels_are_kept():
    mask = np.ones((1, 4, 4, 1), np.float32)
    mask[0, 0, 1] = 0  # one pixel of the top-left 2x2 block
    mask[0, 2:, 2:] = 0  # the whole bottom-right block
    np.testing.assert_array_equal(edit.latent_mask(mask, (1, 2, 2, 3))[0, :, :, 0],
                                  [[0, 1], [1, 0]])
    half = samplers.make_mask('right_half', (2, 8, 8, 1))
    np.testing.assert_array_equal(edit.latent_mask(half, (2, 4, 4, 2))[0, :, :, 0],
                                  np.repeat([[1, 1, 0, 0]], 4, axis=0))


@pytest.fixture(scope='module')
def latent_run(tmp_path_factory):
    """A random autoencoder (f = 2: 8x8x1 pixels <-> 4x4x2 latents) and a tiny latent DiT."""
    folder = tmp_path_factory.mktemp('latent')
    vae = digits_vae.get_config()
    vae.model.update(block_out_channels=(8, 16), norm_num_groups=4)
    vae_dir = str(folder / 'vae')
    run_lib.create(vae_dir, vae, _perturbed(models.init_params(models.get_model(vae.model),
                                                               jax.random.key(2)), 3))
    config = digits_latent_dit.get_config()
    config.model = model_configs.tiny_dit(image_size=None, in_channels=None, num_classes=0,
                                          learn_sigma=False, patch_size=1, depth=1)
    config.data.latents = vae_dir
    config.diffusion.update(num_timesteps=10, beta_start=1e-3, beta_end=0.2)
    config = run_lib.resolve_config('', config, mode='train')
    model = models.get_model(config.model)
    workdir = str(folder / 'run')
    run_lib.create(workdir, config, _perturbed(models.init_params(model, jax.random.key(4)), 5))
    return (workdir, *_images(folder))


def test_latent_run_repaints_in_latent_space_and_writes_decoded_pixels(latent_run):
    workdir, path, images = latent_run
    folder = main_lib.run(_edit_config(workdir, images=path, method='repaint', mask='right_half',
                                       jump_length=2, jump_n_sample=2), workdir, 'edit')
    with np.load(os.path.join(folder, 'edited.npz')) as f:
        out = dict(f)
    assert out['images'].shape == (8, 8, 8, 1) and out['images'].dtype == np.uint8  # pixels
    assert np.array_equal(out['images'][:, :, :4], images[:, :, :4])  # kept pixels: exactly
    # The library path: encode (s·μ), RePaint of the latents under the min-pooled mask, decode.
    loaded = run_lib.load(workdir)
    ae = latents.for_config(loaded.config)
    z = latents.make_batch_encoder(ae, noise=False)(
        {'image': jnp.asarray(image_utils.from_uint8(images))}, None)['image']
    assert z.shape == (8, 4, 4, 2)
    mask = samplers.make_mask('right_half', images.shape)
    fn = guidance.bind_model(loaded.model.apply, loaded.variables)
    edited = samplers.repaint(loaded.diffusion, fn, jax.random.fold_in(jax.random.key(0), 0), z,
                              jnp.asarray(edit.latent_mask(mask, z.shape)), jump_length=2,
                              jump_n_sample=2, clip_denoised=False)
    want = image_utils.to_uint8(np.asarray(latents.make_decoder(ae)(edited)))
    want = np.where(mask == 1, images, want)
    assert np.max(np.abs(out['images'].astype(int) - want.astype(int))) <= 1
    assert not np.array_equal(out['images'][:, :, 4:], images[:, :, 4:])
