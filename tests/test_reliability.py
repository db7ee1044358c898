"""Reliability of a training run: damaged checkpoints are skipped (and never altered), a
non-finite step stops the run at that step or is skipped, a failing save leaves the previous
checkpoint restorable, a signal stops the run before periodic sampling, and toggling gradient
clipping or weight decay keeps the optimiser state's structure. 8 fake CPU devices, the swiss
roll MLP of test_train."""
import glob
import logging
import os
import pathlib
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpointing, input_pipeline, models, sharding, train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import leaves, mlp_config, snapshot  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('fast_compiles')
FIELDS = ('params', 'ema_params', 'opt_state', 'sampler_state')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at 3, 6 and 8: (workdir, final state)."""
    workdir = str(tmp_path_factory.mktemp('reference'))
    return workdir, train.train_and_evaluate(mlp_config(), workdir)


def assert_states_equal(got, want):
    for field in FIELDS:
        for a, b in zip(leaves(getattr(got, field)), leaves(getattr(want, field))):
            np.testing.assert_array_equal(a, b, err_msg=field)


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def _truncate_data(step_dir):
    paths = glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True)
    assert paths
    for path in paths:
        _truncate(path)


DAMAGES = {
    'truncated _METADATA': (lambda d: _truncate(os.path.join(d, 'params', '_METADATA')),
                            '_METADATA is not valid JSON'),
    'truncated step metadata': (lambda d: _truncate(os.path.join(d, '_CHECKPOINT_METADATA')),
                                '_CHECKPOINT_METADATA is not valid JSON'),
    'no commit marker': (lambda d: os.remove(os.path.join(d, 'commit_success.txt')),
                         'no commit marker'),
    'missing item': (lambda d: shutil.rmtree(os.path.join(d, 'opt_state')),
                     "item 'opt_state' is missing"),
    'empty manifest': (lambda d: open(os.path.join(d, 'ema_params', 'manifest.ocdbt'),
                                      'wb').close(), 'manifest.ocdbt is missing or empty'),
}


@pytest.mark.parametrize('kind', sorted(DAMAGES))
def test_readers_skip_a_damaged_newest_step_with_a_warning_and_change_nothing(
        reference, tmp_path, kind, caplog):
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference[0], workdir)
    damage, reason = DAMAGES[kind]
    damage(os.path.join(checkpointing.checkpoint_dir(workdir), '8'))
    # Foreign entries: a file, a folder, an orbax temporary folder of an unfinished save.
    folder = checkpointing.checkpoint_dir(workdir)
    pathlib.Path(folder, 'notes.txt').write_text('not a checkpoint')
    os.makedirs(os.path.join(folder, 'backup'))
    os.makedirs(os.path.join(folder, '9.orbax-checkpoint-tmp-1234'))
    before = snapshot(workdir)
    with caplog.at_level(logging.WARNING):
        assert checkpointing.valid_steps(workdir) == [3, 6]
        assert checkpointing.latest_step(workdir) == 6
    warning = [r.getMessage() for r in caplog.records if 'step 8' in r.getMessage()]
    assert warning and 'damaged' in warning[0]
    assert reason in warning[0]
    assert snapshot(workdir) == before


def _abstract_params(config):
    mesh = sharding.make_mesh()
    shapes = models.param_shapes(models.get_model(config.model))['params']
    repl = sharding.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def test_unreadable_arrays_are_found_at_restore_and_the_previous_step_is_used(
        reference, tmp_path, caplog):
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference[0], workdir)
    _truncate_data(os.path.join(checkpointing.checkpoint_dir(workdir), '8'))
    before = snapshot(workdir)
    assert checkpointing.latest_step(workdir) == 8  # its structure is complete
    with caplog.at_level(logging.WARNING):
        out, step = checkpointing.restore_items(
            workdir, {'params': _abstract_params(mlp_config())})
    assert step == 6
    assert any('unreadable checkpoint step 8' in r.getMessage() for r in caplog.records)
    assert np.all([np.all(np.isfinite(x)) for x in leaves(out['params'])])
    assert snapshot(workdir) == before


def test_training_resumes_from_the_newest_valid_step_and_keeps_the_damaged_ones(
        reference, tmp_path):
    """Newest step 8 has truncated array data (found only when read), and a bare `9/` folder
    (no commit marker) sits next to it: training resumes from 6, the two damaged folders are
    moved, byte for byte, to checkpoints_damaged/, and the run ends equal to the reference."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference[0], workdir)
    folder = checkpointing.checkpoint_dir(workdir)
    _truncate_data(os.path.join(folder, '8'))
    os.makedirs(os.path.join(folder, '9', 'params'))
    pathlib.Path(folder, '9', 'params', 'x').write_text('partial')
    pathlib.Path(folder, 'README').write_text('foreign')
    damaged = {s: snapshot(os.path.join(folder, s)) for s in ('8', '9')}
    resumed = train.train_and_evaluate(mlp_config(), workdir)
    assert int(resumed.step) == 8
    assert_states_equal(resumed, reference[1])
    moved = os.path.join(workdir, checkpointing.DAMAGED_DIR)
    for s, files in damaged.items():
        got = snapshot(os.path.join(moved, s))
        assert {os.path.relpath(p, os.path.join(moved, s)): v[0] for p, v in got.items()} == {
            os.path.relpath(p, os.path.join(folder, s)): v[0] for p, v in files.items()}
    assert checkpointing.valid_steps(workdir) == [3, 6, 8]


