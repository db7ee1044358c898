"""Distillation runs (diffusion_jax.distill) end to end on digits with a tiny teacher: the
student starts as the teacher's EMA, trains with the ordinary loop, samples with its method,
resumes bit-exactly, and the teacher's workdir is never written; bad input is one line."""
import hashlib
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, distill, generate, models, train
from diffusion_jax import run as run_lib

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits, digits_distill, model_configs

pytestmark = pytest.mark.usefixtures('fast_compiles')


def tiny(config, steps=4):
    config.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,),
                                           attn_resolutions=())
    config.diffusion.update(num_timesteps=16, beta_start=1e-3, beta_end=0.5)
    # No grid during training (--mode=sample is tested instead): one compile less per run.
    config.training.update(batch_size=16, num_train_steps=steps, log_every_steps=2,
                           checkpoint_every_steps=steps, sample_every_steps=0,
                           num_sample_images=8)
    config.optim.update(learning_rate=2e-3, warmup_steps=0)
    config.sampling.update(num_samples=8, batch_size=8)
    return config


def tree_hash(root) -> dict:
    out = {}
    for path in sorted(pathlib.Path(root).rglob('*')):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A teacher run written by run.create (no training: the compile is the cost here), with
    EMA weights that differ from its raw weights, so the test can tell which the student got."""
    workdir = str(tmp_path_factory.mktemp('teacher') / 'run')
    config = tiny(digits.get_config())
    model = models.get_model(config.model)
    params = models.init_params(model, jax.random.key(1))['params']
    ema = models.init_params(model, jax.random.key(2))['params']
    run_lib.create(workdir, config, params, ema_params=ema)
    return workdir


def student_config(teacher_workdir, method, steps=4, rounds=1):
    config = tiny(digits_distill.get_config(method), steps)
    config.distill.update(teacher_workdir=teacher_workdir, num_scales=6, start_steps=8,
                          rounds=rounds, steps_per_round=steps // rounds if rounds > 1 else 0,
                          ect_stage_steps=2)
    return config


def _params(workdir, step, item='params'):
    return checkpointing.restore_items(workdir, {item: None}, step=step)[0][item]


@pytest.fixture(scope='module')
def students(teacher, tmp_path_factory):
    """{method: (workdir, first step's params, teacher hashes before, teacher EMA)}."""
    before = tree_hash(teacher)
    teacher_ema = jax.device_get(run_lib.load(teacher).variables['params'])
    teacher_raw = jax.device_get(run_lib.load(teacher, use_ema=False).variables['params'])
    out = {}
    for method in distill.METHODS:
        seen = {}

        def on_step(step, state, seen=seen):
            seen.setdefault('first', (step, jax.device_get(state.params)))

        workdir = str(tmp_path_factory.mktemp(method) / 'run')
        state = train.train_and_evaluate(student_config(teacher, method), workdir,
                                         on_step=on_step)
        assert int(state.step) == 4
        out[method] = (workdir, seen['first'], before, teacher_ema, teacher_raw)
    return out


@pytest.mark.parametrize('method', ['progressive', 'consistency', 'ect'])
def test_distillation_run_starts_from_the_teacher_and_never_writes_it(teacher, students, method):
    workdir, (step, first), before, teacher_ema, teacher_raw = students[method]
    assert tree_hash(teacher) == before
    # After one Adam step of lr 2e-3 every weight is within ~lr of the teacher's EMA weight
    # it started from; the teacher's raw weights (another init) are O(0.1) away.
    assert step == 1
    gap = lambda ref: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
        lambda a, b: np.max(np.abs(a - b)), first, ref)))
    assert gap(teacher_ema) < 3e-3 < 0.05 < gap(teacher_raw)
    stored = run_lib.Run(workdir).config
    assert stored.distill.method == method and stored.distill.teacher_workdir == teacher
    # --mode=sample with no flags: the stored config names the student's sampler and steps.
    folder = generate.run_sampling(None, workdir)
    written = json.loads(pathlib.Path(folder, 'sampling_config.json').read_text())
    assert written['method'] == ('ddim' if method == 'progressive' else 'consistency')
    assert written['num_steps'] == ('trailing4' if method == 'progressive' else 'trailing2')
    assert np.load(os.path.join(folder, 'samples.npz'))['images'].shape == (8, 8, 8, 1)
    assert tree_hash(teacher) == before


