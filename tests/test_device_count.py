"""A run moves between device counts: saved on 8 devices, resumed and sampled on 1, and the
reverse (the device count is fixed per process, so the 1-device side runs in a subprocess).
Orbax restores each array onto the sharding of the mesh that restores it; the resumed runs end
equal to the uninterrupted 8-device run within float32 reduction order (the batch gradient's
all-reduce sums in another order on 1 device than on 8)."""
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, models, run, sharding, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import leaves, mlp_config  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('fast_compiles')
ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs on 1 CPU device: trains mlp_config(steps) in argv[1] (resuming what is there), then
# loads the run for inference and prints the device count and the checkpoint step.
ONE_DEVICE = '''
import sys
sys.path.insert(0, sys.argv[3])
import jax
from test_train import mlp_config
from diffusion_jax import run, train
config = mlp_config(int(sys.argv[2]))
config.compile_cache_dir = ''
train.train_and_evaluate(config, sys.argv[1])
loaded = run.load(sys.argv[1])
print('devices', jax.device_count(), 'step', loaded.step)
'''


def _on_one_device(workdir, steps):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
    out = subprocess.run([sys.executable, '-c', ONE_DEVICE, workdir, str(steps),
                          str(ROOT / 'tests')], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _all_items(state):
    return dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                extra=dict(step=state.step, sampler=state.sampler_state, skipped=state.skipped))


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
    """The uninterrupted 8-step run on this process's 8 devices (checkpoints 3, 6, 8)."""
    workdir = str(tmp_path_factory.mktemp('eight') / 'run')
    config = mlp_config()
    config.compile_cache_dir = ''
    return workdir, train.train_and_evaluate(config, workdir)


def _assert_close(got, want):
    """Floats within 1e-5 of each array's scale (the loss-aware sampler's loss history too),
    integers (step, skip count, sampler counts) equal."""
    for item in ('params', 'ema_params', 'opt_state', 'extra'):
        for a, b in zip(leaves(got[item]), leaves(want[item])):
            assert a.shape == b.shape and a.dtype == b.dtype, item
            if np.issubdtype(b.dtype, np.floating):
                scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
                assert float(np.max(np.abs(a - b), initial=0.0)) / scale <= 1e-5, item
            else:
                np.testing.assert_array_equal(a, b, err_msg=item)


def test_saved_on_eight_devices_resumed_and_sampled_on_one(eight_devices, tmp_path):
    reference, final = eight_devices
    workdir = str(tmp_path / 'moved')
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(workdir), '8'))
    assert 'devices 1 step 8' in _on_one_device(workdir, 8)
    config = mlp_config()
    optimizer, _ = train.create_optimizer(config.optim)
    target = train.abstract_train_state(config, models.get_model(config.model), optimizer,
                                        sharding.make_mesh())
    got, _ = checkpointing.restore_items(workdir, _all_items(target), step=8)
    _assert_close(got, _all_items(final))


def test_saved_on_one_device_resumed_and_sampled_on_eight(eight_devices, tmp_path):
    _, final = eight_devices
    workdir = str(tmp_path / 'from_one')
    assert 'devices 1 step 6' in _on_one_device(workdir, 6)
    config = mlp_config()
    config.compile_cache_dir = ''
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 8
    _assert_close(_all_items(resumed), _all_items(final))
    loaded = run.load(workdir)
    assert loaded.step == 8
    assert jax.tree.leaves(loaded.variables)[0].sharding.mesh.devices.size == 8
