"""Every experiment config loads, builds its model from abstract shapes and agrees with itself."""
import importlib
import pathlib
import sys

import jax
import pytest

from diffusion_jax import config_validation, diffusion as diffusion_lib, models, timestep_sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import configs
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(ROOT))
    import configs

CONFIG_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                      if p.stem not in ('__init__', 'model_configs'))
SECTIONS = ('model', 'diffusion', 'data', 'training', 'optim', 'sampling', 'eval')


def all_variants():
    for name in CONFIG_FILES:
        module = importlib.import_module(f'configs.{name}')
        for arg in (None, *module.OPTIONS):
            yield pytest.param(name, arg, id=f'{name}:{arg}' if arg else name)


@pytest.mark.parametrize('name, arg', list(all_variants()))
def test_config_loads_and_builds_its_model_abstractly(name, arg):
    config = importlib.import_module(f'configs.{name}').get_config(arg)
    assert set(SECTIONS) <= set(config.keys()), name
    latent = bool(config.data.get('latents', ''))
    if latent:  # sized from the autoencoder run at resolution (tests/test_latents.py)
        vae = importlib.import_module('configs.digits_vae').get_config().model
        config.model.image_size = config.data.image_size // 2 ** (len(vae.block_out_channels) - 1)
        config.model.in_channels = vae.latent_channels
    model = models.get_model(config.model)
    shapes = models.param_shapes(model)  # jax.eval_shape: no parameters are computed
    assert models.count_params(shapes) > 0
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    timestep_sampling.init(config.diffusion.timestep_sampler, diffusion.num_timesteps)
    # Valid as shipped, for every mode: nothing derived differs from what the file sets.
    for mode in () if latent else ('train', 'sample', 'eval'):
        resolved = config_validation.resolve(config, mode)
        assert resolved.model.to_dict() == config.model.to_dict(), (name, mode)
    assert config.training.batch_size % 8 == 0  # splits over 8 devices
    assert jax.tree.leaves(shapes)[0].dtype == 'float32'


def test_paper_numbers():
    cifar10 = importlib.import_module('configs.cifar10').get_config()
    assert models.count_params(models.param_shapes(models.get_model(cifar10.model))) == 35_746_307
    assert (cifar10.optim.learning_rate, cifar10.optim.warmup_steps, cifar10.optim.grad_clip,
            cifar10.training.batch_size, cifar10.training.ema_decay,
            cifar10.training.num_train_steps, cifar10.model.dropout) == (
                2e-4, 5000, 1.0, 128, 0.9999, 800_000, 0.1)
    assert cifar10.diffusion.model_var_type == 'fixed_large' and cifar10.data.random_flip
    improved = importlib.import_module('configs.cifar10_improved')
    hybrid, vlb = improved.get_config(), improved.get_config('vlb')
    assert (hybrid.diffusion.num_timesteps, hybrid.diffusion.beta_schedule,
            hybrid.diffusion.loss_type, hybrid.model.dropout) == (4000, 'cosine', 'hybrid', 0.3)
    assert (vlb.diffusion.loss_type, vlb.diffusion.timestep_sampler) == (
        'rescaled_kl', 'loss_aware')


def test_flow_and_edm_cifar10_numbers():
    """configs/cifar10_edm.py: EDM Table 1 and the CIFAR-10 column of Table 7 in steps of 512
    (200 Mimg, 10 Mimg ramp-up, EMA half-life 0.5 Mimg); configs/cifar10_flow.py: SD3's
    logit-normal(0, 1) velocity flow; both on Ho et al.'s 35,746,307-parameter network, valid
    for every mode (test_config_loads_and_builds_its_model_abstractly) and building their
    process and sampler."""
    from diffusion_jax import processes
    edm = importlib.import_module('configs.cifar10_edm').get_config()
    flow = importlib.import_module('configs.cifar10_flow').get_config()
    for config in (edm, flow):
        assert models.count_params(models.param_shapes(models.get_model(config.model))) == \
            35_746_307
    process = processes.get_process(edm.diffusion)
    assert (process.sigma_min, process.sigma_max, process.sigma_data, process.rho,
            process.p_mean, process.p_std) == (0.002, 80.0, 0.5, 7.0, -1.2, 1.2)
    assert edm.training.batch_size * edm.training.num_train_steps == 200_000_000
    assert abs(edm.training.batch_size * edm.optim.warmup_steps - 10_000_000) < 512
    half_life_steps = 0.5e6 / edm.training.batch_size
    assert abs(edm.training.ema_decay ** half_life_steps - 0.5) < 1e-3
    assert (edm.optim.learning_rate, edm.optim.grad_clip, edm.model.dropout,
            edm.sampling.method, edm.sampling.num_steps) == (1e-3, 0.0, 0.13, 'heun', '18')
    process = processes.get_process(flow.diffusion)
    assert (process.prediction, process.time_sampling, process.logit_mean, process.logit_std,
            process.shift, flow.sampling.method) == ('velocity', 'logit_normal', 0.0, 1.0, 1.0,
                                                     'euler')
    for config in (edm, flow):
        process.check_method(config.sampling.method)


def test_unknown_config_argument_is_an_error():
    with pytest.raises(ValueError, match="unknown config argument.*'runlocal'"):
        importlib.import_module('configs.digits').get_config('runlcoal')


def test_runlocal_shrinks_the_model():
    module = importlib.import_module('configs.lsun')
    small, full = (models.count_params(models.param_shapes(models.get_model(c.model)))
                   for c in (module.get_config('runlocal'), module.get_config()))
    assert small < full / 100
    assert configs.parse_arg('bedroom,runlocal', module.OPTIONS, 'lsun') == {'bedroom', 'runlocal'}
