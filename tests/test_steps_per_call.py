"""training.steps_per_call = K: K train steps per jitted call (a lax.scan) give the run of one step
per call (same parameters, EMA, optimiser and sampler state, same logged metrics); cadences, the
step count and a resumed checkpoint must be multiples of K (one line otherwise, nothing written);
a non-finite step inside a call stops the run at that step. 8 fake CPU devices, the swiss roll MLP
of test_train (loss-aware sampling, learned variance, dropout) and the smallest UNet."""
import json
import os
import pathlib
import signal
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, config_validation, input_pipeline, models, sharding
from diffusion_jax import train
from diffusion_jax import diffusion as diffusion_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable-next=wrong-import-position
from test_reliability import FIELDS, _nan_batches  # noqa: E402
from test_train import leaves, mlp_config, snapshot, unet_config  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('fast_compiles')


def config_k(k, steps=8):
    c = mlp_config(steps)
    c.training.update(steps_per_call=k, log_every_steps=4, checkpoint_every_steps=4)
    return c


def metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def assert_close_states(got, want):
    """Equal up to float32 rounding: the scan body is compiled as its own computation, so XLA
    may fuse (and round) it differently from the one-step program."""
    for field in FIELDS:
        for a, b in zip(leaves(getattr(got, field)), leaves(getattr(want, field))):
            if np.issubdtype(a.dtype, np.integer):
                np.testing.assert_array_equal(a, b, err_msg=field)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=field)


@pytest.fixture(scope='module')
def one_step_run(tmp_path_factory):
    """K = 1, 8 steps, logs and checkpoints every 4: (workdir, final state)."""
    workdir = str(tmp_path_factory.mktemp('k1'))
    return workdir, train.train_and_evaluate(config_k(1), workdir)


def test_four_steps_per_call_equal_one_step_per_call(one_step_run, tmp_path):
    workdir1, state1 = one_step_run
    workdir4 = str(tmp_path / 'k4')
    calls = []
    state4 = train.train_and_evaluate(config_k(4), workdir4,
                                      on_step=lambda step, _: calls.append(step))
    assert calls == [4, 8]  # on_step once per call
    assert int(state4.step) == 8 and checkpointing._steps_on_disk(workdir4) == [4, 8]
    assert_close_states(state4, state1)
    rows1, rows4 = metrics(workdir1), metrics(workdir4)
    assert [r['step'] for r in rows4] == [r['step'] for r in rows1] == [4, 8]
    for r1, r4 in zip(rows1, rows4):
        for key in ('loss', 'mse', 'vb', 'grad_norm', 'learning_rate', 'loss_q0', 'loss_q3'):
            if key in r1:
                np.testing.assert_allclose(r4[key], r1[key], rtol=1e-5, err_msg=key)
    # The learning rate logged is that of the call's last step (warm-up over 2 steps: full).
    assert rows4[0]['learning_rate'] == pytest.approx(3e-3)


