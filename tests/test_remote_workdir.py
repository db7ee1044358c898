"""A `gs://` workdir: every file a run writes goes to the store, none to a local `./gs:/...`.

The store is fsspec's in-memory filesystem registered as the `gs`/`gcs` protocol, so etils.epath
takes its real `gs://` code path (its fsspec backend, as with gcsfs on a cloud machine) without a
network. Like a GCS bucket it holds objects that cannot be appended to (opening one with 'a'
raises), so a writer that appends, or that creates local folders, fails here.

Checkpoints are the exception: orbax writes the arrays through TensorStore's own `gcs` driver
(HTTP to storage.googleapis.com), not through epath/fsspec, so they cannot go to this store
offline; the training test keeps `checkpoints/` on a local path (checkpointing.checkpoint_dir
patched) and everything else of the run on `gs://`.
"""
import json
import os
import sys

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from diffusion_jax import checkpointing, image_utils, main, notebook, run as run_lib, train

pytestmark = pytest.mark.usefixtures('fast_compiles')

WORKDIR = 'gs://bucket/runs/roll'


class _FakeGCS(MemoryFileSystem):
    """An in-memory bucket under gs://: objects are written whole, never appended to."""
    protocol = ('gs', 'gcs')
    store = {}
    pseudo_dirs = ['']

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ('gs://', 'gcs://'):
            path = path.removeprefix(prefix)
        return super()._strip_protocol(path)

    def _open(self, path, mode='rb', **kwargs):
        if 'a' in mode:
            raise NotImplementedError(f'{path}: objects cannot be appended to (mode {mode!r})')
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """The fake bucket's store ({'/bucket/...': file}); the test runs in an empty cwd."""
    _FakeGCS.store.clear()
    _FakeGCS.pseudo_dirs[:] = ['']
    registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
    for name in _FakeGCS.protocol:
        monkeypatch.setitem(registry, name, _FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    monkeypatch.chdir(tmp_path)
    yield _FakeGCS.store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _files(store) -> dict[str, bytes]:
    prefix = '/bucket/runs/roll/'
    return {k[len(prefix):]: v.getvalue() for k, v in store.items() if k.startswith(prefix)}


def test_atomic_write_and_reads_go_to_the_store(gcs, tmp_path):
    path = f'{WORKDIR}/eval/x.json'
    image_utils.write_json(path, {'a': 1})
    image_utils.save_npz(f'{WORKDIR}/s/samples.npz', images=np.arange(6, dtype=np.uint8))
    image_utils.save_grid(f'{WORKDIR}/s/samples.png', np.zeros((4, 8, 8, 1), np.uint8))
    assert os.listdir(tmp_path) == []  # no ./gs:/bucket/... folder
    assert set(_files(gcs)) == {'eval/x.json', 's/samples.npz', 's/samples.png'}
    assert json.loads(epath.Path(path).read_text()) == {'a': 1}
    assert image_utils.read_bytes(f'{WORKDIR}/s/samples.png').startswith(b'\x89PNG')
    with np.load(image_utils.as_path(f'{WORKDIR}/s/samples.npz').open('rb')) as f:
        np.testing.assert_array_equal(f['images'], np.arange(6))
    with pytest.raises(NotImplementedError):  # the store is append-free, as GCS is
        with epath.Path(path).open('a') as f:
            f.write('more')


def _config(steps: int):
    from configs import model_configs, swissroll
    config = swissroll.get_config()
    config.model = model_configs.swissroll_mlp(hidden_dim=16, num_layers=1)
    config.diffusion.num_timesteps = 20
    t = config.training
    t.batch_size = 64
    t.num_train_steps = steps
    t.log_every_steps = 2
    t.checkpoint_every_steps = 4
    t.sample_every_steps = 4
    t.num_sample_images = 16
    config.eval.batch_size = 64
    config.eval.num_batches = 1
    config.compile_cache_dir = ''
    return config


def test_a_gs_run_trains_resumes_samples_and_evaluates_in_the_store(gcs, tmp_path,
                                                                    monkeypatch):
    local_checkpoints = tmp_path / 'local_checkpoints'
    monkeypatch.setattr(checkpointing, 'checkpoint_dir', lambda workdir: str(local_checkpoints))

    train.train_and_evaluate(_config(4), WORKDIR)
    files = _files(gcs)
    assert json.loads(files['config.json'])['training']['num_train_steps'] == 4
    assert [json.loads(r)['step'] for r in files['metrics.jsonl'].decode().splitlines()] == [2, 4]
    assert 'step 4: loss=' in files['train.log'].decode()
    assert files['samples/4/ema_grid.png'].startswith(b'\x89PNG')
    with np.load(image_utils.as_path(f'{WORKDIR}/samples/4/ema_grid.npz').open('rb')) as f:
        assert f['points'].shape == (16, 2)
    events = [k for k in files if k.startswith('tensorboard/events.out.tfevents')]
    assert len(events) == 1 and len(files[events[0]]) > 100
    assert sorted(os.listdir(local_checkpoints)) == ['4']

    # Resume to step 8: the stored config is kept as config_4.json, metrics.jsonl is rewritten
    # (never appended) with the new rows after the old ones, train.log keeps the first run's.
    train.train_and_evaluate(_config(8), WORKDIR)
    files = _files(gcs)
    assert json.loads(files['config_4.json'])['training']['num_train_steps'] == 4
    assert json.loads(files['config.json'])['training']['num_train_steps'] == 8
    rows = [json.loads(r) for r in files['metrics.jsonl'].decode().splitlines()]
    assert [r['step'] for r in rows] == [2, 4, 6, 8]
    log = files['train.log'].decode()
    assert 'step 4: loss=' in log and 'step 8: loss=' in log
    np.testing.assert_array_equal(notebook.read_metrics(WORKDIR)['step'], [2, 4, 6, 8])
    assert {'samples/4/ema_grid.png', 'samples/8/ema_grid.png'} <= set(files)

    # --mode=sample and --mode=eval from the stored config.json in the store.
    # (main.execute with the stored config as the base, as the CLI without --config.)
    main.execute(run_lib.get_config(WORKDIR), WORKDIR, 'sample', {'sampling.num_samples': 8,
                                             'sampling.batch_size': 8})
    main.execute(run_lib.get_config(WORKDIR), WORKDIR, 'eval', {})
    files = _files(gcs)
    sampled = json.loads(files['samples/8/sampling_config.json'])
    assert sampled['num_samples'] == 8 and sampled['step'] == 8
    with np.load(image_utils.as_path(f'{WORKDIR}/samples/8/samples.npz').open('rb')) as f:
        assert f['points'].shape == (8, 2) and np.all(np.isfinite(f['points']))
    assert files['samples/8/samples.png'].startswith(b'\x89PNG')
    nll = json.loads(files['eval/nll_8.json'])
    assert nll['step'] == 8 and np.isfinite(nll['total_bpd'])
    # Nothing of the run landed in the working directory (today's os-based writers made
    # ./gs:/bucket/runs/roll/...).
    assert sorted(os.listdir(tmp_path)) == ['local_checkpoints']
