"""Options a sampler does not read are refused in one line; a multistep solver asked for evenly
strided steps gets one warning naming logsnrN / karrasN (samplers.options).

Truths: (1) what each method declares it reads (register_sampler(reads=...)) is what changes its
samples: every Gaussian-chain method is run with each option at its default and away from it,
and its output changes exactly when the option is declared read (the guidance order's readers
are tested in test_guidance_order.py; here its non-readers must be unchanged); (2) the command
path: --mode=train / sample refuse an unread option with the exact line and write nothing, and a
whole --mode=sample of a run logs the spacing warning once for dpmpp_2m on 'ddim10' (two batches)
and never for 'logsnr10'.
"""
import logging as std_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from configs import digits, swissroll, model_configs
from diffusion_jax import defaults, main, models, run, samplers
from diffusion_jax.samplers import options
from test_guidance_order import D as GUIDED_CHAIN, MU as GUIDED_MU, constant_grad
from test_guidance_order import gaussian_eps as guided_eps
from test_samplers import gaussian_model, spaced

pytestmark = pytest.mark.usefixtures('fast_compiles')

CHAIN_METHODS = tuple(m for m in samplers.METHODS if m not in ('cold', 'cold_naive',
                                                               'consistency'))
# A value away from the default for each option that changes the samples when it is read.
CHANGED = {'eta': 0.7, 'langevin_snr': 0.3, 'langevin_steps': 2, 'dynamic_threshold': 0.6}


def test_the_not_used_values_are_the_config_defaults():
    sampling = defaults.default_sampling_config()
    assert {f: sampling[f] for f in options.METHOD_FIELDS} == options.METHOD_FIELDS


@pytest.mark.parametrize('method', CHAIN_METHODS)
def test_declared_reads_are_what_changes_the_samples(method):
    # N(4μ, s²) data: x̂_0 leaves [-1, 1], so dynamic thresholding acts where it is read.
    d, model = spaced('ddim10'), gaussian_model(mu=4 * np.array(
        [0.3, -0.5, 0.0, 0.7, 0.1, -0.2, 0.4, -0.8]))
    run_ = lambda **kw: np.asarray(samplers.sample(  # noqa: E731
        d, model, jax.random.key(0), (8, 8), method=method, clip_denoised=False, **kw)['samples'])
    base = run_()
    for field, value in CHANGED.items():
        changed = not np.allclose(run_(**{field: value}), base, rtol=1e-6, atol=1e-6)
        assert changed == (field in options.fields_read(method)), (method, field)
    if 'ddim_guidance' not in options.fields_read(method):
        guide = samplers.classifier_guidance(constant_grad, jnp.zeros(8, jnp.int32), 1.0)
        guided = [np.asarray(samplers.sample(
            GUIDED_CHAIN, Partial(guided_eps, jnp.asarray(GUIDED_MU)), jax.random.key(0),
            (8, GUIDED_MU.size), method=method, guidance=guide, ddim_guidance=order)['samples'])
            for order in ('eps_shift', 'condition_score')]
        np.testing.assert_array_equal(guided[0], guided[1])


def _digits(**sampling):
    config = digits.get_config()
    with config.unlocked():
        config.sampling.update(sampling)
    return config, {f'sampling.{k}': v for k, v in sampling.items()}


@pytest.mark.parametrize('sampling, message', [
    (dict(method='dpmpp_2m', eta=0.5),
     "sampling.eta=0.5 is not read by sampling.method='dpmpp_2m': it would be ignored; use "
     "method 'ddim' for it, or set sampling.eta=0.0 (its default)."),
    (dict(method='ddim', langevin_steps=3),
     "sampling.langevin_steps=3 is not read by sampling.method='ddim': it would be ignored; use "
     "method 'langevin' or 'pc' for it, or set sampling.langevin_steps=1 (its default)."),
    (dict(method='ancestral', ddim_guidance='eps_shift'),
     "sampling.ddim_guidance='eps_shift' is not read by sampling.method='ancestral': it would be "
     "ignored; use method 'ddim' or 'dpmpp_2m' or 'dpmpp_3m' or 'unipc' or 'heun' for it, or set "
     "sampling.ddim_guidance='auto' (its default)."),
    (dict(method='heun', s_churn=1.0),
     "sampling.s_churn=1.0 is not read by sampling.method='heun': it would be ignored; set "
     'sampling.s_churn=0.0 (its default).'),
], ids=['eta_dpmpp_2m', 'langevin_steps_ddim', 'ddim_guidance_ancestral', 's_churn_gaussian'])
def test_an_unread_option_is_one_line_and_writes_nothing(tmp_path, capsys, sampling, message):
    config, typed = _digits(**sampling)
    workdir = tmp_path / 'run'
    with pytest.raises(SystemExit) as exit_:
        main.execute(config, str(workdir), 'train', typed, verbosity=0)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f'error: {message}']
    assert not workdir.exists()