def _nan_batches(monkeypatch, train_steps):
    """Makes the batch of each train step in train_steps all-NaN (batch index = step - 1)."""
    original = input_pipeline.train_iterator

    def iterator(ds, batch_size, seed, start_step=0, random_flip=False):
        for index, batch in enumerate(original(ds, batch_size, seed, start_step, random_flip),
                                      start_step):
            if index + 1 in train_steps:
                batch = dict(batch, image=np.full_like(batch['image'], np.nan))
            yield batch

    monkeypatch.setattr(input_pipeline, 'train_iterator', iterator)


def _recorder():
    seen = {}

    def on_step(step, state):
        seen[step] = state
    return seen, on_step


def test_a_non_finite_step_stops_the_run_at_that_step(monkeypatch, tmp_path):
    _nan_batches(monkeypatch, {5})
    seen, on_step = _recorder()
    with pytest.raises(FloatingPointError,
                       match=r'stopped at step 5: .*loss=nan.*last good checkpoint: step 3'):
        train.train_and_evaluate(mlp_config(), str(tmp_path), on_step=on_step)
    assert checkpointing.valid_steps(str(tmp_path)) == [3]  # nothing saved after the NaN
    # The state never took the update: after step 5 it is the state of step 4.
    assert max(seen) <= 6
    for step in range(5, max(seen) + 1):
        assert_states_equal(seen[step], seen[4])
        assert int(seen[step].skipped) == 1
    assert all(np.all(np.isfinite(x)) for x in leaves(seen[4].params))


def test_skip_nonfinite_steps_skips_counts_and_stops_after_n(monkeypatch, tmp_path):
    config = mlp_config()
    config.training.skip_nonfinite_steps = 1
    _nan_batches(monkeypatch, {5})
    seen, on_step = _recorder()
    final = train.train_and_evaluate(config, str(tmp_path / 'skip'), on_step=on_step)
    assert int(final.step) == 8 and int(final.skipped) == 1
    assert_states_equal(seen[5], seen[4])  # params, EMA, optimiser and sampler unchanged
    assert not np.array_equal(leaves(seen[6].params)[0], leaves(seen[5].params)[0])
    assert all(np.all(np.isfinite(x)) for x in leaves(final.params))
    # Two NaN batches with N = 1: the second one stops the run.
    _nan_batches(monkeypatch, {5, 7})
    with pytest.raises(FloatingPointError, match=r'stopped at step 7: .*2 non-finite steps'):
        train.train_and_evaluate(config, str(tmp_path / 'stop'))
    assert checkpointing.valid_steps(str(tmp_path / 'stop')) == [3, 6]


def test_a_failing_save_names_the_path_and_leaves_the_previous_checkpoint(
        reference, monkeypatch, tmp_path):
    workdir = str(tmp_path / 'run')
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(28, 'No space left on device')
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
    with pytest.raises(checkpointing.SaveError) as err:
        train.train_and_evaluate(mlp_config(), workdir)
    message = str(err.value)
    assert '\n' not in message
    assert f'{checkpointing.checkpoint_dir(workdir)}/6' in message
    assert 'No space left' in message and 'step 3' in message and 'intact' in message
    monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
    assert checkpointing.valid_steps(workdir) == [3]
    resumed = train.train_and_evaluate(mlp_config(), workdir)  # and it is restorable
    assert_states_equal(resumed, reference[1])


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_current_step_before_periodic_sampling(tmp_path, signum):
    config = mlp_config()
    config.training.update(sample_every_steps=4, num_sample_images=8)

    def stop_at_4(step, _):
        if step == 4:
            os.kill(os.getpid(), signum)

    stopped = train.train_and_evaluate(config, str(tmp_path), on_step=stop_at_4)
    assert int(stopped.step) == 4
    assert checkpointing.valid_steps(str(tmp_path)) == [3, 4]
    assert not (tmp_path / 'samples' / '4').exists()  # the stop came first
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)