def test_distillation_resumes_bit_exactly(teacher, students, tmp_path):
    straight = students['consistency'][0]
    split = str(tmp_path / 'split')
    train.train_and_evaluate(student_config(teacher, 'consistency', 2), split)
    train.train_and_evaluate(student_config(teacher, 'consistency', 4), split)
    for item in ('params', 'ema_params'):
        a, b = _params(straight, 4, item), _params(split, 4, item)
        jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('edit,match', [
    (lambda c, t: c.distill.update(teacher_workdir=t + '_missing'),
     r"distill.teacher_workdir='.*_missing' is not a run"),
    (lambda c, t: c.distill.update(start_steps=1),
     r'distill.start_steps=1: a progressive round halves .* below one step'),
    (lambda c, t: c.distill.update(start_steps=32),
     r'distill.start_steps=32 exceeds diffusion.num_timesteps=16'),
    (lambda c, t: c.distill.update(method='lcm'), r"distill.method='lcm' is not available"),
    (lambda c, t: c.distill.update(rounds=4),
     r'distill.rounds=4 from distill.start_steps=8: round 4 would halve 1 steps .*at most 3 '),
    (lambda c, t: c.distill.update(rounds=2, steps_per_round=3),
     r'distill.steps_per_round=3 with distill.rounds=2: training.num_train_steps=4 must be '),
    (lambda c, t: c.distill.update(method='consistency', teacher_solver='rk4'),
     r"distill.teacher_solver='rk4' is not available"),
    (lambda c, t: c.distill.update(method='ect', ect_stage_steps=0),
     r'distill.ect_stage_steps=0 must be >= 1'),
    (lambda c, t: c.model.update(ch=64), r'the student must have the teacher\'s network'),
])
def test_bad_distill_input_is_one_line_and_writes_nothing(teacher, tmp_path, edit, match):
    config = student_config(teacher, 'progressive')
    edit(config, teacher)
    workdir = tmp_path / 'bad'
    with pytest.raises(ValueError, match=match) as err:
        train.train_and_evaluate(config, str(workdir))
    assert '\n' not in str(err.value)
    assert not workdir.exists() or not any(workdir.iterdir())


def _adam_count(opt_state) -> int:
    counts = [int(x) for x in jax.tree.leaves(opt_state) if np.asarray(x).dtype.kind == 'i']
    assert len(set(counts)) == 1, counts
    return counts[0]


@pytest.fixture(scope='module')
def rounds_run(teacher, tmp_path_factory):
    """One progressive run of 3 rounds (8 -> 4 -> 2 -> 1 steps) of 3 steps, keeping 1
    checkpoint: (workdir, {step: host state after it})."""
    config = student_config(teacher, 'progressive', steps=9, rounds=3)
    config.training.update(keep_checkpoints=1, checkpoint_every_steps=9)
    seen = {}
    workdir = str(tmp_path_factory.mktemp('rounds') / 'run')
    train.train_and_evaluate(config, workdir,
                             on_step=lambda step, state: seen.update({step: jax.device_get(state)}))
    return workdir, seen


def test_progressive_rounds_in_one_run(teacher, rounds_run):
    """Each round ends in a kept checkpoint listed with its step count; a new round restarts
    the student from the EMA with a fresh optimiser; --mode=sample takes the last round's."""
    workdir, seen = rounds_run
    assert checkpointing.valid_steps(workdir) == [3, 6, 9]  # keep_checkpoints=1, rounds kept
    rounds = json.loads(pathlib.Path(workdir, distill.ROUNDS_FILE).read_text())['rounds']
    assert [(r['checkpoint_step'], r['teacher_steps'], r['sampling_steps'], r['num_steps'])
            for r in rounds] == [(3, 8, 4, 'trailing4'), (6, 4, 2, 'trailing2'),
                                 (9, 2, 1, 'trailing1')]
    lr = 2e-3
    for first in (3, 6):  # the first step of rounds 2 and 3
        assert _adam_count(seen[first].opt_state) == 3  # the round so far: no reset inside it
        assert _adam_count(seen[first + 1].opt_state) == 1  # a fresh optimiser
        gap = lambda a, b: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
            lambda x, y: np.max(np.abs(x - y)), a, b)))
        # One Adam step from the EMA moves each weight by at most lr (bias-corrected first
        # step); the student itself was farther from the EMA than that before the reset.
        assert gap(seen[first + 1].params, seen[first].ema_params) <= lr * 1.001
        assert gap(seen[first].params, seen[first].ema_params) > 1.5 * lr
    stored = run_lib.Run(workdir).config
    assert (stored.sampling.method, stored.sampling.num_steps) == ('ddim', 'trailing1')
    folder = generate.run_sampling(None, workdir)
    written = json.loads(pathlib.Path(folder, 'sampling_config.json').read_text())
    assert (written['method'], written['num_steps']) == ('ddim', 'trailing1')


