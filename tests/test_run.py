"""A run on disk is one object (diffusion_jax.run): sample and eval take the stored config, resume
refuses a changed run, metrics stay unique, converted parameters become a run (create)."""
import json
import logging as py_logging
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from diffusion_jax import generate, guidance, main, models, run, samplers, train
from diffusion_jax.diffusion import create_diffusion

try:
    import configs  # noqa: F401
except ImportError:  # configs/ is not on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits, swissroll

pytestmark = pytest.mark.usefixtures('fast_compiles')

T = 30  # not the config file's T = 100: a plain-config sampler would run the wrong chain
SAMPLING = {'sampling.num_samples': 16, 'sampling.batch_size': 16}


def trained_config(steps=4):
    """Swiss roll, a tiny v-predicting MLP with T = 30: none of it is the file's default."""
    c = swissroll.get_config()
    c.model.update(hidden_dim=16, num_layers=2)
    c.diffusion.update(num_timesteps=T, model_mean_type='v')
    c.data.num_train_examples = 256
    c.training.update(batch_size=64, num_train_steps=steps, log_every_steps=1,
                      checkpoint_every_steps=2, sample_every_steps=0, keep_checkpoints=5)
    return c


def snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[path] = (os.path.getsize(path), os.path.getmtime(path))
    return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('run'))
    state = train.train_and_evaluate(trained_config(), workdir)
    return workdir, state


