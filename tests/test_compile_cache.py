"""The persistent compilation cache (config.compile_cache_dir): a second `--mode=sample` of a
run loads its programs instead of compiling them, '' turns it off, 'auto' is the user cache
folder; the log states compile and run time apart."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from diffusion_jax import sharding, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import mlp_config  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_default_folder_is_the_user_cache_folder(monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', '/somewhere/cache')
    assert sharding.default_compile_cache_dir() == '/somewhere/cache/diffusion_jax/xla'
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert sharding.default_compile_cache_dir() == os.path.expanduser(
        '~/.cache/diffusion_jax/xla')
    assert mlp_config().compile_cache_dir == sharding.AUTO_CACHE


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('cache') / 'run')
    config = mlp_config(steps=3)
    config.compile_cache_dir = ''  # this process's JAX stays as the suite set it
    train.train_and_evaluate(config, workdir)
    return workdir


def _sample(workdir, cache_dir, xdg):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8',
               XDG_CACHE_HOME=str(xdg),
               # The test's sampler compiles in well under JAX's 1 s threshold for storing.
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    out = subprocess.run(
        [sys.executable, '-m', 'diffusion_jax.main', '--mode=sample', f'--workdir={workdir}',
         '--config.sampling.num_samples=8', '--config.sampling.batch_size=8',
         '--config.sampling.method=ddim', '--config.sampling.num_steps=ddim4',
         f'--config.compile_cache_dir={cache_dir}'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stderr.splitlines() if 'batch 1/1:' in l]
    assert line and re.search(r'compile \d+\.\ds.*, run \d+\.\ds', line[0]), out.stderr[-3000:]
    return line[0]


def test_a_second_sample_command_loads_its_programs_from_the_cache(trained, tmp_path):
    cache = tmp_path / 'xla'
    first = _sample(trained, cache, tmp_path / 'xdg')
    assert 'from the persistent cache' not in first
    assert any(cache.iterdir())
    second = _sample(trained, cache, tmp_path / 'xdg')
    assert int(re.search(r'(\d+) from the persistent cache', second).group(1)) >= 1
    # 'auto': the user cache folder of the machine that runs ($XDG_CACHE_HOME here).
    auto = _sample(trained, 'auto', tmp_path / 'xdg')
    assert 'from the persistent cache' not in auto
    assert any((tmp_path / 'xdg' / 'diffusion_jax' / 'xla').iterdir())
    # '': off, nothing stored or loaded anywhere.
    off = _sample(trained, '', tmp_path / 'xdg_off')
    assert 'from the persistent cache' not in off and not (tmp_path / 'xdg_off').exists()
