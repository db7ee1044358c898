"""A run moves between process counts and FSDP meshes (issue #24 item 7, issue #20's FSDP
restore): saved by 2 processes x 4 devices with sharding.fsdp=4, then resumed, sampled
(--mode=sample) and evaluated (--mode=eval) on 1 device and resumed on 8 devices with fsdp=2;
and the reverse, a 1-device checkpoint resumed by 2 x 4 processes and on 8 devices with fsdp=4.

Truths (identities between code paths): the uninterrupted 2 x 4, fsdp=4 run is the reference
for every resumed run (the same seed and batches, so the same parameters up to float32
reduction order, <= 1e-5 of each array's scale; integers exact); sampling and evaluating a
checkpoint on 1 device equals doing it on this process's 8 devices (the same parameters and
keys; only the batch split differs). Orbax restores every array onto the sharding of the mesh
that restores it. The whole drivers run (train.train_and_evaluate, generate.run_resolved,
evaluate.run_resolved: what main runs), not only the loading.

One 2 x 4 run is trained (steps 0 -> 8, checkpoints 4 and 8), one 1-device subprocess does all
the 1-device work, and one more 2 x 4 launch resumes the 1-device run: JAX starts 5 times.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, generate, run, train
from diffusion_jax.evaluation import evaluate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
from test_multiprocess import Launch, _config, _restore  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_compiles')
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 4
# Seconds for any one launch or subprocess (JAX start-up and compiles included; generous
# because the suite's machine is shared: a hung collective still cannot hang the suite).
TIMEOUT = 900
CHANGES = {'training.num_train_steps': STEPS, 'training.log_every_steps': EVERY,
           'training.checkpoint_every_steps': EVERY, 'sampling.num_samples': 64,
           'sampling.batch_size': 64, 'eval.batch_size': 64, 'eval.num_batches': 2}

# On 1 CPU device (argv: a JSON list of jobs): ['train', workdir, steps, fsdp] resumes or starts
# the run; ['sample' | 'eval', workdir] runs that mode's driver on the stored config. Prints one
# JSON line: the eval results, by workdir.
ONE_DEVICE = '''
import json, sys
sys.path.insert(0, sys.argv[2])
import jax
from test_restore_topology import CHANGES, config_for
from diffusion_jax import generate, run, train
from diffusion_jax.evaluation import evaluate
assert jax.device_count() == 1
out = {}
for job in json.loads(sys.argv[1]):
    if job[0] == 'train':
        train.train_and_evaluate(config_for(job[2], job[3]), job[1])
    elif job[0] == 'sample':
        generate.run_resolved(run.resolve_config(job[1], None, {}, 'sample'), job[1])
    else:
        out[job[1]] = evaluate.run_resolved(run.resolve_config(job[1], None, {}, 'eval'), job[1])
print('RESULT', json.dumps(out, default=float))
'''


def config_for(steps: int, fsdp: int):
    """The run of this file (test_multiprocess's swiss-roll MLP at STEPS/EVERY) with `steps`
    train steps and sharding.fsdp=fsdp; the compile cache off."""
    config = _config(**{**CHANGES, 'training.num_train_steps': steps})
    config.sharding.fsdp = fsdp
    config.compile_cache_dir = ''
    return config


def _on_one_device(jobs) -> dict:
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
    out = subprocess.run([sys.executable, '-c', ONE_DEVICE, json.dumps(jobs), str(ROOT / 'tests')],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


def _wait(launch):
    """Launch.wait with this file's TIMEOUT; every process killed at the end."""
    deadline = time.monotonic() + TIMEOUT
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in launch.procs]
    finally:
        launch.kill()


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for step in drop:
        shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(dst), str(step)))
    return str(dst)


def _assert_state_close(got, want):
    for item in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(got[item], want[item]):
            assert a.shape == b.shape, item
            scale = max(float(np.max(np.abs(b))), 1e-30)
            assert float(np.max(np.abs(a - b))) / scale <= 1e-5, item
    for a, b in zip(got['extra'], want['extra']):  # step, sampler state, skip count
        np.testing.assert_array_equal(a, b)


def _samples(workdir, step):
    with np.load(os.path.join(workdir, 'samples', str(step), 'samples.npz')) as f:
        return np.asarray(f['points'])


def _assert_results_close(got: dict, want: dict):
    """Every number of two eval results within 1e-5 relative; the rest equal."""
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_results_close(got[key], value)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert got[key] == value, key


