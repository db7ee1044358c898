"""`--mode=edit` on a run (a tiny digits UNet made with run.create, T = 10): the files it writes,
the kept pixels equal to the input, the reported reconstruction error, and bad input refused
in one line with nothing written."""
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import edit, image_utils, models
from diffusion_jax import main as main_lib
from diffusion_jax import run as run_lib

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits, model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """(workdir, images.npz): a run of randomly initialised parameters and 8 test digits."""
    folder = tmp_path_factory.mktemp('edit')
    config = digits.get_config()
    config.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                           attn_resolutions=())
    config.diffusion.update(num_timesteps=10, beta_start=5e-3, beta_end=0.3)
    params = models.init_params(models.get_model(config.model), jax.random.key(0))
    workdir = str(folder / 'run')
    run_lib.create(workdir, config, params)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    path = str(folder / 'in.npz')
    np.savez(path, images=images, labels=np.arange(8) % 10)
    return workdir, path, images


def edit_config(workdir, **fields):
    config = run_lib.with_mode_defaults(run_lib.Run(workdir).config)
    config.edit.update(batch_size=8, **fields)
    return config


def test_repaint_writes_the_edit_and_keeps_the_known_pixels(run_dir):
    workdir, path, images = run_dir
    folder = main_lib.run(edit_config(workdir, images=path, method='repaint', mask='right_half',
                                      jump_length=2, jump_n_sample=2), workdir, 'edit')
    assert folder == os.path.join(workdir, 'edits', '0')
    with np.load(os.path.join(folder, 'edited.npz')) as f:
        out = dict(f)
    assert set(out) == {'images', 'originals', 'masks', 'labels'}
    np.testing.assert_array_equal(out['originals'], images)
    assert np.array_equal(out['images'][:, :, :4], images[:, :, :4])  # kept: the left half
    assert not np.array_equal(out['images'][:, :, 4:], images[:, :, 4:])  # generated
    np.testing.assert_array_equal(out['masks'][0, :, :, 0],
                                  np.repeat([[1] * 4 + [0] * 4], 8, axis=0))
    assert os.path.getsize(os.path.join(folder, 'edited.png')) > 0
    written = json.loads(pathlib.Path(folder, 'edit_config.json').read_text())
    assert written['method'] == 'repaint' and written['step'] == 0


def test_ddim_edit_reports_the_inversion_error(run_dir):
    workdir, path, images = run_dir
    folder = main_lib.run(edit_config(workdir, images=path, method='ddim_edit'), workdir, 'edit')
    with np.load(os.path.join(folder, 'edited.npz')) as f:
        out = dict(f)
    x = image_utils.from_uint8(images)
    # No change: the edit is the reconstruction, so its RMS error against the input is the
    # reported one (to the uint8 rounding of the output).
    rms = np.sqrt(np.mean(np.square(image_utils.from_uint8(out['images']) - x), axis=(1, 2, 3)))
    np.testing.assert_allclose(rms, out['reconstruction_error'], atol=0.01)
    written = json.loads(pathlib.Path(folder, 'edit_config.json').read_text())
    np.testing.assert_allclose(written['reconstruction_rms_mean'],
                               np.mean(out['reconstruction_error']), rtol=1e-6)


@pytest.mark.parametrize('fields,match', [
    (dict(method='sdedit', strength=0.0), 'edit.strength=0.0 must be in'),
    (dict(mask='diagonal'), "edit.mask='diagonal' is not a mask"),
    (dict(method='ddim_edit', target_label=3), 'edit.target_label=3 needs a class-conditional'),
    (dict(method='inpaint'), "edit.method='inpaint' is not an edit"),
])
def test_bad_edit_fields_are_refused(run_dir, fields, match):
    workdir, path, _ = run_dir
    before = sorted(str(p) for p in pathlib.Path(workdir).rglob('*'))
    with pytest.raises(ValueError, match=match):
        main_lib.run(edit_config(workdir, images=path, **fields), workdir, 'edit')
    assert sorted(str(p) for p in pathlib.Path(workdir).rglob('*')) == before


def test_images_and_masks_of_another_shape_are_refused(run_dir, tmp_path):
    workdir, path, _ = run_dir
    big = str(tmp_path / 'big.npz')
    np.savez(big, images=np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match=r"edit.images='.*big.npz' holds uint8 \(2, 16, 16, 1\)"):
        edit.read_images(edit_config(workdir, images=big))
    masks = str(tmp_path / 'm.npz')
    np.savez(masks, masks=np.ones((8, 4, 4)))
    with pytest.raises(ValueError, match=r"edit.mask='.*m.npz' holds masks \(8, 4, 4, 1\)"):
        edit.read_masks(edit_config(workdir, images=path, mask=masks), (8, 8, 8, 1))
    with pytest.raises(ValueError, match="edit.images='' is empty"):
        edit.read_images(edit_config(workdir))


def test_target_label_with_a_classifier_is_the_guided_ddim_edit(run_dir, tmp_path):
    """edit.target_label on the unconditional run with sampling.classifier_scale and a noisy
    classifier run: the written edit is the library's ddim_edit decoded with that classifier's
    guidance towards the target (the guided sampler's path), and differs from the unguided
    reconstruction."""
    from configs import digits_classifier  # pylint: disable=import-outside-toplevel
    workdir, path, images = run_dir
    clf_config = digits_classifier.get_config()
    clf_model = models.get_model(clf_config.model)
    params = models.init_params(clf_model, jax.random.key(5))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    clf_dir = str(tmp_path / 'clf')
    run_lib.create(clf_dir, clf_config, params)
    config = edit_config(workdir, images=path, method='ddim_edit', target_label=3)
    config.sampling.update(classifier_scale=30.0, classifier_workdir=clf_dir)
    folder = main_lib.run(config, workdir, 'edit')
    with np.load(os.path.join(folder, 'edited.npz')) as f:
        out = dict(f)
    np.testing.assert_array_equal(out['target_labels'], np.full(8, 3))
    from diffusion_jax import guidance, samplers  # pylint: disable=import-outside-toplevel
    loaded, clf = run_lib.load(workdir), run_lib.load(clf_dir)
    fn = guidance.bind_model(loaded.model.apply, loaded.variables)
    g = guidance.classifier_guidance(guidance.classifier_grad_fn(clf.model, clf.variables),
                                     jnp.full((8,), 3), 30.0)
    x = jnp.asarray(image_utils.from_uint8(images))
    lib = samplers.ddim_edit(loaded.diffusion, fn, x, edit_guidance=g)
    want = image_utils.to_uint8(np.asarray(lib['edited']))
    assert np.max(np.abs(out['images'].astype(int) - want.astype(int))) <= 1
    recon = image_utils.to_uint8(np.asarray(lib['reconstruction']))
    assert np.mean(np.abs(out['images'].astype(int) - recon.astype(int))) > 2
