"""--mode=eval end to end on a tiny trained run: the NLL over the whole test split (padding not
counted, parts adding up, the sampled estimate agreeing) and sample quality in a feature space."""
import json
import os

import jax
import numpy as np
import pytest

from configs import digits, model_configs
from diffusion_jax import train
from diffusion_jax.evaluation import evaluate, feature_net, fid, sample_quality


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    previous = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    c = digits.get_config()
    c.model = model_configs.tiny_unet(image_size=8, in_channels=1, ch_mult=(1,), attn_resolutions=())
    c.diffusion.update(num_timesteps=20, beta_start=5e-3, beta_end=0.3)
    c.training.update(batch_size=16, num_train_steps=3, log_every_steps=3, checkpoint_every_steps=3,
                      sample_every_steps=0)
    c.eval.update(batch_size=64, num_batches=0)
    c.sampling.update(batch_size=16, method='ddim', num_steps='ddim5')
    workdir = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(c, workdir)
    yield c, workdir
    jax.config.update('jax_disable_most_optimizations', previous)


def test_nll_covers_the_whole_split_and_its_parts_add_up(trained_run):
    c, workdir = trained_run
    full = evaluate.run_eval(c, workdir)['nll']
    assert full['num_images'] == 359  # the held-out digits; the padded last batch is not counted
    parts = full['prior_bpd'] + full['decoder_bpd'] + full['kl_sum_bpd']
    assert full['total_bpd'] == pytest.approx(parts, rel=1e-6)
    assert 0 < full['total_bpd'] < 16
    with open(os.path.join(workdir, 'eval', 'nll_3.json')) as f:
        assert json.load(f)['total_bpd'] == full['total_bpd']
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.eval.nll_estimator = 'sampled'
        c2.eval.nll_timesteps_per_image = 10
    sampled = evaluate.run_eval(c2, workdir)['nll']
    # Unbiased: the two agree within the estimate's standard error (5 SE; the bound's spread
    # over images enters both, so this is conservative).
    assert abs(sampled['total_bpd'] - full['total_bpd']) < 5 * sampled['total_bpd_stderr']
    with c2.unlocked():
        c2.eval.nll_estimator = 'importance'
    importance = evaluate.run_eval(c2, workdir)['nll']
    assert importance['num_images'] == 359
    assert abs(importance['total_bpd'] - full['total_bpd']) < 5 * importance['total_bpd_stderr']


def test_sample_quality_in_feature_net_space(trained_run, tmp_path):
    c, workdir = trained_run
    (train_x, train_y), (test_x, test_y) = feature_net.digits_split()
    params, acc = feature_net.train_feature_net(train_x, train_y, 10, steps=30, seed=0,
                                                test_images=test_x, test_labels=test_y)
    feature_net.save_feature_net(str(tmp_path / 'fn'), params,
                                 dict(num_classes=10, feature_dim=128, dataset='digits',
                                      test_accuracy=acc))
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.eval.nll = False
        c2.eval.sample_quality = True
        c2.eval.feature_space = 'feature_net'
        c2.eval.feature_net_dir = str(tmp_path / 'fn')
        c2.eval.num_samples = 32
    out = evaluate.run_eval(c2, workdir)['sample_quality']
    assert out['num_samples'] == 32 and out['fid'] > 0
    assert 0 <= out['precision'] <= 1 and 0 <= out['recall'] <= 1
    assert os.path.exists(os.path.join(workdir, 'eval', 'samples_3.png'))
    cached = [f for f in os.listdir(os.path.join(workdir, 'eval')) if f.startswith('ref_')]
    assert cached == ['ref_digits_train_feature_net_32.npz']


def test_sample_metrics_of_the_reference_against_itself():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 16))
    logits = rng.standard_normal((400, 10))
    ref = fid.stats_to_arrays(fid.RunningStats.zeros(16).update(feats))
    ref['features'] = feats.astype(np.float32)
    out = sample_quality.sample_metrics(dict(features=feats, logits=logits), ref)
    assert out['fid'] == pytest.approx(0.0, abs=1e-6)
    assert out['precision'] == 1.0 and out['recall'] == 1.0
    far = sample_quality.sample_metrics(dict(features=feats + 100.0, logits=logits), ref)
    assert far['fid'] == pytest.approx(16 * 100.0**2, rel=1e-3)
    assert far['precision'] == 0.0 and far['recall'] == 0.0


def test_missing_feature_net_is_a_clear_error(tmp_path):
    c = digits.get_config()
    with c.unlocked():
        c.eval.feature_space = 'feature_net'
        c.eval.feature_net_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match='python -m diffusion_jax.evaluation.feature_net'):
        sample_quality.FeatureSpace(c.eval)
    with c.unlocked():
        c.eval.feature_space = 'lenet'
    with pytest.raises(ValueError, match='eval.feature_space'):
        sample_quality.FeatureSpace(c.eval)