def test_clipping_and_weight_decay_on_or_off_keep_the_optimiser_state_structure():
    config = mlp_config()
    config.optim.warmup_steps = 0
    params = models.init_params(models.get_model(config.model), jax.random.key(0))['params']
    # Two steps: a large gradient (global norm > 1: clipped) then a small one (not clipped), so
    # that clipping changes Adam's ratio m/sqrt(v) (one step alone is scale invariant).
    grads = [jax.tree.map(lambda p, c=c: jnp.full_like(p, c), params) for c in (0.3, 1e-3)]
    assert optax.global_norm(grads[0]) > 1 > optax.global_norm(grads[1])

    def two_updates(optimizer):
        state = optimizer.init(params)
        structure = jax.tree.structure(state)
        for g in grads:
            updates, state = optimizer.update(g, state, params)
        assert jax.tree.structure(state) == structure
        return structure, leaves(updates)

    structures, updates = set(), {}
    for clip in (0.0, 1.0):
        for decay in (0.0, 0.1):
            config.optim.update(grad_clip=clip, weight_decay=decay)
            structure, updates[clip, decay] = two_updates(train.create_optimizer(config.optim)[0])
            structures.add(structure)
    assert len(structures) == 1
    # Off means off, exactly: no clipping and no decay is plain Adam.
    o = config.optim
    _, want = two_updates(optax.adam(o.learning_rate, o.b1, o.b2, o.eps))
    for a, b in zip(updates[0.0, 0.0], want):
        np.testing.assert_array_equal(a, b)
    # And on means on.
    for changed in ((1.0, 0.0), (0.0, 0.1)):
        assert any(not np.array_equal(a, b)
                   for a, b in zip(updates[changed], updates[0.0, 0.0])), changed


def test_the_fid_reference_cache_is_keyed_on_what_changes_the_statistics(tmp_path):
    from diffusion_jax.evaluation import fid  # pylint: disable=import-outside-toplevel
    calls = []

    def compute(value):
        def fn():
            calls.append(value)
            return {'mu': np.full(3, value)}
        return fn

    path = tmp_path / 'ref.npz'
    key = {'dataset': 'cifar10', 'split': 'train', 'image_size': 32, 'weights': 'a.npz'}
    first = fid.reference_stats(path, compute(1.0), key=key)
    again = fid.reference_stats(path, compute(2.0), key=key)  # cached: not recomputed
    other = fid.reference_stats(path, compute(3.0), key=dict(key, image_size=64))
    assert calls == [1.0, 3.0]
    np.testing.assert_array_equal(again['mu'], first['mu'])
    np.testing.assert_array_equal(other['mu'], np.full(3, 3.0))
    assert len(list(tmp_path.glob('ref_*.npz'))) == 2
    # A file under the key's name but made for another key is not trusted.
    target = next(p for p in tmp_path.glob('ref_*.npz')
                  if p.name == f'ref{fid.cache_key_suffix(key)}.npz')
    np.savez(target, mu=np.zeros(3), cache_key=np.asarray('{"dataset": "mnist"}'))
    np.testing.assert_array_equal(fid.reference_stats(path, compute(4.0), key=key)['mu'],
                                  np.full(3, 4.0))


def test_fault_injection_short_version(tmp_path):
    """experiments/fault_injection.py with 3 SIGKILLs (one during an async save)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
    import fault_injection  # pylint: disable=import-outside-toplevel
    report = fault_injection.run(str(tmp_path / 'fi'), kills=3, steps=40, every=10, seed=1)
    assert report['kills_delivered'] == report['kills_survived'] == 3, report
    assert report['final_exit_status'] == 0
    assert 0 <= report['max_steps_lost'] <= 10, report
    assert report['bit_equal'] == {'params': True, 'ema_params': True, 'opt_state': True,
                                   'extra': True}, report