def test_sample_with_the_plain_config_runs_the_stored_run(trained, caplog):
    workdir, state = trained
    plain = swissroll.get_config()  # T = 100, eps, 4 x 256: none of it was trained
    config, _ = main.resolve_command(plain, workdir, 'sample', SAMPLING)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with caplog.at_level(py_logging.INFO):
            folder = main.run(config, workdir, 'sample')
    finally:
        absl_logging.set_verbosity(verbosity)
    assert 'batch 1/1: compile' in caplog.text and 'ETA' in caplog.text  # the ETA after batch 1
    assert folder == os.path.join(workdir, 'samples', '4')
    with open(os.path.join(folder, 'sampling_config.json'), encoding='utf-8') as f:
        written = json.load(f)
    assert written['sampling_timesteps'] == T and written['step'] == 4
    assert written['diffusion']['num_timesteps'] == T
    assert written['diffusion']['model_mean_type'] == 'v'
    assert written['num_samples'] == 16
    # The same draw made directly from the library with the stored config and trained EMA.
    stored = run.Run(workdir).config
    model = models.get_model(stored.model)
    diffusion = create_diffusion(stored.diffusion)
    key = jax.random.fold_in(jax.random.split(jax.random.key(0), 3)[0], 0)
    want = samplers.sample(diffusion, guidance.bind_model(model.apply,
                                                          {'params': state.ema_params}),
                           key, (16, 2), method='ancestral', clip_denoised=True)['samples']
    with np.load(os.path.join(folder, 'samples.npz')) as f:
        np.testing.assert_allclose(f['points'], np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_differing_trained_override_is_refused_and_an_equal_one_accepted(trained):
    workdir, _ = trained
    plain = swissroll.get_config()
    with pytest.raises(ValueError) as err:
        main.resolve_command(plain, workdir, 'sample', {'diffusion.num_timesteps': 100})
    assert str(err.value).startswith(
        "diffusion.num_timesteps=100 differs from the trained run's diffusion.num_timesteps=30")
    config, _ = main.resolve_command(plain, workdir, 'eval', {'diffusion.num_timesteps': T})
    assert config.diffusion.num_timesteps == T and config.model.hidden_dim == 16
    with pytest.raises(ValueError, match=r"model.hidden_dim=256 differs .* model.hidden_dim=16"):
        run.load(workdir, {'model.hidden_dim': 256})


def test_eval_with_the_plain_config_uses_the_stored_diffusion(trained):
    workdir, _ = trained
    config, _ = main.resolve_command(swissroll.get_config(), workdir, 'eval',
                                     {'eval.num_batches': 1, 'eval.batch_size': 256,
                                      'eval.checkpoint_step': 2})
    result = main.run(config, workdir, 'eval')['nll']
    assert result['num_timesteps'] == T and result['step'] == 2 and result['num_images'] == 256
    assert os.path.exists(os.path.join(workdir, 'eval', 'nll_2.json'))


def test_load_returns_the_trained_parameters_at_a_chosen_step(trained):
    workdir, state = trained
    assert run.Run(workdir).steps() == [2, 4] and run.Run(workdir).latest_step() == 4
    ema, raw = run.load(workdir), run.load(workdir, use_ema=False)
    assert ema.step == 4 and ema.config.diffusion.num_timesteps == T
    assert ema.diffusion.num_timesteps == T and ema.model.hidden_dim == 16
    for got, want in zip(jax.tree.leaves(ema.variables['params']),
                         jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(raw.variables['params']), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    early = run.load(workdir, step=2)
    assert early.step == 2
    assert not np.array_equal(np.asarray(jax.tree.leaves(early.variables)[0]),
                              np.asarray(jax.tree.leaves(ema.variables)[0]))
    with pytest.raises(ValueError, match=r'checkpoint_step=3: .* steps \[2, 4\]'):
        run.load(workdir, step=3)


def test_resume_refuses_changed_sections_and_extends_with_unique_metrics(trained, tmp_path):
    source, _ = trained
    workdir = str(tmp_path / 'run')
    shutil.copytree(source, workdir)
    # A crash after step 4 was logged but before its checkpoint: steps 3-4 get replayed.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
    before = snapshot(workdir)
    for section, field, value in (('optim', 'learning_rate', 1e-2), ('model', 'hidden_dim', 32),
                                  ('diffusion', 'model_mean_type', 'eps')):
        changed = trained_config(steps=6)
        changed[section][field] = value
        with pytest.raises(ValueError, match=rf'{section}.{field}: .* Resuming would mix'):
            train.train_and_evaluate(changed, workdir)
        assert snapshot(workdir) == before  # nothing written
    train.train_and_evaluate(trained_config(steps=6), workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        steps = [json.loads(line)['step'] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert run.Run(workdir).config.training.num_train_steps == 6
    with open(os.path.join(workdir, 'config_2.json'), encoding='utf-8') as f:
        assert json.load(f)['training']['num_train_steps'] == 4  # the old config, kept


def test_create_makes_a_run_that_loads_and_fine_tunes(tmp_path):
    config = trained_config(steps=2)
    model = models.get_model(config.model)
    params = models.init_params(model, jax.random.key(3))
    workdir = str(tmp_path / 'made')
    made = run.create(workdir, config, params)
    assert made.latest_step() == 0 and made.config.model.hidden_dim == 16
    loaded = run.load(workdir)
    for got, want in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match='already holds a run'):
        run.create(workdir, config, params)
    with pytest.raises(ValueError, match='do not fit config.model'):
        run.create(str(tmp_path / 'other'), trained_config(), models.init_params(
            models.get_model(swissroll.get_config().model), jax.random.key(0)))
    assert not os.path.exists(tmp_path / 'other')
    state = train.train_and_evaluate(config, workdir)  # resumes the step-0 state
    assert int(state.step) == 2 and run.Run(workdir).steps() == [0, 2]


def test_guidance_is_checked_against_the_trained_run(trained):
    workdir, _ = trained
    with pytest.raises(ValueError, match=r'sampling.guidance_scale=2.0 needs a class-conditional'):
        main.resolve_command(swissroll.get_config(), workdir, 'sample',
                             {'sampling.guidance_scale': 2.0})
    # Label dropout is part of what was trained: it cannot be typed into a sampling run.
    with pytest.raises(ValueError, match=r"training.label_dropout=0.1 differs from the trained "
                                         r"run's training.label_dropout=0.0"):
        main.resolve_command(swissroll.get_config(), workdir, 'sample',
                             {'sampling.guidance_scale': 2.0, 'training.label_dropout': 0.1})


def test_a_classifier_trained_with_another_diffusion_is_refused(trained, tmp_path):
    workdir, _ = trained
    c = digits.get_config()
    c.diffusion.num_timesteps = 40
    with c.unlocked():
        c.sampling.classifier_workdir = workdir  # its diffusion has T = 30
        c.sampling.classifier_scale = 1.0
    with pytest.raises(ValueError, match=r'trained with diffusion.num_timesteps=30, but this run '
                                         r'has diffusion.num_timesteps=40'):
        generate._load_classifier(c)  # pylint: disable=protected-access


def test_eval_samples_path_scores_a_file_without_a_model(tmp_path):
    """FID of a samples.npz equals the Fréchet distance computed here from the same arrays."""
    from diffusion_jax.evaluation import feature_net  # pylint: disable=import-outside-toplevel
    (train_x, train_y), (test_x, test_y) = feature_net.digits_split()
    params, acc = feature_net.train_feature_net(train_x, train_y, 10, steps=5, seed=0,
                                                test_images=test_x, test_labels=test_y)
    feature_net.save_feature_net(str(tmp_path / 'fn'), params, dict(
        num_classes=10, feature_dim=128, dataset='digits', test_accuracy=acc))
    samples = test_x[:200]  # "someone else's samples": uint8 NHWC
    np.savez(tmp_path / 'samples.npz', images=samples)
    config = digits.get_config()
    config.eval.update(samples_path=str(tmp_path / 'samples.npz'), feature_space='feature_net',
                       feature_net_dir=str(tmp_path / 'fn'), reference_split='train',
                       batch_size=64)
    workdir = tmp_path / 'scores'  # no run here: nothing is loaded
    config, _ = main.resolve_command(config, str(workdir), 'eval', {})
    got = main.run(config, str(workdir), 'eval')['sample_quality']

    model, loaded_params, _ = feature_net.load_feature_net(str(tmp_path / 'fn'))

    def mean_cov(images):
        f = np.asarray(feature_net.feature_net_features(model, loaded_params, images)['features'],
                       np.float64)
        return f.mean(0), np.cov(f, rowvar=False)
    (m1, s1), (m2, s2) = mean_cov(train_x), mean_cov(samples)
    w1, v1 = np.linalg.eigh(s1)
    root = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    want = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    assert got['fid'] == pytest.approx(want, rel=1e-3)
    assert got['num_samples'] == 200
