"""Command line entry point: parses flags and hands the config to a library function.

    python -m diffusion_jax.main --config=configs/digits.py
    python -m diffusion_jax.main --config=configs/cifar10.py:runlocal --workdir=/tmp/c10
    python -m diffusion_jax.main --config=configs/digits.py --mode=sample --config.training.seed=1

Modes: train (diffusion_jax.train.train_and_evaluate), eval (NLL and sample quality,
diffusion_jax.evaluation.evaluate.run_eval) and sample (diffusion_jax.generate.run_sampling).
The config is locked: overriding a field it does not have is an error, not a silent no-op.
Without --workdir, the run lives in runs/<config.name>.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ('train', 'eval', 'sample')

config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: configs/cifar10.py:runlocal.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config.name>).')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do with the config.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host runs).')
flags.mark_flags_as_required(['config'])


def run(config, workdir: str | None, mode: str):
    """Dispatches to the library function of `mode`; imports only what that mode needs."""
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    workdir = workdir or train.default_workdir(config)
    if mode == 'train':
        return train.train_and_evaluate(config, workdir)
    if mode == 'eval':
        from diffusion_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
        return evaluate.run_eval(config, workdir)
    from diffusion_jax import generate  # pylint: disable=import-outside-toplevel
    return generate.run_sampling(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if FLAGS.distributed:
        import jax  # pylint: disable=import-outside-toplevel
        jax.distributed.initialize()
    logging.info('mode=%s workdir=%s', FLAGS.mode, FLAGS.workdir)
    try:
        run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # Bad input gets its one-line message; --verbosity=1 shows where it came from.
        if FLAGS.verbosity >= 1:
            raise
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    app.run(main)
