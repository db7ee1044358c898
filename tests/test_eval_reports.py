"""Every FID/IS/precision-recall and bits/dim report states what it was computed from (issue 24,
item 12): the JSON written by a tiny --mode=eval is read back and each field is compared with the
config that was used (and the reference size with the data split itself); fewer than 50,000
samples scored against Inception give a log warning and a 'warnings' entry in the JSON.

The Inception case runs the real eval path with the Inception network replaced by a fixed random
projection (the network itself, 299×299 on a CPU, is tested in test_inception.py): what is
checked is the report, which must not depend on which weights the features come from.
"""
import json
import logging as std_logging
import os

import numpy as np
import pytest

from diffusion_jax import input_pipeline
from diffusion_jax.evaluation import evaluate, inception, sample_quality
from test_evaluate import random_feature_net, trained_run  # noqa: F401  (fixtures)


def _read(workdir, name):
    with open(os.path.join(workdir, 'eval', name)) as f:
        return json.load(f)


def _quality_config(c, **eval_fields):
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.eval.update(nll=False, sample_quality=True, num_samples=24, use_ema=False,
                       **eval_fields)
        c2.sampling.update(method='ddim', num_steps='ddim5', eta=0.3)
    return c2


def test_sample_quality_json_states_what_it_was_computed_from(  # noqa: F811
        trained_run, random_feature_net, tmp_path, caplog):  # noqa: F811
    c, workdir = trained_run
    c2 = _quality_config(c, feature_space='feature_net', feature_net_dir=random_feature_net,
                         reference_dir=str(tmp_path / 'ref'))
    with caplog.at_level(std_logging.INFO):
        evaluate.run_eval(c2, workdir)
    got = _read(workdir, 'samples_3.json')
    train_images = len(input_pipeline.get_dataset(c2.data, 'train'))
    want = dict(num_samples=24, reference_dataset='digits', reference_split='train',
                reference_size=train_images, feature_space='feature_net', sampler='ddim',
                num_steps='ddim5', sampler_steps=5, eta=0.3, clip_denoised=True,
                guidance_scale=0.0, guidance_rescale=0.0, guidance_interval='',
                classifier_scale=0.0, guidance_model_workdir='', use_ema=False, step=3,
                warnings=[])
    assert {k: got[k] for k in want} == want
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
        'sample quality at step 3: FID')]
    assert len(line) == 1
    assert (f'of 24 samples against digits/train ({train_images:,} images) in feature_net space; '
            "sampler ddim num_steps='ddim5' (5 steps), eta=0.3, guidance: none, raw parameters"
            ) in line[0]
    assert not [r for r in caplog.records if r.levelno >= std_logging.WARNING
                and 'Inception' in r.getMessage()]


@pytest.fixture
def projected_inception(monkeypatch):
    """Inception replaced by a fixed random projection of the pixels (64 -> 16 features, 10
    logits)."""
    rng = np.random.default_rng(0)
    w_pool, w_logits = rng.standard_normal((64, 16)), rng.standard_normal((16, 10))

    def features(variables, images, batch_size=50):  # pylint: disable=unused-argument
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
        pool = x @ w_pool
        return dict(pool=pool.astype(np.float32), logits=(pool @ w_logits).astype(np.float32))
    monkeypatch.setattr(inception, 'load_pytorch_fid_weights', lambda path: {})
    monkeypatch.setattr(inception, 'inception_features', features)


def test_fewer_than_50k_inception_samples_warn_in_the_log_and_the_json(
        trained_run, projected_inception, tmp_path, caplog):  # noqa: F811
    c, workdir = trained_run
    c2 = _quality_config(c, feature_space='inception', reference_dir=str(tmp_path / 'ref'))
    with caplog.at_level(std_logging.INFO):
        evaluate.run_eval(c2, workdir)
    got = _read(workdir, 'samples_3.json')
    assert got['feature_space'] == 'inception' and got['num_samples'] == 24
    assert got['warnings'] == [
        'FID/IS/precision-recall of 24 samples against Inception: the published protocol scores '
        '50,000, and FID is biased upward at fewer samples, so these numbers are not comparable '
        'with published ones']
    warned = [r.getMessage() for r in caplog.records if r.levelno == std_logging.WARNING]
    assert warned.count(f'sample quality at step 3: {got["warnings"][0]}') == 1
    # At the protocol's count there is nothing to warn about; in a feature net's space never.
    assert sample_quality.protocol_warnings('inception', 50_000) == []
    assert sample_quality.protocol_warnings('feature_net', 24) == []


def test_a_samples_file_report_names_the_file_instead_of_a_sampler(random_feature_net,  # noqa: F811
                                                                    tmp_path):
    from test_evaluate import _file_config  # pylint: disable=import-outside-toplevel
    path = tmp_path / 'fake.npz'
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), np.uint8))
    c = _file_config(random_feature_net, path, tmp_path / 'ref')
    out = sample_quality.evaluate_samples_file(c, str(tmp_path / 'work'))
    got = _read(str(tmp_path / 'work'), 'samples_file_fake.json')
    assert got == json.loads(json.dumps(out))
    assert got['sampler'] is None and got['samples_path'] == str(path)
    assert got['num_samples'] == 20 and got['reference_split'] == 'train'
    assert got['reference_size'] == len(input_pipeline.get_dataset(c.data, 'train'))
    assert got['feature_space'] == 'feature_net' and got['warnings'] == []


@pytest.mark.parametrize('estimator, dequantization', [('full', 'discretized_decoder'),
                                                       ('sampled', 'discretized_decoder'),
                                                       ('ode', 'none')])
def test_bits_per_dim_json_states_the_estimator_and_the_dequantisation(
        trained_run, caplog, estimator, dequantization):  # noqa: F811
    c, workdir = trained_run
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
        c2.eval.update(nll=True, nll_estimator=estimator, nll_timesteps_per_image=4,
                       num_batches=1, use_ema=False, ode_solver='euler', ode_num_steps=2,
                       ode_dequantization='none' if estimator == 'ode' else 'uniform')
    with caplog.at_level(std_logging.INFO):
        evaluate.run_eval(c2, workdir)
    got = _read(workdir, 'nll_3.json')
    assert got['estimator'] == estimator and got['dequantization'] == dequantization
    assert got['estimator_description'] == evaluate.ESTIMATOR_DESCRIPTIONS[estimator]
    assert got['use_ema'] is False and got['split'] == 'test' and got['dataset'] == 'digits'
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith('eval nll at')]
    assert len(line) == 1 and f'estimator {estimator} (' in line[0]
    assert f'dequantization {dequantization}, raw parameters' in line[0]
