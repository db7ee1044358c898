"""Multi-process training from the command line: 2 processes x 4 CPU devices (gloo collectives,
jax.distributed on 127.0.0.1) against 1 process x 8 devices, a rerun of the same command
interrupted by a preemption signal to one process and by SIGKILL, and the agreed stop step.

Every wait is bounded (TIMEOUT), and every process started here is killed at the end, so a hung
collective cannot hang the suite.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, models, sharding, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import swissroll  # noqa: E402  pylint: disable=wrong-import-position

TIMEOUT = 240  # seconds for any one launch to finish (2 shared cores, JAX start-up included)
STEPS, EVERY = 40, 10
OVERRIDES = {  # the same tiny run for the command line and for the in-process reference
    'model.hidden_dim': 32, 'model.num_layers': 2, 'diffusion.num_timesteps': 10,
    'training.batch_size': 32, 'training.num_train_steps': STEPS,
    'training.log_every_steps': EVERY, 'training.checkpoint_every_steps': EVERY,
    'training.keep_checkpoints': 100, 'training.sample_every_steps': 0,
    'data.num_train_examples': 256,
}


def _config(**changes):
    config = swissroll.get_config()
    for key, value in {**OVERRIDES, **changes}.items():
        section, field = key.split('.')
        config[section][field] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Launch:
    """The same command on 2 processes (4 CPU devices each); logs in <workdir>.<tag>.p<i>.log."""

    def __init__(self, workdir, tag='run', extra=(), **changes):
        port = _free_port()
        env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
                   XLA_FLAGS='--xla_force_host_platform_device_count=4')
        flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **changes}.items()] + list(extra)
        self.logs = [f'{workdir}.{tag}.p{i}.log' for i in range(2)]
        self.procs = []
        for i in range(2):
            with open(self.logs[i], 'w', encoding='utf-8') as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, '-m', 'diffusion_jax.main',
                     f'--config={ROOT / "configs" / "swissroll.py"}', f'--workdir={workdir}',
                     *flags, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                     f'--process_id={i}'], cwd=ROOT, env=env, stdout=log,
                    stderr=subprocess.STDOUT))

    def wait(self):
        deadline = time.monotonic() + TIMEOUT
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    def text(self, i):
        return pathlib.Path(self.logs[i]).read_text(encoding='utf-8')


def _wait_for_step(workdir, above: int, launch) -> int:
    """Polls until a committed checkpoint newer than `above` exists; returns its step."""
    folder = pathlib.Path(checkpointing.checkpoint_dir(workdir))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done = [s for s in checkpointing._steps_on_disk(workdir)  # pylint: disable=protected-access
                if s > above and (folder / str(s) / 'commit_success.txt').exists()]
        if done:
            return min(done)
        assert all(p.poll() is None for p in launch.procs), launch.text(0)[-3000:]
        time.sleep(0.05)
    launch.kill()
    raise AssertionError(f'no checkpoint after step {above} within {TIMEOUT}s')


def _restore(workdir, step):
    """Every item of the checkpoint at `step`, restored onto this process's 8 devices."""
    config = _config()
    model = models.get_model(config.model)
    optimizer, _ = train.create_optimizer(config.optim)
    state = train.abstract_train_state(config, model, optimizer, sharding.make_mesh())
    targets = dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                   extra=dict(step=state.step, sampler=state.sampler_state,
                              skipped=state.skipped))
    out, _ = checkpointing.restore_items(workdir, targets, step=step)
    return {k: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(v))]
            for k, v in out.items()}


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('mp') / 'uninterrupted')
    launch = Launch(workdir)
    assert launch.wait() == [0, 0], launch.text(0)[-3000:]
    return workdir