@pytest.fixture(scope='module')
def moved(tmp_path_factory):
    """Everything that needs another process: the reference 2 x 4 run (fsdp=4), the 1-device
    subprocess's resumed / sampled / evaluated / fresh runs, and the 2 x 4 resume of the
    fresh 1-device run."""
    base = tmp_path_factory.mktemp('topology')
    reference = str(base / 'two_by_four')
    launch = Launch(reference, 'reference', extra=['--config.sharding.fsdp=4'],
                    **{k: v for k, v in CHANGES.items()})
    assert _wait(launch) == [0, 0], launch.text(0)[-3000:]
    assert checkpointing._steps_on_disk(reference) == [EVERY, STEPS]  # pylint: disable=protected-access
    dirs = {'resumed_on_one': _copy(reference, base / 'resumed_on_one', drop=[STEPS]),
            'used_on_one': _copy(reference, base / 'used_on_one'),
            'born_on_one': str(base / 'born_on_one')}
    results = _on_one_device([
        ['train', dirs['resumed_on_one'], STEPS, 1],
        ['sample', dirs['used_on_one']], ['eval', dirs['used_on_one']],
        ['train', dirs['born_on_one'], EVERY, 1],
        ['sample', dirs['born_on_one']], ['eval', dirs['born_on_one']]])
    dirs['born_resumed_by_two'] = _copy(dirs['born_on_one'], base / 'born_resumed_by_two')
    launch = Launch(dirs['born_resumed_by_two'], 'reverse', extra=['--config.sharding.fsdp=4'],
                    **{k: v for k, v in CHANGES.items()})
    assert _wait(launch) == [0, 0], launch.text(0)[-3000:]
    assert 'resumed from' in launch.text(0)
    return reference, dirs, results


def test_two_processes_fsdp4_checkpoint_resumes_on_one_device_and_on_fsdp2(moved, tmp_path):
    reference, dirs, _ = moved
    want = _restore(reference, STEPS)
    _assert_state_close(_restore(dirs['resumed_on_one'], STEPS), want)
    # The same checkpoint resumed here on 8 devices with fsdp=2.
    workdir = _copy(reference, tmp_path / 'fsdp2', drop=[STEPS])
    state = train.train_and_evaluate(config_for(STEPS, 2), workdir)
    assert int(state.step) == STEPS
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(state.params))  # fsdp=2 shards the large arrays
    _assert_state_close(_restore(workdir, STEPS), want)


def test_two_processes_fsdp4_run_samples_and_evaluates_on_one_device(moved, tmp_path):
    """--mode=sample and --mode=eval of the 2 x 4, fsdp=4 run on 1 device equal the same
    drivers on this process's 8 devices."""
    reference, dirs, results = moved
    here = _copy(reference, tmp_path / 'here')
    generate.run_resolved(run.resolve_config(here, None, {}, 'sample'), here)
    want = evaluate.run_resolved(run.resolve_config(here, None, {}, 'eval'), here)
    got_points, want_points = _samples(dirs['used_on_one'], STEPS), _samples(here, STEPS)
    assert want_points.shape == (64, 2) and np.std(want_points) > 0.1
    scale = float(np.max(np.abs(want_points)))
    assert float(np.max(np.abs(got_points - want_points))) / scale <= 1e-5
    _assert_results_close(json.loads(json.dumps(results[dirs['used_on_one']], default=float)),
                          json.loads(json.dumps(want, default=float)))
    assert want['nll']['step'] == STEPS and want['nll']['num_images'] == 128


def test_one_device_checkpoint_resumes_on_two_processes_and_on_fsdp4(moved, tmp_path):
    """The reverse: the run trained to step 4 on 1 device, resumed to step 8 by 2 x 4
    processes with fsdp=4 and, here, on 8 devices with fsdp=4, ends as the reference run; its
    step-4 checkpoint sampled and evaluated here on 8 devices equals the 1-device drivers."""
    reference, dirs, results = moved
    want = _restore(reference, STEPS)
    _assert_state_close(_restore(dirs['born_resumed_by_two'], STEPS), want)
    workdir = _copy(dirs['born_on_one'], tmp_path / 'fsdp4')
    shutil.rmtree(os.path.join(workdir, 'samples'))
    state = train.train_and_evaluate(config_for(STEPS, 4), workdir)
    assert int(state.step) == STEPS
    _assert_state_close(_restore(workdir, STEPS), want)
    here = _copy(dirs['born_on_one'], tmp_path / 'born_here')
    shutil.rmtree(os.path.join(here, 'samples'))
    generate.run_resolved(run.resolve_config(here, None, {}, 'sample'), here)
    got = evaluate.run_resolved(run.resolve_config(here, None, {}, 'eval'), here)
    want_points = _samples(dirs['born_on_one'], EVERY)
    assert float(np.max(np.abs(_samples(here, EVERY) - want_points))) / float(
        np.max(np.abs(want_points))) <= 1e-5
    _assert_results_close(json.loads(json.dumps(got, default=float)),
                          json.loads(json.dumps(results[dirs['born_on_one']], default=float)))
