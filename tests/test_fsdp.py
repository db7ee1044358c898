"""FSDP (config.sharding.fsdp = N) on 8 fake CPU devices: the mesh ('data', 'fsdp'), the
per-array rule, and training equal across N.

Truth: fsdp = 1 (data parallelism, the state replicated) is the reference; N = 2, 4, 8 compute the
same function with the state split differently, so parameters and logged losses agree up to
float32 reduction order (<= 1e-5 relative), while the bytes of parameters + optimiser state per
device (read from the arrays' own shards) shrink by about N.
"""
import json
import logging
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import sharding, train

try:
    from configs import model_configs, swissroll
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs, swissroll

pytestmark = pytest.mark.usefixtures('fast_compiles')
FSDP = (1, 2, 4, 8)


def test_mesh_and_rule():
    mesh = sharding.make_mesh(fsdp=4)
    assert mesh.axis_names == ('data', 'fsdp') and dict(mesh.shape) == {'data': 2, 'fsdp': 4}
    assert sharding.param_spec((64, 256), 4) == P(None, 'fsdp')  # the largest divisible dim
    assert sharding.param_spec((256, 6), 4) == P('fsdp')
    assert sharding.param_spec((3, 3, 6, 36), 8) == P()  # no dimension divisible by 8
    assert sharding.param_spec((3, 3, 6, 36), 4) == P(None, None, None, 'fsdp')
    assert sharding.param_spec((512,), 4) == P()  # below FSDP_MIN_SIZE: replicated
    assert sharding.param_spec((4096,), 8) == P('fsdp')
    assert sharding.param_spec((64, 256), 1) == P()
    assert sharding.data_sharding(mesh).spec == P(('data', 'fsdp'))
    with pytest.raises(ValueError, match=r'^sharding.fsdp=3 must be a positive integer that '
                                         r'divides the 8 devices'):
        sharding.make_mesh(fsdp=3)


def _config(fsdp):
    c = swissroll.get_config()
    c.model = model_configs.swissroll_mlp(hidden_dim=64, num_layers=2)
    c.diffusion.update(num_timesteps=10, beta_schedule='linear', beta_start=0.01, beta_end=0.5)
    c.data.num_train_examples = 64
    c.training.update(batch_size=32, num_train_steps=4, log_every_steps=1,
                      checkpoint_every_steps=4, sample_every_steps=0)
    c.optim.update(learning_rate=3e-3, warmup_steps=0)
    c.sharding.fsdp = fsdp
    return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = {}
    for n in FSDP:
        workdir = tmp_path_factory.mktemp(f'fsdp{n}')
        handler = _Capture()
        logging.getLogger('diffusion_jax').addHandler(handler)
        try:
            state = train.train_and_evaluate(_config(n), str(workdir))
        finally:
            logging.getLogger('diffusion_jax').removeHandler(handler)
        with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
            losses = [json.loads(line)['loss'] for line in f]
        out[n] = (state, losses, handler.lines, workdir)
    return out


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_fsdp_trains_the_same_parameters_and_losses(runs):
    ref_state, ref_losses, _, _ = runs[1]
    ref = jax.tree.leaves(jax.device_get(ref_state.params))
    for n in FSDP[1:]:
        state, losses, _, _ = runs[n]
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), ref):
            assert _rel(np.asarray(a), np.asarray(b)) <= 1e-5
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        sharded = [leaf for leaf in jax.tree.leaves(state.params) if leaf.sharding.spec != P()]
        assert sharded, 'no parameter is sharded'


def test_state_bytes_per_device_shrink_and_are_logged(runs):
    per_device = {n: sharding.bytes_per_device((s.params, s.opt_state))
                  for n, (s, _, _, _) in runs.items()}
    total = sum(leaf.nbytes for leaf in jax.tree.leaves((runs[1][0].params, runs[1][0].opt_state)))
    assert per_device[1] == total  # replicated: every device holds everything
    for n in FSDP[1:]:
        assert per_device[n] < per_device[n // 2]
    assert per_device[8] < total / 4  # all but the small arrays split 8 ways
    for n, (_, _, lines, _) in runs.items():
        mib = per_device[n] / 2**20
        assert f'params+opt per device: {mib:.2f} MiB (sharding.fsdp={n})' in lines


def test_checkpoint_saved_with_fsdp4_resumes_on_fsdp2(runs, tmp_path):
    """orbax restores a checkpoint onto the target mesh: 4 more steps on fsdp = 2 from the
    fsdp = 4 run's checkpoint equal 4 more steps on fsdp = 1 from the fsdp = 1 run's."""
    import shutil  # pylint: disable=import-outside-toplevel
    results = {}
    for saved, resumed in ((4, 2), (1, 1)):
        workdir = tmp_path / f'{saved}to{resumed}'
        shutil.copytree(runs[saved][3], workdir)
        config = _config(resumed)
        config.training.num_train_steps = 8
        results[saved] = train.train_and_evaluate(config, str(workdir))
    assert int(results[4].step) == 8
    for a, b in zip(jax.tree.leaves(jax.device_get(results[4].params)),
                    jax.tree.leaves(jax.device_get(results[1].params))):
        assert _rel(np.asarray(a), np.asarray(b)) <= 1e-5


def test_fsdp_checkpoint_loads_replicated_on_one_device(runs):
    """run.load (sampling, eval) restores the fsdp = 4 run's EMA parameters onto a 1-device mesh
    and onto the default 8-device mesh, equal to the trained state's."""
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    state, _, _, workdir = runs[4]
    want = jax.tree.leaves(jax.device_get(state.ema_params))
    for mesh in (sharding.make_mesh(jax.devices()[:1]), None):
        loaded = run.load(str(workdir), mesh=mesh)
        got = jax.tree.leaves(loaded.variables['params'])
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.sharding.spec == P()
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