def test_progressive_rounds_resume_bit_exactly_inside_a_round(teacher, rounds_run, tmp_path):
    """Killed after step 4 (inside round 2, whose teacher is the EMA at step 3), the resumed run
    reads that teacher back from its checkpoint and ends bit-equal to the uninterrupted run."""
    straight, seen = rounds_run
    split = str(tmp_path / 'split')
    config = student_config(teacher, 'progressive', steps=9, rounds=3)
    config.training.update(checkpoint_every_steps=1, keep_checkpoints=2)

    class Killed(Exception):
        pass

    def kill(step, state):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train.train_and_evaluate(config, split, on_step=kill)
    assert checkpointing.latest_step(split) == 4
    train.train_and_evaluate(config, split)
    for item in ('params', 'ema_params'):
        a, b = _params(straight, 9, item), _params(split, 9, item)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert (pathlib.Path(split, distill.ROUNDS_FILE).read_text()
            == pathlib.Path(straight, distill.ROUNDS_FILE).read_text())


@pytest.mark.parametrize('edit,match', [
    (lambda c, t: c.distill.update(teacher_workdir=t + '_other'),
     r"trained with other model/diffusion/data/optim/distill settings: "
     r"distill.teacher_workdir: '.*' -> '.*_other'"),
    (lambda c, t: c.distill.update(method='consistency'),
     r"distill.method: 'progressive' -> 'consistency'"),
])
def test_resume_with_another_teacher_or_method_is_refused(teacher, students, edit, match):
    workdir = students['progressive'][0]
    before = tree_hash(workdir)
    config = student_config(teacher, 'progressive', steps=6)
    edit(config, teacher)
    with pytest.raises(ValueError, match=match) as err:
        train.train_and_evaluate(config, workdir)
    assert '\n' not in str(err.value)
    assert tree_hash(workdir) == before


@pytest.mark.parametrize('method', ['progressive', 'consistency', 'ect'])
def test_cifar10_distill_config_fits_the_converted_teacher(method):
    """configs/cifar10_distill.py shares the model/diffusion sections of the converted
    ddpm_cifar10_32 run (so distill.load_teacher accepts it) and carries the cited numbers."""
    from configs import cifar10_distill, pretrained  # pylint: disable=import-outside-toplevel
    config = cifar10_distill.get_config(method)
    teacher = pretrained.preset_config('ddpm_cifar10_32')
    assert run_lib.section_differences(teacher, config, distill.SHARED_SECTIONS) == []
    d, t = config.distill, config.training
    if method == 'progressive':
        assert (d.start_steps, d.rounds, d.steps_per_round, t.batch_size, t.ema_decay,
                config.optim.learning_rate) == (512, 9, 50_000, 128, 0.0, 5e-5)
        assert distill.round_steps(config)[-1] == 1
    elif method == 'consistency':
        assert (d.num_scales, d.teacher_solver, t.batch_size, t.ema_decay,
                config.optim.learning_rate) == (18, 'heun', 512, 0.95, 4e-4)
    else:
        assert (d.ect_q, d.ect_k, d.ect_b, d.ect_p_mean, d.ect_p_std, d.ect_stage_steps,
                t.num_train_steps) == (2.0, 8.0, 1.0, -1.1, 2.0, 25_000, 200_000)
