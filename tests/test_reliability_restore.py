"""Restore errors that are not damage, and the agreement of processes on what is damaged.

A checkpoint is moved to checkpoints_damaged/ (training) or skipped (readers) only when
`checkpointing.damage()` or an array-read error proves it damaged; a structure mismatch, an
out-of-memory or a transient storage error raises RestoreError naming the step and the cause,
and nothing on disk changes. Several processes decide together (an all-gather of what each
found), so one process's failure is every process's failure. 8 fake CPU devices, the swiss-roll
MLP run of test_reliability (checkpoints at steps 3, 6 and 8).
"""
import glob
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpointing, config_validation, models, sharding, train
from diffusion_jax import run as run_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import leaves, mlp_config, snapshot  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('fast_compiles')

# What the storage and the runtime raise for causes that say nothing about the stored bytes
# (tensorstore and XLA prefix absl status codes to their messages).
NOT_DAMAGE = {
    'out of memory': 'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.',
    'transient storage error': ('UNAVAILABLE: Error reading "a/0" in OCDBT database at '
                                '"gs://bucket/run/checkpoints/8/params/": connection reset'),
    'permission': ('PERMISSION_DENIED: Error reading local file '
                   '"/run/checkpoints/8/params/manifest.ocdbt": Permission denied'),
}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('reference'))
    train.train_and_evaluate(mlp_config(), workdir)
    assert checkpointing.valid_steps(workdir) == [3, 6, 8]
    return workdir


@pytest.fixture(scope='module')
def abstract_state():
    config = mlp_config()
    optimizer, _ = train.create_optimizer(config.optim)
    return train.abstract_train_state(config, models.get_model(config.model), optimizer,
                                      sharding.make_mesh())


def _copy(reference, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference, workdir)
    return workdir


def _raise_at(monkeypatch, message, bad_step=8):
    original = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        if step == bad_step:
            raise ValueError(message)
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)


def _params_target(state):
    return {'params': state.params}


@pytest.mark.parametrize('kind', sorted(NOT_DAMAGE))
def test_training_restore_reraises_a_cause_that_is_not_damage_and_moves_nothing(
        reference, abstract_state, tmp_path, monkeypatch, kind):
    workdir = _copy(reference, tmp_path)
    before = snapshot(workdir)
    _raise_at(monkeypatch, NOT_DAMAGE[kind])
    ckpt = checkpointing.Checkpointer(workdir, keep=5)
    try:
        with pytest.raises(checkpointing.RestoreError) as info:
            ckpt.restore(abstract_state)
    finally:
        ckpt.close()
    text = str(info.value)
    assert '\n' not in text and 'step 8' in text and NOT_DAMAGE[kind].split(':')[0] in text
    assert snapshot(workdir) == before
    assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))


@pytest.mark.parametrize('kind', sorted(NOT_DAMAGE))
def test_readers_reraise_a_cause_that_is_not_damage(reference, abstract_state, tmp_path,
                                                      monkeypatch, kind):
    workdir = _copy(reference, tmp_path)
    before = snapshot(workdir)
    _raise_at(monkeypatch, NOT_DAMAGE[kind])
    with pytest.raises(checkpointing.RestoreError, match='step 8'):
        checkpointing.restore_items(workdir, _params_target(abstract_state))
    assert snapshot(workdir) == before


