"""The command line: absl flags with config overrides, SIGTERM -> checkpoint and exit 0, one-line
errors for bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The swiss roll with a tiny MLP and T = 50: a run whose compile and steps take seconds.
SMALL = ['--config=configs/swissroll.py:runlocal', '--config.model.hidden_dim=16',
         '--config.diffusion.num_timesteps=50', '--config.training.sample_every_steps=0']


def start(args, workdir):
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
    return subprocess.Popen([sys.executable, '-m', 'diffusion_jax.main', *args,
                             f'--workdir={workdir}'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_overrides_reach_the_run_and_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / 'run'
    proc = start([*SMALL, '--config.training.num_train_steps=1000000',
                  '--config.training.log_every_steps=1',
                  '--config.training.checkpoint_every_steps=1000000'], workdir)
    metrics = workdir / 'metrics.jsonl'
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
        assert time.time() < deadline, 'no training step within 120 s'
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    config = json.loads((workdir / 'config.json').read_text())
    assert config['training']['num_train_steps'] == 1_000_000
    assert config['model']['hidden_dim'] == 16
    steps = [int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 1_000_000  # saved where it stopped
    assert 'SIGTERM' in stderr

    # --mode=sample on the run: no --config (the stored one is the base), sampling overrides.
    proc = start(['--mode=sample', '--config.sampling.num_samples=8',
                  '--config.sampling.batch_size=8'], workdir)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    sampled = json.loads((workdir / 'samples' / str(steps[0]) / 'sampling_config.json')
                         .read_text())
    assert sampled['num_samples'] == 8 and sampled['diffusion']['num_timesteps'] == 50
    proc = start(['--mode=sample', '--config.diffusion.num_timesteps=100'], workdir)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith(
        "error: diffusion.num_timesteps=100 differs from the trained run's "
        'diffusion.num_timesteps=50')


def test_unknown_override_is_an_error_and_writes_nothing(tmp_path):
    proc = start([*SMALL, '--config.training.bach_size=8'], tmp_path / 'run')
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.strip().splitlines() == [
        "error: --config.training.bach_size: the config has no field 'bach_size'. Did you mean "
        '--config.training.batch_size?']
    assert not (tmp_path / 'run').exists()


def test_bad_input_gets_one_error_line(tmp_path):
    proc = start([*SMALL, '--config.training.batch_size=12'], tmp_path / 'run')
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('error: training.batch_size=12') and 'multiple of 8' in last
    assert not (tmp_path / 'run').exists()
