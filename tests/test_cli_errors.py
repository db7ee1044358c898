"""Every command-line mistake: one `error:` line naming the field or file and the fix, exit status
1, nothing written to the workdir; --verbosity=1 shows the traceback instead.

Mistakes found while parsing flags run the real command in a subprocess (they fail before JAX is
imported, so each costs about a second); those found by the config validation run in-process
through main.execute, the function main() calls.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from diffusion_jax import config_validation, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(ROOT))
from configs import digits  # noqa: E402


def cli(args, workdir):
    proc = subprocess.run([sys.executable, '-m', 'diffusion_jax.main', *args,
                           f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize('args, message', [
    (['--config=configs/nope.py'],
     "error: --config=configs/nope.py: no such file 'configs/nope.py'; pass a config file, e.g. "
     '--config=configs/digits.py.'),
    (['--config=configs/digits.py', '--config.training.bach_size=8'],
     "error: --config.training.bach_size: the config has no field 'bach_size'. Did you mean "
     '--config.training.batch_size?'),
    (['--config=configs/digits.py', '--config.training.batch_size=eight'],
     "error: --config.training.batch_size=eight: invalid literal for int() with base 10: 'eight'"
     " (give a value of the field's type; --helpfull lists flags)"),
    (['--config=configs/digits.py', '--mode=smaple'],
     "error: --mode=smaple: value should be one of <train|eval|sample|edit> (give a value of the "
     "field's type; --helpfull lists flags)"),
    (['--config=configs/digits.py:runlcoal'],
     "error: digits: unknown config argument(s) ['runlcoal']; this file offers ['runlocal'] "
     '(e.g. --config=configs/digits.py:runlocal).'),
    (['--mode=sample'],
     "error: {workdir}/config.json does not exist: '{workdir}' is not a trained run. Pass the "
     '--workdir of a run (train one with python -m diffusion_jax.main --config=... '
     '--workdir={workdir}).'),
], ids=['missing_config_file', 'unknown_field', 'wrong_type', 'unknown_mode',
        'unknown_config_argument', 'sample_without_a_run'])
def test_flag_mistakes_get_one_line(tmp_path, args, message):
    workdir = tmp_path / 'run'
    rc, lines = cli(args, workdir)
    assert rc == 1
    assert lines == [message.format(workdir=workdir)]
    assert not workdir.exists()


def test_verbosity_1_shows_the_traceback(tmp_path):
    rc, lines = cli(['--config=configs/digits.py', '--config.training.bach_size=8',
                     '--verbosity=1'], tmp_path / 'run')
    assert rc != 0 and any(line.startswith('Traceback') for line in lines)
    assert not (tmp_path / 'run').exists()


def _override(**typed):
    config = digits.get_config()
    with config.unlocked():
        for path, value in typed.items():
            section, field = path.split('__')
            config[section][field] = value
    return config, {p.replace('__', '.'): v for p, v in typed.items()}


@pytest.mark.parametrize('typed, message', [
    (dict(training__num_train_steps=0),
     'training.num_train_steps=0 must be > 0: the number of optimiser steps to train for '
     '(e.g. --config.training.num_train_steps=1000).'),
    (dict(training__num_train_steps=-5),
     'training.num_train_steps=-5 is negative: counts and step numbers cannot be; set it to a '
     'number >= 0.'),
    (dict(sampling__method='eulr'),
     "sampling.method='eulr' is not a sampler: use one of "
     f'{", ".join(config_validation.sampler_names())}.'),
    (dict(diffusion__model_var_type='learned_range', diffusion__loss_type='hybrid',
          model__out_channels=1),
     "model.out_channels=1 does not fit diffusion.model_var_type='learned_range': a learned "
     'variance needs 2 output channels; set --config.model.out_channels=2 (or leave it unset to '
     'derive it).'),
    (dict(training__batch_size=-64),
     'training.batch_size=-64 must be > 0: the number of examples per step (a multiple of the '
     'device count).'),
    (dict(sampling__batch_size=0),
     'sampling.batch_size=0 must be > 0: the number of examples per step (a multiple of the '
     'device count).'),
    (dict(training__checkpoint_every_steps=-10),
     'training.checkpoint_every_steps=-10 is negative: counts and step numbers cannot be; set it '
     'to a number >= 0.'),
    (dict(sampling__num_samples=-1),
     'sampling.num_samples=-1 is negative: counts and step numbers cannot be; set it to a number '
     '>= 0.'),
    (dict(eval__checkpoint_step=-2),
     'eval.checkpoint_step=-2 is negative: counts and step numbers cannot be; set it to a number '
     '>= 0 (or -1 for the latest checkpoint).'),
    (dict(training__label_dropout=0.1),
     'training.label_dropout=0.1 needs a class-conditional model: set model.num_classes (to '
     'data.num_classes) or label_dropout to 0.'),
    (dict(data__channels=3, model__in_channels=1),
     'model.in_channels=1 does not fit data.channels=3: set both to the same value (or leave '
     'model.in_channels unset to derive it).'),
    (dict(training__steps_per_call=8),
     'training.num_train_steps=1500 is not a multiple of training.steps_per_call=8: the loop '
     'logs, saves, samples and stops only between calls of 8 steps; set '
     '--config.training.num_train_steps=1504 (or 1496) or a steps_per_call that divides it.'),
], ids=['zero_train_steps', 'negative_train_steps', 'unknown_sampler', 'learned_variance',
        'negative_batch', 'zero_sampling_batch', 'negative_cadence', 'negative_num_samples',
        'bad_checkpoint_step', 'label_dropout_unconditional', 'channels_mismatch',
        'steps_per_call_cadence'])
def test_config_mistakes_get_one_line_and_write_nothing(tmp_path, capsys, typed, message):
    config, typed = _override(**typed)
    workdir = tmp_path / 'run'
    with pytest.raises(SystemExit) as exit_:
        main.execute(config, str(workdir), 'train', typed, verbosity=0)
    assert exit_.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f'error: {message}']
    assert not workdir.exists()
    with pytest.raises(ValueError):  # --verbosity=1: the exception itself
        main.execute(config, str(workdir), 'train', typed, verbosity=1)


def test_derived_fields_follow_what_was_typed():
    config, typed = _override(diffusion__model_var_type='learned_range',
                              diffusion__loss_type='hybrid')
    resolved = config_validation.resolve(config, 'train', typed)
    assert resolved.model.out_channels == 2  # 2·C for a learned variance
    config, typed = _override(data__channels=3)
    resolved = config_validation.resolve(config, 'train', typed)
    assert (resolved.model.in_channels, resolved.model.out_channels) == (3, 3)
    with pytest.raises(ValueError, match=r'model.out_channels=1 does not fit'):
        config_validation.resolve(_override(diffusion__model_var_type='learned',
                                            diffusion__loss_type='hybrid')[0], 'train')
