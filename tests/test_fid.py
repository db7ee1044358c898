"""FID, Inception Score and precision/recall against direct formulas and known answers."""
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
from sklearn.neighbors import NearestNeighbors

from diffusion_jax.evaluation import fid


def _random_gaussian_stats(rng, dim, rank=None):
    a = rng.normal(size=(dim, rank or 2 * dim))
    return rng.normal(size=dim), a @ a.T / a.shape[1]


def _scipy_frechet_distance(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root (as the reference code)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = _random_gaussian_stats(rng, dim), _random_gaussian_stats(rng, dim)
    expected = _scipy_frechet_distance(*a, *b)
    assert fid.frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_of_rank_deficient_covariances():
    # 100 samples in 256-d: singular covariances, where sqrtm of the product is ill-conditioned.
    rng = np.random.default_rng(0)
    a, b = _random_gaussian_stats(rng, 256, rank=100), _random_gaussian_stats(rng, 256, rank=100)
    value = fid.frechet_distance(*a, *b)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(_scipy_frechet_distance(*a, *b), rel=1e-6)
    # sqrt of the ~1e-15 round-off in the 156 zero eigenvalues costs ~1e-8 of the scale.
    scale = np.trace(a[1])
    assert abs(fid.frechet_distance(*a, *a)) < 1e-7 * scale
    assert abs(_scipy_frechet_distance(*a, *a)) < 1e-7 * scale


def test_fid_of_a_set_with_itself_is_zero_and_shift_adds_squared_norm():
    x = np.random.default_rng(1).normal(size=(500, 32))
    assert abs(fid.fid_from_features(x, x)) < 1e-8
    shift = np.full(32, 0.5)
    assert fid.fid_from_features(x, x + shift) == pytest.approx(shift @ shift, rel=1e-8)


def test_running_stats_stream_and_merge_equal_numpy():
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(301, 16)).astype(np.float32)
    stats = fid.RunningStats.from_features(np.array_split(x, 7))
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    halves = fid.RunningStats.zeros(16).update(x[:100]).merge(
        fid.RunningStats.from_features([x[100:]]))
    for got, want in zip(halves, stats):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert stats.n == 301 and stats.total.dtype == np.float64


def test_merge_across_processes_keeps_float64_precision():
    stats = fid.RunningStats.from_features([np.random.default_rng(3).normal(size=(10, 4))])
    assert fid.merge_across_processes(stats) is stats  # one process: nothing to do
    x = np.random.default_rng(4).normal(size=(4, 4)) * 1e3 + 1e6
    # float32 alone keeps ~1e-7 relative; the hi + lo pair keeps ~1e-14.
    np.testing.assert_allclose(fid._sum_over_processes(x), x, rtol=1e-13)


def test_inception_score_uniform_logits_is_one():
    mean, std = fid.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_and_balanced_is_num_classes():
    num_classes, per_split = 7, 7 * 3
    labels = np.arange(10 * per_split) % num_classes  # every split holds each class 3 times
    logits = 50.0 * np.eye(num_classes)[labels]
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(num_classes, rel=1e-9) and std < 1e-9


def test_inception_score_matches_entropy_formula():
    logits = np.random.default_rng(5).normal(0.0, 3.0, size=(203, 12))
    p = scipy.special.softmax(logits, axis=1)[:200]  # 10 splits of 20; 3 samples dropped
    scores = [np.exp(np.mean(scipy.stats.entropy(part.T, part.mean(0)[:, None])))
              for part in np.split(p, 10)]
    mean, std = fid.inception_score(logits, num_splits=10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_knn_radii_match_sklearn():
    x = np.random.default_rng(6).normal(size=(100, 10)).astype(np.float32)
    distances, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)  # includes the point
    np.testing.assert_allclose(np.sqrt(fid.knn_radii(x, k=3, batch_size=32)), distances[:, 3],
                               rtol=1e-4)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(120, 8)).astype(np.float32)
    assert fid.precision_recall(real, real, k=3, batch_size=50) == (1.0, 1.0)
    far = rng.normal(size=(90, 8)).astype(np.float32) + 1000.0
    assert fid.precision_recall(real, far, k=3, batch_size=50) == (0.0, 0.0)
    # Half the fakes are real points, half are far away: exactly half lie on the real manifold.
    half = np.concatenate([real[:60], far[:60]])
    precision, recall = fid.precision_recall(real, half, k=3, batch_size=50)
    assert precision == 0.5 and 0.5 <= recall <= 1.0


def test_reference_stats_computes_once_and_caches(tmp_path):
    path = tmp_path / "cifar10_train.npz"
    x = np.random.default_rng(8).normal(size=(50, 6))
    calls = []

    def compute():
        calls.append(1)
        return fid.RunningStats.from_features([x])

    first = fid.reference_stats(path, compute)
    second = fid.reference_stats(path, compute)
    assert len(calls) == 1
    assert sorted(first) == sorted(second) == ["mu", "n", "sigma", "total", "total_outer"]
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    np.testing.assert_allclose(second["sigma"], np.cov(x, rowvar=False), rtol=1e-12)
    assert fid.fid_from_stats(fid.stats_from_arrays(second),
                              fid.RunningStats.from_features([x])) == pytest.approx(0, abs=1e-9)


def test_reference_stats_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "stats.npz"

    def failing():
        raise RuntimeError("dataset went away")

    with pytest.raises(RuntimeError):
        fid.reference_stats(path, failing)

    def savez_then_crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(OSError):
        fid.reference_stats(path, lambda: {"mu": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []
