"""Command line entry point: parses flags and hands the config to a library function.

    python -m diffusion_jax.main --config=configs/digits.py --workdir=runs/digits
    python -m diffusion_jax.main --config=configs/cifar10.py:runlocal --workdir=/tmp/c10
    python -m diffusion_jax.main --workdir=runs/digits --mode=sample
    python -m diffusion_jax.main --workdir=runs/digits --mode=eval --config.eval.nll_estimator=sampled

Modes: train (diffusion_jax.train), eval (NLL and sample quality, diffusion_jax.evaluation.
evaluate), sample (diffusion_jax.generate) and edit (RePaint / SDEdit / DDIM edits of given
images, diffusion_jax.edit); each gets the config that diffusion_jax.run.resolve_config returned,
once per command (their run_resolved).
Train needs --config; sample and eval load the run's stored config.json (diffusion_jax.run), so
--config is optional for them (a file contributes its sampling/eval sections only), typed
overrides apply, and a typed model/diffusion/data (or training.label_dropout) override that
differs from the trained run is refused.
The config is locked: overriding a field it does not have is an error, not a silent no-op.
Without --workdir, the run lives in runs/<config.name>.

Every mistake on the command line (flag parsing included) is one `error: ...` line on stderr
and exit status 1, before anything is written; --verbosity=1 shows the traceback instead.

The console: one line per checkpoint save and restore, and progress bars with ETA for training,
sampling and the NLL eval (process 0); orbax's own INFO lines (dozens per save or restore)
only at --verbosity=1 (logging_utils.show_library_logs).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ('train', 'eval', 'sample', 'edit')
STORED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'run.py')

config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with an argument: configs/cifar10.py:runlocal. '
    'Optional for --mode=sample/eval (default: the run\'s stored config.json).',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<config.name>).')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do with the config.')
# --- distributed launch flags (multi-process; owned by the reliability work) ---
# Multi-process runs (diffusion_jax.sharding.initialize_distributed): all three flags, or none
# (then JAX's cluster auto-detection on TPU pods and SLURM, else a single process).
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT that process 0 serves for a multi-process run (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, --num_processes).')
# --- end of the distributed launch flags ---


def run(config, workdir: str | None, mode: str):
    """Runs `mode` on a config from resolve_command (resolved once: the mode's run_resolved
    takes it as it is); imports only what that mode needs."""
    # pylint: disable=import-outside-toplevel
    from diffusion_jax import defaults
    workdir = workdir or defaults.default_workdir(config)
    if mode == 'train':
        from diffusion_jax import train
        return train.run_resolved(config, workdir)
    if mode == 'eval':
        from diffusion_jax.evaluation import evaluate
        return evaluate.run_resolved(config, workdir)
    if mode == 'edit':
        from diffusion_jax import edit
        return edit.run_edit(config, workdir)
    from diffusion_jax import generate
    return generate.run_resolved(config, workdir)


def resolve_command(config, workdir: str | None, mode: str, typed: dict):
    """(config, workdir) that `run` gets, validated whole before anything is read or written.

    config: the --config flag's value (the file with the overrides applied; for sample/eval
    without --config, the stored config). typed: {'section.field': value} of the overrides the
    user typed (config_flags.get_override_values), so that a file's defaults are never mistaken
    for a request to change a trained run. The resolution is diffusion_jax.run.resolve_config.
    """
    # pylint: disable=import-outside-toplevel
    from diffusion_jax import config_validation, defaults, run as run_lib
    config_validation.check_mode(mode)
    if config is None:
        raise ValueError(f'--mode={mode} needs --config=FILE (e.g. --config=configs/digits.py)'
                         + ('' if mode == 'train' else ' or --workdir=RUN (a trained run)') + '.')
    workdir = workdir or defaults.default_workdir(config)
    return run_lib.resolve_config(workdir, config, typed, mode), workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from diffusion_jax import sharding  # pylint: disable=import-outside-toplevel
    try:  # before anything touches a device
        sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
    except ValueError as err:
        if FLAGS.verbosity >= 1:
            raise
        fail(str(err))
    typed = config_flags.get_override_values(FLAGS['config']) if FLAGS.config else {}
    execute(FLAGS.config, FLAGS.workdir, FLAGS.mode, typed, FLAGS.verbosity)


def execute(config, workdir: str | None, mode: str, typed: dict, verbosity: int = 0):
    """resolve_command, then run; bad input exits with one `error:` line (status 1), or raises
    (the traceback) when verbosity >= 1. Returns what the mode's library function returns."""
    from diffusion_jax import logging_utils  # pylint: disable=import-outside-toplevel
    # orbax's INFO lines (dozens per checkpoint save or restore) at --verbosity=1 only.
    logging_utils.show_library_logs(verbosity >= 1)
    logging_utils.quiet_libraries()
    try:
        config, workdir = resolve_command(config, workdir, mode, typed)
        logging.info('mode=%s workdir=%s', mode, workdir)
        return run(config, workdir, mode)
    except (ValueError, OSError, FloatingPointError) as err:
        # Bad input gets its one-line message; --verbosity=1 shows where it came from.
        if verbosity >= 1:
            raise
        fail(str(err))
    return None  # not reached


# ----------------------------------------------------------------------------------------------
# Flag parsing: absl and config_flags raise (or print several lines) before main() runs.
# ----------------------------------------------------------------------------------------------
def fail(message: str) -> None:
    """One `error:` line on stderr, exit status 1."""
    print('error: ' + ' '.join(message.split()), file=sys.stderr)
    sys.exit(1)


def _flag_value(argv, *names) -> str | None:
    """The last value of --name=V / --name V / -name=V in argv (no parsing beyond that)."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        for name in names:
            for prefix in (f'--{name}', f'-{name}'):
                if arg.startswith(prefix + '='):
                    value = arg[len(prefix) + 1:]
                elif arg == prefix and i + 1 < len(argv):
                    value = argv[i + 1]
    return value


def _verbose(argv) -> bool:
    value = _flag_value(argv, 'verbosity', 'v')
    try:
        return value is not None and int(value) >= 1
    except ValueError:
        return False


def with_stored_config(argv: list[str]) -> list[str]:
    """argv with --config=<run.py>:WORKDIR added for a sample/eval/edit command without
    --config (so its --config.* overrides parse against the stored fields); a --config file
    that does not exist is a ValueError here, before config_flags turns it into a multi-line
    trace."""
    path = _flag_value(argv, 'config')
    if path is not None:
        file = path.split(':', 1)[0]
        if not os.path.isfile(file):
            raise ValueError(f'--config={path}: no such file {file!r}; pass a config file, e.g. '
                             '--config=configs/digits.py.')
        return argv
    mode, workdir = _flag_value(argv, 'mode'), _flag_value(argv, 'workdir')
    if mode in ('sample', 'eval', 'edit') and workdir:
        from diffusion_jax import run as run_lib  # pylint: disable=import-outside-toplevel
        run_lib.Run(workdir).config  # pylint: disable=expression-not-assigned  (raises: no run)
        return [argv[0], f'--config={STORED_CONFIG}:{workdir}', *argv[1:]]
    return argv


def flag_error_message(err: Exception, argv) -> str:
    """One line for a flag-parsing failure, naming the flag or field and the fix."""
    text = str(err).strip()
    if 'Traceback (most recent call last)' in text:
        # config_flags re-raises a config file's own error with the traceback in the message:
        # its last line is the error itself.
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return re.sub(r'^\w+(Error|Exception): ', '', last)
    if isinstance(err, (AttributeError, KeyError)):  # an unknown field of the locked config
        text = text.replace('\\n', ' ').replace("\\'", "'")
        mean = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
        field = mean.group(2) if mean else (re.findall(r'\w+', text) or ['?'])[0]
        typed = [a.split('=', 1)[0] for a in argv[1:]
                 if re.match(rf'-{{1,2}}config\.(.+\.)?{re.escape(field)}(=|$)', a)]
        where = typed[-1] if typed else f'--config.*.{field}'
        hint = f' Did you mean {where.rsplit(".", 1)[0]}.{mean.group(1)}?' if mean else ''
        return f'{where}: the config has no field {field!r}.{hint}'
    if isinstance(err, flags.Error) and text.startswith('flag --'):
        return text[len('flag '):] + ' (give a value of the field\'s type; --helpfull lists flags)'
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser for app.run: every parse failure becomes one `error:` line."""
    try:
        return FLAGS(with_stored_config(list(argv)))
    except Exception as err:  # pylint: disable=broad-except  (any failure to parse is bad input)
        if _verbose(argv):
            raise
        fail(flag_error_message(err, argv))
    return []  # not reached


def cli() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
    cli()