def test_a_structure_mismatch_is_not_damage(reference, abstract_state, tmp_path):
    """A train state of another structure (here an optimiser state with one more leaf) than the
    checkpoint's: orbax's own mismatch error, reported, and every checkpoint kept."""
    workdir = _copy(reference, tmp_path)
    before = snapshot(workdir)
    other = abstract_state.replace(opt_state=(
        abstract_state.opt_state,
        jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(sharding.make_mesh()))))
    ckpt = checkpointing.Checkpointer(workdir, keep=5)
    try:
        with pytest.raises(checkpointing.RestoreError, match='step 8.*do not match'):
            ckpt.restore(other)
    finally:
        ckpt.close()
    assert snapshot(workdir) == before
    assert checkpointing.valid_steps(workdir) == [3, 6, 8]


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def _corrupt(path):
    data = bytearray(pathlib.Path(path).read_bytes())
    for i in range(len(data) // 3, len(data)):
        data[i] ^= 0x5A
    pathlib.Path(path).write_bytes(data)


ARRAY_DAMAGE = {'truncated': _truncate, 'corrupted': _corrupt, 'deleted': os.remove}


@pytest.mark.parametrize('kind', sorted(ARRAY_DAMAGE))
def test_damaged_arrays_are_still_skipped_and_quarantined(reference, abstract_state, tmp_path,
                                                          kind):
    """The proof of damage: a data file of step 8 truncated, corrupted or deleted (structure
    intact, so only the read finds it). Readers skip it; training moves it and uses step 6."""
    workdir = _copy(reference, tmp_path)
    paths = glob.glob(os.path.join(checkpointing.checkpoint_dir(workdir), '8', '*', 'd', '*'))
    assert paths
    for path in paths:
        ARRAY_DAMAGE[kind](path)
    assert checkpointing.read_damage(ValueError(NOT_DAMAGE['out of memory'])) is None
    out, step = checkpointing.restore_items(workdir, _params_target(abstract_state))
    assert step == 6 and all(np.isfinite(x).all() for x in leaves(out['params']))
    ckpt = checkpointing.Checkpointer(workdir, keep=5)
    try:
        state = ckpt.restore(abstract_state)
    finally:
        ckpt.close()
    assert int(state.step) == 6
    assert os.path.isdir(os.path.join(workdir, checkpointing.DAMAGED_DIR, '8'))
    assert checkpointing.valid_steps(workdir) == [3, 6]


def test_processes_agree_before_anything_moves(reference, abstract_state, tmp_path,
                                               monkeypatch):
    """This process reads step 8 fine; another process's restore failed (code 2: not damage)
    or found it damaged (code 1). The first stops every process with nothing moved; the
    second moves step 8 on process 0 for all of them."""
    workdir = _copy(reference, tmp_path)
    before = snapshot(workdir)
    monkeypatch.setattr(checkpointing, '_agree', lambda code: [code, 2])
    ckpt = checkpointing.Checkpointer(workdir, keep=5)
    try:
        with pytest.raises(checkpointing.RestoreError, match='step 8.*process 1 failed'):
            ckpt.restore(abstract_state)
    finally:
        ckpt.close()
    assert snapshot(workdir) == before

    calls = []

    def other_found_damage(code):
        calls.append(code)
        return [code, 1 if len(calls) == 1 else 0]
    monkeypatch.setattr(checkpointing, '_agree', other_found_damage)
    ckpt = checkpointing.Checkpointer(workdir, keep=5)
    try:
        state = ckpt.restore(abstract_state)
    finally:
        ckpt.close()
    assert calls == [0, 0] and int(state.step) == 6
    assert checkpointing.valid_steps(workdir) == [3, 6]
    assert os.path.isdir(os.path.join(workdir, checkpointing.DAMAGED_DIR, '8'))


def _remove_markers(step_dir):
    for path in glob.glob(os.path.join(step_dir, '**', checkpointing.COMMIT_MARKER),
                          recursive=True):
        os.remove(path)


def test_the_legacy_layout_without_commit_markers_is_trusted_and_restores(
        reference, abstract_state, tmp_path):
    """Orbax before 0.12.3 finalized a local step by the rename alone: no commit_success.txt in
    the step or its items. Such a step is valid and restores equal to the original; a step
    whose own marker alone is missing (items carry theirs) and a bare folder stay damaged."""
    workdir = _copy(reference, tmp_path)
    folder = checkpointing.checkpoint_dir(workdir)
    _remove_markers(os.path.join(folder, '8'))
    os.remove(os.path.join(folder, '6', checkpointing.COMMIT_MARKER))
    os.makedirs(os.path.join(folder, '9', 'params'))
    assert checkpointing.damage(os.path.join(folder, '8')) is None
    assert 'no commit marker' in checkpointing.damage(os.path.join(folder, '6'))
    assert 'no commit marker' in checkpointing.damage(os.path.join(folder, '9'))
    assert checkpointing.valid_steps(workdir) == [3, 8]
    out, step = checkpointing.restore_items(workdir, _params_target(abstract_state))
    want, _ = checkpointing.restore_items(reference, _params_target(abstract_state), step=8)
    assert step == 8
    for a, b in zip(leaves(out['params']), leaves(want['params'])):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# A run from the previous release
# ----------------------------------------------------------------------------------------------
# Fields today's config.json has that the first release's did not write (data.prefetch it did;
# dropped too, to cover every entry of run.ABSENT_DEFAULTS).
ADDED_SINCE = ('data.num_workers', 'data.prefetch', 'diffusion.rescale_zero_terminal_snr')


def _all_items(state):
    return dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                extra=dict(step=state.step, sampler=state.sampler_state, skipped=state.skipped))