def test_multi_step_equals_k_single_steps_on_a_unet():
    """make_multi_step itself, on the smallest UNet, its [K, B, ...] batch sharded on axis 1."""
    config = unet_config()
    model = models.get_model(config.model)
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    step_fn = train.make_train_step(config, model, diffusion, optimizer, schedule)
    mesh = sharding.make_mesh()
    ds = input_pipeline.get_dataset(config.data, 'train')
    batches = list(zip(range(3), input_pipeline.train_iterator(ds, 16, seed=0)))
    stacked = next(input_pipeline.stack_batches(iter(b for _, b in batches), 3))
    assert stacked['image'].shape == (3, 16, 8, 8, 1)
    fresh = lambda: sharding.replicate(  # noqa: E731
        train.create_train_state(config, model, optimizer, jax.random.key(0)), mesh)
    rng = jax.random.key(1)
    multi = train.compile_train_step(train.make_multi_step(step_fn, 3), mesh, fresh(),
                                     sharding.shard_batch(stacked, mesh, 1), rng, batch_axis=1)
    placed = sharding.shard_batch(stacked, mesh, 1)
    assert placed['image'].sharding.spec == jax.sharding.PartitionSpec(None, ('data', 'fsdp'))
    state3, m3 = multi(fresh(), placed, rng)
    single = train.compile_train_step(step_fn, mesh, fresh(),
                                      sharding.shard_batch(batches[0][1], mesh), rng)
    state1, losses = fresh(), []
    for _, batch in batches:
        state1, m1 = single(state1, sharding.shard_batch(batch, mesh), rng)
        losses.append(float(m1['loss']))
    assert m3['loss'].shape == (3,) and int(state3.step) == 3
    np.testing.assert_allclose(np.asarray(m3['loss']), losses, rtol=1e-5)
    # Adam divides by √v, so where a gradient is ~0 (biases that a GroupNorm cancels, the
    # zero-initialised output convs at step 1) float32 rounding differences between the two
    # programs become whole updates. So the test is on the update as a whole: the two runs'
    # parameters differ by < 0.3% of how far they moved from init (another batch or key would
    # move them elsewhere: ~100%).
    flat = lambda tree: np.concatenate([x.ravel() for x in leaves(tree)])  # noqa: E731
    p3, p1, p0 = flat(state3.params), flat(state1.params), flat(fresh().params)
    assert np.linalg.norm(p3 - p1) < 3e-3 * np.linalg.norm(p1 - p0)  # measured: 2.5e-4
    for a, b in zip(leaves(state3.sampler_state), leaves(state1.sampler_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_resume_with_k_from_a_step_k_does_not_divide_is_one_line(one_step_run, tmp_path):
    workdir = str(tmp_path / 'run')

    def preempt_at_6(step, _):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.train_and_evaluate(config_k(1), workdir, on_step=preempt_at_6)
    assert int(stopped.step) == 6 and checkpointing._steps_on_disk(workdir) == [4, 6]
    before = snapshot(workdir)
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(config_k(4), workdir)
    assert str(err.value) == (
        f'training.steps_per_call=4 does not divide step 6, the checkpoint in '
        f'{checkpointing.checkpoint_dir(workdir)} this run resumes from (calls of 4 steps start '
        'at multiples of 4): resume with --config.training.steps_per_call=2 and change it at a '
        'checkpoint that is a multiple of 4.')
    assert snapshot(workdir) == before  # nothing written
    # With K = 2 (which divides 6) the run finishes like the uninterrupted K = 1 one.
    resumed = train.train_and_evaluate(config_k(2), workdir)
    assert int(resumed.step) == 8
    assert_close_states(resumed, one_step_run[1])


def test_a_non_finite_step_inside_a_call_stops_the_run_at_that_step(monkeypatch, tmp_path):
    _nan_batches(monkeypatch, {6})
    seen = {}
    with pytest.raises(FloatingPointError,
                       match=r'stopped at step 6: .*loss=nan.*last good checkpoint: step 4'):
        train.train_and_evaluate(config_k(4), str(tmp_path),
                                 on_step=lambda step, state: seen.update({step: state}))
    assert checkpointing.valid_steps(str(tmp_path)) == [4]
    # Steps 6..8 of the call changed nothing: the state after the call is the one after step 5,
    # which differs from the state after step 4 (step 5 was applied).
    assert int(seen[8].skipped) == 1 and int(seen[8].step) == 8
    assert not np.array_equal(leaves(seen[8].params)[0], leaves(seen[4].params)[0])
    assert all(np.all(np.isfinite(x)) for x in leaves(seen[8].params))


def test_skipped_steps_inside_a_call_are_counted(monkeypatch, tmp_path):
    config = config_k(4)
    config.training.skip_nonfinite_steps = 2
    _nan_batches(monkeypatch, {2, 7})
    final = train.train_and_evaluate(config, str(tmp_path))
    assert int(final.step) == 8 and int(final.skipped) == 2
    rows = metrics(str(tmp_path))
    assert [r.get('skipped_steps') for r in rows] == [1.0, 2.0]
    assert all(np.isfinite(r['loss']) for r in rows)  # the means are over the applied steps


@pytest.mark.parametrize('update, message', [
    (dict(steps_per_call=0),
     'training.steps_per_call=0 must be an integer >= 1: the train steps run per jitted call '
     '(1: one step per call).'),
    (dict(steps_per_call=3),
     'training.num_train_steps=8 is not a multiple of training.steps_per_call=3: the loop logs, '
     'saves, samples and stops only between calls of 3 steps; set '
     '--config.training.num_train_steps=9 (or 6) or a steps_per_call that divides it.'),
    (dict(steps_per_call=4, log_every_steps=2),
     'training.log_every_steps=2 is not a multiple of training.steps_per_call=4: the loop logs, '
     'saves, samples and stops only between calls of 4 steps; set '
     '--config.training.log_every_steps=4 or a steps_per_call that divides it.'),
    (dict(steps_per_call=4, sample_every_steps=6),
     'training.sample_every_steps=6 is not a multiple of training.steps_per_call=4: the loop '
     'logs, saves, samples and stops only between calls of 4 steps; set '
     '--config.training.sample_every_steps=8 (or 4) or a steps_per_call that divides it.'),
], ids=['zero', 'steps', 'log_cadence', 'sample_cadence'])
def test_cadences_that_k_does_not_divide_are_refused(update, message, tmp_path):
    config = config_k(4)
    config.training.update(update)
    with pytest.raises(ValueError) as err:
        config_validation.resolve(config, 'train')
    assert str(err.value) == message
    with pytest.raises(ValueError):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_stack_batches_keeps_the_stream():
    stream = ({'x': np.full((2,), i)} for i in range(7))
    got = list(zip(range(3), input_pipeline.stack_batches(stream, 2)))
    np.testing.assert_array_equal(got[2][1]['x'], [[4, 4], [5, 5]])
    one = {'x': np.zeros(3)}
    assert next(input_pipeline.stack_batches(iter([one]), 1)) is one