def test_options_the_method_reads_and_modes_that_do_not_sample_are_accepted():
    from diffusion_jax import config_validation  # pylint: disable=import-outside-toplevel
    for sampling in (dict(method='ddim', eta=0.5), dict(method='pc', langevin_steps=3),
                     dict(method='unipc', ddim_guidance='condition_score')):
        config_validation.resolve(_digits(**sampling)[0], 'sample')
    config, _ = _digits(method='dpmpp_2m', eta=0.5)
    config_validation.resolve(config, 'eval')  # the NLL alone draws no samples
    with config.unlocked():
        config.eval.sample_quality = True
    with pytest.raises(ValueError, match=r"^sampling.eta=0.5 is not read"):
        config_validation.resolve(config, 'eval')


def test_flow_and_edm_read_only_heuns_churn():
    for process in ('flow', 'edm'):
        assert options.fields_read('heun', process) == ('s_churn', 's_tmin', 's_tmax', 's_noise')
        sampling = dict(defaults.default_sampling_config(), method='dpmpp_2m',
                        dynamic_threshold=0.9)
        with pytest.raises(ValueError, match=f"^sampling.dynamic_threshold=0.9 is not read by "
                                             f"sampling.method='dpmpp_2m' on diffusion.process="
                                             f"'{process}'"):
            options.check_method_options(sampling, process)


@pytest.mark.parametrize('num_steps, strided', [
    ('ddim10', True), ('10', True), (10, True), ('linspace10', True), ('3,3,4', True),
    ('logsnr10', False), ('karras10', False), ('trailing10', False), ('', False)])
def test_which_spacings_are_evenly_strided(num_steps, strided):
    assert options.is_evenly_strided(num_steps) == strided
    warning = options.spacing_warning('dpmpp_2m', num_steps, 1000)
    assert (warning is not None) == strided
    assert options.spacing_warning('ddim', num_steps, 1000) is None  # DDIM is not multistep
    assert options.spacing_warning('heun', num_steps, 1000) is None
    if strided:
        assert "'logsnr10' or 'karras10'" in warning
    # Every step of the chain kept: nothing is skipped, nothing to warn about.
    assert options.spacing_warning('unipc', '1000', 1000) is None


@pytest.fixture(scope='module')
def swissroll_run(tmp_path_factory):
    config = swissroll.get_config()
    with config.unlocked():
        config.model = model_configs.swissroll_mlp(hidden_dim=16, num_layers=1)
        config.diffusion.num_timesteps = 40
        config.sampling.update(batch_size=16, num_samples=20)
    workdir = str(tmp_path_factory.mktemp('mlp'))
    run.create(workdir, config, models.init_params(models.get_model(config.model),
                                                   jax.random.key(0)))
    return workdir


@pytest.mark.parametrize('num_steps, warnings', [('ddim10', 1), ('logsnr10', 0)])
def test_the_spacing_warning_appears_once_per_command(swissroll_run, caplog, num_steps,
                                                      warnings):
    config = run.Run(swissroll_run).config
    typed = {'sampling.method': 'dpmpp_2m', 'sampling.num_steps': num_steps,
             'sampling.checkpoint_step': 0}
    with config.unlocked():
        for path, value in typed.items():
            config.sampling[path.split('.')[1]] = value
    with caplog.at_level(std_logging.WARNING):
        folder = main.execute(config, swissroll_run, 'sample', typed)
    lines = [r.getMessage() for r in caplog.records
             if 'multistep solver' in r.getMessage() and r.levelno == std_logging.WARNING]
    assert len(lines) == warnings, lines
    if warnings:
        assert lines[0].startswith("sampling.method='dpmpp_2m' on sampling.num_steps='ddim10'")
        assert "'logsnr10' or 'karras10'" in lines[0]
    with np.load(os.path.join(folder, 'samples.npz')) as f:  # two batches were drawn
        assert f['points'].shape == (20, 2)
