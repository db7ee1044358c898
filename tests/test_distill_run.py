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

from diffusion_jax import checkpointing, generate, models, train
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


def student_config(teacher_workdir, method, steps=4):
    config = tiny(digits_distill.get_config(method), steps)
    config.distill.teacher_workdir = teacher_workdir
    config.distill.num_scales = 6
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
    for method in ('progressive', 'consistency'):
        seen = {}

        def on_step(step, state, seen=seen):
            seen.setdefault('first', (step, jax.device_get(state.params)))

        workdir = str(tmp_path_factory.mktemp(method) / 'run')
        state = train.train_and_evaluate(student_config(teacher, method), workdir,
                                         on_step=on_step)
        assert int(state.step) == 4
        out[method] = (workdir, seen['first'], before, teacher_ema, teacher_raw)
    return out


@pytest.mark.parametrize('method', ['progressive', 'consistency'])
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
    assert written['method'] == ('consistency' if method == 'consistency' else 'ddim')
    assert written['num_steps'] == ('trailing2' if method == 'consistency' else 'trailing4')
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
    (lambda c, t: c.distill.update(start_steps=6),
     r'distill.start_steps=6 must divide diffusion.num_timesteps=16'),
    (lambda c, t: c.distill.update(method='ect'), r"distill.method='ect' is not available"),
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