def test_two_processes_equal_one_process_of_eight_devices(two_process_run, tmp_path):
    one = str(tmp_path / 'one')
    train.train_and_evaluate(_config(**{'training.num_train_steps': 2 * EVERY}), one)
    got, want = _restore(two_process_run, 2 * EVERY), _restore(one, 2 * EVERY)
    worst = 0.0
    for item in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(got[item], want[item]):
            worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    # The cross-process all-reduce sums in another order: float32 rounding, not bit-equality.
    assert worst <= 1e-5
    for a, b in zip(got['extra'], want['extra']):  # step, sampler state, skip count
        np.testing.assert_array_equal(a, b)


def test_two_processes_with_fsdp4_equal_one_process_of_eight_devices(two_process_run, tmp_path):
    """FSDP across processes (issue #20): 2 x 4 devices with sharding.fsdp=4 (the state split
    over 4 devices, the batch over all 8) train the same parameters as the 1 x 8 run."""
    workdir = str(tmp_path / 'fsdp4')
    launch = Launch(workdir, 'fsdp4', extra=['--config.sharding.fsdp=4',
                                             f'--config.training.num_train_steps={EVERY}'])
    assert launch.wait() == [0, 0], launch.text(0)[-3000:]
    assert 'params+opt per device' in launch.text(0) and '(sharding.fsdp=4)' in launch.text(0)
    got, want = _restore(workdir, EVERY), _restore(two_process_run, EVERY)
    for item in ('params', 'ema_params', 'opt_state'):
        for a, b in zip(got[item], want[item]):
            assert float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) <= 1e-5


def test_preempted_killed_and_restarted_rerun_is_bit_equal(two_process_run, tmp_path):
    workdir = str(tmp_path / 'interrupted')
    # 1. SIGTERM to process 1 only: both processes stop at the same step, save and exit 0.
    launch = Launch(workdir, 'preempted')
    _wait_for_step(workdir, 0, launch)
    launch.procs[1].send_signal(signal.SIGTERM)
    assert launch.wait() == [0, 0], launch.text(0)[-3000:]
    stops = [re.findall(r'stopping at step (\d+)', launch.text(i)) for i in range(2)]
    assert stops[0] and stops[0] == stops[1], stops
    stopped = int(stops[0][-1])
    assert stopped < STEPS and checkpointing.latest_step(workdir) == stopped
    # 2. The same command again; SIGKILL one process after the next checkpoint, then the other.
    launch = Launch(workdir, 'killed')
    _wait_for_step(workdir, stopped, launch)
    assert launch.procs[1].poll() is None, 'the run ended before it could be killed'
    launch.procs[1].kill()
    time.sleep(1)
    launch.kill()
    assert checkpointing.latest_step(workdir) < STEPS
    # 3. Both restarted: the run resumes and finishes, equal bit for bit to the uninterrupted one.
    launch = Launch(workdir, 'restarted')
    assert launch.wait() == [0, 0], launch.text(0)[-3000:]
    assert 'resumed from' in launch.text(0)
    got, want = _restore(workdir, STEPS), _restore(two_process_run, STEPS)
    for item in want:
        for a, b in zip(got[item], want[item]):
            np.testing.assert_array_equal(a, b, err_msg=item)


def test_preemption_stops_both_processes_with_several_steps_per_call(tmp_path):
    """training.steps_per_call=2: the step advances by 2 per call, and the preemption sync point
    (an id tested for equality) is a call count, so SIGTERM to one process still stops both at
    the same step, a multiple of 2, with that step's checkpoint."""
    workdir = str(tmp_path / 'k2')
    steps = 10 * STEPS  # long enough that the signal lands mid-run
    launch = Launch(workdir, 'k2', **{'training.steps_per_call': 2,
                                      'training.num_train_steps': steps})
    _wait_for_step(workdir, 0, launch)
    launch.procs[1].send_signal(signal.SIGTERM)
    assert launch.wait() == [0, 0], launch.text(0)[-3000:]
    stops = [re.findall(r'stopping at step (\d+)', launch.text(i)) for i in range(2)]
    assert stops[0] and stops[0] == stops[1], (stops, launch.text(1)[-2000:])
    stopped = int(stops[0][-1])
    assert stopped < steps and stopped % 2 == 0
    assert checkpointing.latest_step(workdir) == stopped
