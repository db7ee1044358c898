"""Cold diffusion as a run: configs/digits_cold_blur.py trained end to end (tiny UNet, T = 10),
its stored config rebuilt by the run loader, --mode=sample's driver, and the mask run's start
states; config validation of the cold sampling fields."""
import json
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import cold, config_validation, generate, input_pipeline, train
from diffusion_jax import run as run_lib

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_cold_blur, digits_cold_mask, model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')


def tiny(config):
    config.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                           attn_resolutions=())
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=16, num_train_steps=6, log_every_steps=2,
                           checkpoint_every_steps=6, sample_every_steps=6, num_sample_images=8)
    config.optim.update(learning_rate=2e-3, warmup_steps=0)
    config.sampling.update(num_samples=8, batch_size=8)
    return config


def test_blur_run_trains_samples_and_reloads(tmp_path):
    workdir = str(tmp_path / 'run')
    state = train.train_and_evaluate(tiny(digits_cold_blur.get_config()), workdir)
    assert int(state.step) == 6
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        losses = [json.loads(line)['loss'] for line in f]
    # The L1 restoration loss: finite and falling.
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    grid = np.load(os.path.join(workdir, 'samples', '6', 'ema_grid.npz'))['images']
    assert grid.shape == (8, 8, 8, 1) and grid.dtype == np.uint8
    loaded = run_lib.load(workdir)
    assert isinstance(loaded.diffusion, cold.ColdDiffusion)
    assert loaded.diffusion.degradation == 'blur' and loaded.diffusion.num_timesteps == 10
    folder = generate.run_sampling(None, workdir)
    samples = np.load(os.path.join(folder, 'samples.npz'))['images']
    assert samples.shape == (8, 8, 8, 1)
    written = json.loads(pathlib.Path(folder, 'sampling_config.json').read_text())
    assert written['method'] == 'cold' and written['diffusion']['process'] == 'cold'
    # --mode=eval: restoration errors instead of an NLL; the floor is mean |D(x_0, T) - x_0|.
    from diffusion_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
    config = run_lib.with_mode_defaults(loaded.config)
    config.eval.update(batch_size=64, num_batches=2)
    res = evaluate.run_eval(config, workdir)['restoration']
    test = input_pipeline.get_dataset(loaded.config.data, 'test')
    x0 = jnp.asarray(test.get(np.arange(128))['image'])
    floor = jnp.mean(jnp.abs(loaded.diffusion.degrade(x0, jnp.full((128,), 10)) - x0))
    assert res['num_images'] == 128 and len(res['direct_l1_per_level']) == 10
    np.testing.assert_allclose(res['degraded_l1'], float(floor), rtol=1e-5)
    assert os.path.isfile(os.path.join(workdir, 'eval', 'restoration_6.json'))


def test_mask_run_restores_the_degraded_held_out_digits():
    config = tiny(digits_cold_mask.get_config())
    d = cold.create_for_config(config)
    prior = cold.run_prior(config, d)
    test = input_pipeline.get_dataset(config.data, config.eval.split)
    images = jnp.asarray(test.get(np.arange(len(test)))['image'])
    np.testing.assert_allclose(prior.states, d.degrade(images, jnp.full((len(test),), 10)),
                               atol=1e-6)
    assert isinstance(cold.run_prior(tiny(digits_cold_blur.get_config()),
                                     cold.create_for_config(tiny(digits_cold_blur.get_config()))),
                      cold.MeanPrior)


@pytest.mark.parametrize('field,value,match', [
    ('sampling.method', 'ddim', "sampling.method='ddim' cannot run on diffusion.process='cold'"),
    ('sampling.num_steps', 'ddim5', "sampling.num_steps='ddim5': cold diffusion restores"),
    ('diffusion.degradation', 'snow', "diffusion.degradation='snow' is not one of"),
])
def test_cold_config_errors_are_one_line(field, value, match):
    config = digits_cold_blur.get_config()
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        config_validation.resolve(config, 'sample')


def test_gaussian_run_refuses_the_cold_samplers():
    from configs import digits  # pylint: disable=import-outside-toplevel
    config = digits.get_config()
    config.sampling.method = 'cold'
    with pytest.raises(ValueError, match="sampling.method='cold' runs on diffusion.process="):
        config_validation.resolve(config, 'sample')


def test_random_centre_mask_reaches_the_train_step(tmp_path):
    """mask_center='random' trains (the centres drawn from the train step's key): the second
    step's loss, same initial parameters and levels, differs from the centred run's (the first
    does not: the zero-initialised output layer makes R = 0, whatever the input). The runs are
    deterministic, so equal centres would give bitwise-equal losses (measured: 0.0 at step 1,
    2.7e-5 apart at step 2)."""
    first = {}
    for center in ('center', 'random'):
        config = tiny(digits_cold_mask.get_config())
        config.diffusion.mask_center = center
        config.training.update(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                               sample_every_steps=0)
        workdir = str(tmp_path / center)
        train.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
            first[center] = [json.loads(line)['loss'] for line in f][1]
        stored = json.loads(pathlib.Path(workdir, 'config.json').read_text())
        assert stored['diffusion']['mask_center'] == center
        assert stored['diffusion']['image_shape'] == [8, 8, 1]
    assert np.isfinite(first['random']) and abs(first['random'] - first['center']) > 1e-6
