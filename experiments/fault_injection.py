"""Fault injection: SIGKILL a training run at random moments, restart the same command each time,
and check that nothing is lost beyond the checkpoint interval and that the end result is the
uninterrupted run's, bit for bit.

    python experiments/fault_injection.py                       # 20 kills (the full figures)
    python experiments/fault_injection.py --kills=3 --steps=60  # the short version (the suite's)

The run is the swiss-roll MLP shrunk to a few thousand parameters (OVERRIDES), on one CPU device
with XLA's intra-op threads off, so that it costs one core. Every third kill waits for an
asynchronous checkpoint write to be in flight (orbax's `<step>.orbax-checkpoint-tmp-*` folder
present) and kills the process then; the others kill after a random number of steps. After the
last kill the command runs to the end. Reported: kills delivered and survived (the next launch
resumed from a valid checkpoint), kills that landed during a save, steps lost per kill (the
last step the killed launch logged minus the step the next launch resumed from; must be <= the
checkpoint interval, since training waits for each checkpoint to commit), and whether params, EMA, optimiser state and timestep-sampler state equal an
uninterrupted run of the same command bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERRIDES = {  # tiny: start-up and compilation dominate, the steps are milliseconds
    'model.hidden_dim': 32, 'model.num_layers': 2, 'diffusion.num_timesteps': 10,
    'diffusion.timestep_sampler': 'loss_aware', 'diffusion.model_var_type': 'learned_range',
    'diffusion.loss_type': 'hybrid', 'model.out_dim': 4,
    'training.batch_size': 32, 'training.log_every_steps': 1,
    'training.keep_checkpoints': 3, 'training.sample_every_steps': 0,
    'data.num_train_examples': 256,
}
LAUNCH_TIMEOUT = 600  # seconds one launch may take before the experiment gives up


def command(workdir: str, steps: int, every: int) -> list[str]:
    overrides = {**OVERRIDES, 'training.num_train_steps': steps,
                 'training.checkpoint_every_steps': every}
    return [sys.executable, '-m', 'diffusion_jax.main',
            f'--config={ROOT / "configs" / "swissroll.py"}', f'--workdir={workdir}',
            *[f'--config.{k}={v}' for k, v in overrides.items()]]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
                XLA_FLAGS='--xla_force_host_platform_device_count=1 '
                          '--xla_cpu_multi_thread_eigen=false')


def _tmp_folders(workdir: str) -> set[str]:
    folder = pathlib.Path(workdir, 'checkpoints')
    return {p.name for p in folder.glob('*.orbax-checkpoint-tmp*')} if folder.exists() else set()


def _launch(cmd, log_path):
    log = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log


def _finish(proc, log, timeout=LAUNCH_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _resumed_step_of(log_text: str) -> int:
    found = re.findall(r'resumed from \S+ at step (\d+)', log_text)
    return int(found[-1]) if found else 0


def _logged_step(log_path, default: int) -> int:
    """The last step this launch logged (training logs every step here), else `default`."""
    found = re.findall(r'\] step (\d+): ', pathlib.Path(log_path).read_text(encoding='utf-8'))
    return int(found[-1]) if found else default


def _kill_one(proc, log_path, workdir: str, rng: random.Random, during_save: bool, every: int,
              start: int):
    """Waits for the moment, SIGKILLs proc; returns (killed, steps done, hit a save)."""
    before = _tmp_folders(workdir)
    target = start + rng.randint(1, every + every // 2)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    # Random kills count steps from when this launch trains (its step is compiled).
    while (proc.poll() is None and time.monotonic() < deadline
           and 'compiled in' not in pathlib.Path(log_path).read_text(encoding='utf-8')):
        time.sleep(0.01)
    while proc.poll() is None and time.monotonic() < deadline:
        if during_save and _tmp_folders(workdir) - before:
            break
        done = _logged_step(log_path, start)
        # A save too quick to catch: kill anyway, past the next save (not counted as in one).
        if done >= (start + every + every // 2 if during_save else target):
            break
        time.sleep(0.002 if during_save else 0.01)
    if proc.poll() is not None:
        return False, _logged_step(log_path, start), False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True, _logged_step(log_path, start), bool(_tmp_folders(workdir) - before)


def _final_state(workdir: str, steps: int):
    """Every item of the checkpoint at `steps` as a list of numpy arrays per item."""
    # pylint: disable=import-outside-toplevel
    import jax
    import numpy as np
    from configs import swissroll
    from diffusion_jax import checkpointing, models, sharding, train
    config = swissroll.get_config()
    for key, value in OVERRIDES.items():
        section, field = key.split('.')
        config[section][field] = value
    model = models.get_model(config.model)
    optimizer, _ = train.create_optimizer(config.optim)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state = train.abstract_train_state(config, model, optimizer, mesh)
    targets = dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                   extra=dict(step=state.step, sampler=state.sampler_state,
                              skipped=state.skipped))
    out, _ = checkpointing.restore_items(workdir, targets, step=steps)
    return {k: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(v))]
            for k, v in out.items()}


def run(workdir: str, kills: int = 20, steps: int = 200, every: int = 10, seed: int = 0,
        reference: str = '') -> dict:
    """The experiment in workdir (reference/ and faulted/ under it); returns the report.
    reference: the workdir of an uninterrupted run of the same command to compare with
    (default: made here first)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = random.Random(seed)
    root = pathlib.Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    faulted, t0 = str(root / 'faulted'), time.monotonic()
    if not reference:
        reference = str(root / 'reference')
        proc, log = _launch(command(reference, steps, every), root / 'reference.log')
        if _finish(proc, log) != 0:
            raise RuntimeError(f'the uninterrupted run failed: see {root / "reference.log"}')
    records, start, launches, final_rc = [], 0, 0, None
    for k in range(kills):
        log_path = root / f'launch_{launches:02d}.log'
        proc, log = _launch(command(faulted, steps, every), log_path)
        launches += 1
        killed, done, in_save = _kill_one(proc, log_path, faulted, rng, k % 3 == 2, every, start)
        log.close()
        if not killed:  # it finished first: no more kills possible
            final_rc = proc.returncode
            break
        records.append({'kill': k + 1, 'steps_done': done, 'during_save': in_save,
                        'next_launch': launches})
        start = _resume_point(faulted)
        print(f'kill {k + 1}: after step {done}{" during a save" if in_save else ""}; '
              f'next launch resumes from step {start}', flush=True)
    if final_rc is None:
        proc, log = _launch(command(faulted, steps, every), root / f'launch_{launches:02d}.log')
        final_rc = _finish(proc, log)
    survived = 0
    for r in records:
        text = (root / f'launch_{r.pop("next_launch"):02d}.log').read_text(encoding='utf-8')
        r['resumed_from'] = _resumed_step_of(text)
        r['steps_lost'] = r['steps_done'] - r['resumed_from']
        survived += int('compiling the train step' in text and final_rc == 0)
    equal = {}
    if final_rc == 0:
        got, want = _final_state(faulted, steps), _final_state(reference, steps)
        equal = {item: all(np.array_equal(a, b) for a, b in zip(got[item], want[item]))
                 for item in want}
    return {
        'kills_delivered': len(records), 'kills_survived': survived,
        'kills_during_save': sum(r['during_save'] for r in records),
        'max_steps_lost': max((r['steps_lost'] for r in records), default=0),
        'checkpoint_every_steps': every, 'num_train_steps': steps,
        'final_exit_status': final_rc, 'bit_equal': equal,
        'damaged_moved_aside': sorted(p.name for p in pathlib.Path(faulted).glob(
            'checkpoints_damaged/*')),
        'wall_seconds': round(time.monotonic() - t0, 1), 'kills': records,
    }


def _resume_point(workdir: str) -> int:
    """Where the next launch will resume: the newest valid checkpoint (0: none)."""
    from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
    return checkpointing.latest_step(workdir) or 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', default='/tmp/fault_injection')
    parser.add_argument('--kills', type=int, default=20)
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--checkpoint_every', type=int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--reference', default='',
                        help='workdir of an uninterrupted run of the same command (else made)')
    parser.add_argument('--out', default='', help='also write the report (JSON) here')
    args = parser.parse_args()
    report = run(args.workdir, args.kills, args.steps, args.checkpoint_every, args.seed,
                 args.reference)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + '\n', encoding='utf-8')
    ok = (report['kills_survived'] == report['kills_delivered'] == args.kills
          and report['max_steps_lost'] <= args.checkpoint_every
          and report['bit_equal'] and all(report['bit_equal'].values()))
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
