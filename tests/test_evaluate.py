"""--mode=eval end to end on a tiny trained run: the NLL over the whole test split (padding not
counted, parts adding up, the sampled estimate agreeing) and sample quality in a feature space."""
import hashlib
import json
import os
import re

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
    # The cache is keyed on what changes the statistics, the feature net's weights included.
    assert len(cached) == 1 and re.fullmatch(r'ref_digits_train_feature_net_32_[0-9a-f]{12}\.npz',
                                             cached[0])
    with np.load(os.path.join(workdir, 'eval', cached[0])) as f:
        key = json.loads(str(f['cache_key']))
    with open(tmp_path / 'fn' / feature_net.PARAMS_FILE, 'rb') as f:
        assert key['weights'] == hashlib.sha256(f.read()).hexdigest()
    assert key['dataset'] == 'digits' and key['image_size'] == '8'


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


# ----------------------------------------------------------------------------------------------
# Streaming and eval.samples_path
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def random_feature_net(tmp_path_factory):
    """A feature net with random weights (the metrics' identities hold in any feature space)."""
    folder = str(tmp_path_factory.mktemp('fn'))
    model = feature_net.FeatureNet(10, 32)
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))['params']
    feature_net.save_feature_net(folder, params, dict(num_classes=10, feature_dim=32,
                                                      dataset='digits', test_accuracy=0.0))
    return folder


def _file_config(fn_dir, samples_path, reference_dir):
    c = digits.get_config()
    with c.unlocked():
        c.eval.update(feature_space='feature_net', feature_net_dir=fn_dir, batch_size=64,
                      samples_path=str(samples_path), reference_dir=str(reference_dir))
    return c


def test_streamed_statistics_equal_all_at_once(random_feature_net):
    c = _file_config(random_feature_net, '', '')
    space = sample_quality.FeatureSpace(c.eval)
    images = np.random.default_rng(0).integers(0, 256, (150, 8, 8, 1), dtype=np.uint8)
    sizes = [7, 64, 1, 50, 28]  # uneven batches
    batches = np.split(images, np.cumsum(sizes)[:-1])
    stream = sample_quality.stream_features(space, batches, max_keep=100)
    whole = space(images)
    mu, cov = fid.RunningStats.from_features([whole['features']]).mean_cov()
    s_mu, s_cov = stream.stats.mean_cov()
    # float32 features of a batch of 7 and of 150 differ in the last bits (XLA picks other
    # kernels per shape): 1e-5 relative; a lost or doubled batch moves them by ~1e-1.
    np.testing.assert_allclose(s_mu, mu, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(s_cov, cov, rtol=1e-5, atol=1e-8)
    got = stream.features()
    np.testing.assert_allclose(got['features'], whole['features'][:100], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got['logits'], whole['logits'], rtol=1e-5, atol=1e-7)
    assert stream.num_samples == 150 and len(stream.images()) == 64


def test_samples_file_equals_fid_computed_directly(random_feature_net, tmp_path):
    """An OpenAI-style npz (arr_0 images, arr_1 labels, compressed) scored from the file equals
    FID / IS / precision-recall computed from the same arrays at once."""
    rng = np.random.default_rng(1)
    fake = rng.integers(0, 256, (130, 8, 8, 1), dtype=np.uint8)
    path = tmp_path / 'openai_samples.npz'
    np.savez_compressed(path, fake, rng.integers(0, 10, 130))
    c = _file_config(random_feature_net, path, tmp_path / 'ref')
    out = sample_quality.evaluate_samples_file(c, str(tmp_path / 'work'))
    space = sample_quality.FeatureSpace(c.eval)
    from diffusion_jax import image_utils, input_pipeline  # pylint: disable=import-outside-toplevel
    real_ds = input_pipeline.get_dataset(c.data, 'train')
    real = space(image_utils.to_uint8(real_ds.get(np.arange(len(real_ds)))['image']))['features']
    fake_out = space(fake)
    assert out['fid'] == pytest.approx(fid.fid_from_features(real, fake_out['features']),
                                       rel=1e-7)
    is_mean, _ = fid.inception_score(fake_out['logits'])
    assert out['inception_score'] == pytest.approx(is_mean, rel=1e-6)
    precision, recall = fid.precision_recall(real[:130], fake_out['features'])
    assert (out['precision'], out['recall']) == (precision, recall)
    assert out['num_samples'] == 130 and out['array'] == 'arr_0'
    with open(tmp_path / 'work' / 'eval' / 'samples_file_openai_samples.json') as f:
        assert json.load(f)['fid'] == out['fid']
    # Our own layout ('images' next to 'labels', uncompressed) reads the same pixels.
    ours = tmp_path / 'samples.npz'
    np.savez(ours, images=fake, labels=np.zeros(130, np.int32))
    batches = list(sample_quality.SamplesFile(str(ours), 8, 1).batches(64))
    assert [len(b) for b in batches] == [64, 64, 2]
    np.testing.assert_array_equal(np.concatenate(batches), fake)


@pytest.mark.parametrize('arrays,match', [
    (None, 'does not exist'),
    (dict(images=np.zeros((20, 8, 8, 1), np.float32)), 'is float32, not uint8'),
    (dict(images=np.zeros((20, 8, 8, 3), np.uint8)), r'must be NHWC \[N, 8, 8, 1\]'),
    (dict(images=np.zeros((20, 8, 8), np.uint8)), 'must be NHWC'),
    (dict(a=np.zeros((20, 8, 8, 1), np.uint8), b=np.zeros(3)), "none is named 'images'"),
    (dict(images=np.zeros((5, 8, 8, 1), np.uint8)), 'at least 10'),
])
def test_samples_file_errors_name_the_field(random_feature_net, tmp_path, arrays, match):
    path = tmp_path / 'bad.npz'
    if arrays is not None:
        np.savez(path, **arrays)
    c = _file_config(random_feature_net, path, tmp_path / 'ref')
    with pytest.raises((ValueError, FileNotFoundError), match='eval.samples_path=') as err:
        sample_quality.evaluate_samples_file(c, str(tmp_path / 'work'))
    assert err.match(match)
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'ref').exists()


def test_sample_batches_stream_the_samples_draw_samples_returns(trained_run):
    """uint8 batches from the device (batch i + 1 dispatched before batch i is fetched) are the
    to_uint8 of draw_samples' floats, cut to num_samples."""
    from diffusion_jax import generate, image_utils, run, sharding  # pylint: disable=import-outside-toplevel
    c, workdir = trained_run
    mesh = sharding.make_mesh()
    loaded = run.load(workdir, mesh=mesh)
    whole, _ = generate.draw_samples(loaded.config, loaded.variables, mesh, 20)
    batches = [x for x, _ in generate.sample_batches(loaded.config, loaded.variables, mesh, 20,
                                                     uint8=True)]
    assert [b.shape[0] for b in batches] == [16, 4] and batches[0].dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate(batches), image_utils.to_uint8(whole))