def _previous_release_run(reference, abstract_state, workdir, step=6):
    """The reference run as the first release wrote it: config.json without the fields added
    since, and a checkpoint whose `extra` item holds only step and sampler (no `skipped`)."""
    config = json.loads(pathlib.Path(reference, 'config.json').read_text())
    for path in ADDED_SINCE:
        section, field = path.split('.')
        del config[section][field]
    os.makedirs(workdir)
    pathlib.Path(workdir, 'config.json').write_text(json.dumps(config, indent=2))
    out, _ = checkpointing.restore_items(reference, _all_items(abstract_state), step=step)
    out['extra'] = {k: out['extra'][k] for k in ('step', 'sampler')}
    manager = ocp.CheckpointManager(
        checkpointing.checkpoint_dir(workdir),
        item_handlers={k: ocp.StandardCheckpointHandler() for k in checkpointing.ITEMS})
    manager.save(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardSave(v) for k, v in out.items()}))
    manager.wait_until_finished()
    manager.close()


def test_a_run_of_the_previous_release_resumes_and_ends_as_the_uninterrupted_one(
        reference, abstract_state, tmp_path):
    workdir = str(tmp_path / 'old')
    _previous_release_run(reference, abstract_state, workdir)
    stored = json.loads(pathlib.Path(workdir, 'config.json').read_text())
    assert run_lib.section_differences(stored, config_validation.resolve(mlp_config()),
                                       run_lib.RESUME_SECTIONS) == []
    resumed = train.train_and_evaluate(mlp_config(), workdir)
    assert int(resumed.step) == 8 and int(resumed.skipped) == 0
    want, _ = checkpointing.restore_items(reference, _all_items(abstract_state), step=8)
    got = _all_items(resumed)
    for item in ('params', 'ema_params', 'opt_state', 'extra'):
        for a, b in zip(leaves(got[item]), leaves(want[item])):
            np.testing.assert_array_equal(a, b, err_msg=item)
    # Sampling and evaluation read it too: the stored config's absent fields take defaults.
    loaded = run_lib.load(workdir)
    assert loaded.step == 8 and loaded.config.data.num_workers == 0


# ----------------------------------------------------------------------------------------------
# Fields that are not part of what was trained
# ----------------------------------------------------------------------------------------------
def test_a_run_resumes_with_other_data_location_workers_and_prefetch(reference, abstract_state,
                                                                     tmp_path):
    """Resumed from step 6 with data.data_dir, data.num_workers and data.prefetch changed (what
    a move to another machine changes): no refusal, and the run ends bit-equal to the
    uninterrupted one (batches are a function of seed and step). A trained field still
    refuses in one line."""
    workdir = _copy(reference, tmp_path)
    shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(workdir), '8'))
    config = mlp_config()
    config.data.update(data_dir=str(tmp_path / 'elsewhere'), num_workers=2, prefetch=1)
    resumed = train.train_and_evaluate(config, workdir)
    want, _ = checkpointing.restore_items(reference, _all_items(abstract_state), step=8)
    got = _all_items(resumed)
    for item in ('params', 'ema_params', 'opt_state', 'extra'):
        for a, b in zip(leaves(got[item]), leaves(want[item])):
            np.testing.assert_array_equal(a, b, err_msg=item)
    stored = json.loads(pathlib.Path(workdir, 'config.json').read_text())
    assert stored['data']['num_workers'] == 2  # config.json follows, the old one kept aside
    assert glob.glob(os.path.join(workdir, 'config_6*.json'))
    for path in run_lib.UNTRAINED_FIELDS:  # model.dtype/attention: compared nowhere either
        section, field = path.split('.')
        other = json.loads(json.dumps(stored))
        other[section][field] = 'changed'
        assert run_lib.section_differences(stored, other, run_lib.RESUME_SECTIONS,
                                           skip=run_lib.UNTRAINED_FIELDS) == []
    config.model.hidden_dim = 64
    with pytest.raises(ValueError, match=r'model.hidden_dim: 32 -> 64') as info:
        run_lib.check_resume(workdir, config_validation.resolve(config))
    assert '\n' not in str(info.value)


def test_sample_and_eval_take_untrained_fields_from_this_machine(reference):
    typed = {'data.data_dir': '/data/elsewhere', 'data.num_workers': 3, 'data.prefetch': 1,
             'model.dtype': 'bfloat16'}
    loaded = run_lib.load(reference, typed)
    for path, value in typed.items():
        section, field = path.split('.')
        assert loaded.config[section][field] == value
    assert loaded.model.dtype == 'bfloat16' and loaded.step == 8
    given = mlp_config()
    given.data.num_workers = 4
    given.model.hidden_dim = 64  # a trained field of a passed config: the stored one is used
    merged = run_lib.merge_config(run_lib.Run(reference).config, given)
    assert merged.data.num_workers == 4 and merged.model.hidden_dim == 32
    with pytest.raises(ValueError, match='model.hidden_dim=64 differs'):
        run_lib.load(reference, {'model.hidden_dim': 64})
