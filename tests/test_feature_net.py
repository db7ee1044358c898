"""The classifier feature space for digits / Fashion-MNIST: data, training, files, metrics."""
import gzip
import json
import os

import numpy as np
import pytest

from diffusion_jax.evaluation import feature_net


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """The command-line tool on digits, shortened to 300 steps (~99% at 1000)."""
    out = tmp_path_factory.mktemp("feature_net")
    meta = feature_net.main(["--dataset=digits", f"--out={out}", "--steps=300", "--seed=0"])
    return out, meta


def test_digits_split_is_fixed_and_disjoint():
    (train_x, train_y), (test_x, test_y) = feature_net.digits_split()
    assert train_x.shape == (1438, 8, 8, 1) and test_x.shape == (359, 8, 8, 1)
    assert train_x.dtype == np.uint8 and train_x.max() == 255 and train_x.min() == 0
    assert set(np.unique(test_y)) == set(range(10))
    # 0..16 -> round(v * 255 / 16): only the 17 levels of the original data occur.
    levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert set(np.unique(train_x)) <= set(levels)
    # The training pipeline's split (configs/digits.py): a seeded permutation, last 20% held out.
    from sklearn.datasets import load_digits
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(test_y, load_digits().target[perm[1438:]])


def _write_idx_gz(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        _write_idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        _write_idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    (train_x, train_y), (test_x, test_y) = feature_net.load_dataset("fashion_mnist",
                                                                    str(tmp_path))
    assert train_x.shape == (12, 28, 28, 1) and train_x.dtype == np.uint8
    np.testing.assert_array_equal(train_x[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(test_y, arrays["t10k"][1])
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        feature_net.fashion_mnist_split(str(tmp_path / "absent"))


def test_training_reaches_high_digits_accuracy(trained_digits):
    out, meta = trained_digits
    print("digits feature-net test accuracy (300 steps):", meta["test_accuracy"])
    assert meta["test_accuracy"] > 0.95
    with open(os.path.join(out, feature_net.META_FILE)) as f:
        saved = json.load(f)
    assert saved["dataset"] == "digits" and saved["test_accuracy"] == meta["test_accuracy"]
    assert sorted(os.listdir(out)) == [feature_net.META_FILE, feature_net.PARAMS_FILE]


def test_loaded_net_reproduces_accuracy_and_features(trained_digits):
    out, meta = trained_digits
    model, params, loaded_meta = feature_net.load_feature_net(str(out))
    _, (test_x, test_y) = feature_net.digits_split()
    assert feature_net.accuracy(model, params, test_x, test_y) == meta["test_accuracy"]
    # Batching (with a padded last batch) does not change the features.
    whole = feature_net.feature_net_features(model, params, test_x)
    batched = feature_net.feature_net_features(model, params, test_x, batch_size=100)
    assert whole["features"].shape == (359, loaded_meta["feature_dim"])
    assert whole["logits"].shape == (359, 10)
    np.testing.assert_allclose(batched["features"], whole["features"], rtol=1e-5, atol=1e-6)


def test_sample_metrics_in_feature_space(trained_digits):
    model, params, _ = feature_net.load_feature_net(str(trained_digits[0]))
    (train_x, _), (test_x, _) = feature_net.digits_split()
    held_out = feature_net.evaluate_samples(model, params, train_x, test_x)
    same = feature_net.evaluate_samples(model, params, test_x, test_x)
    # Dead ReLU units make the covariance singular: round-off leaves ~1e-8 of the scale.
    assert abs(same["fd"]) < 1e-5 * held_out["fd"]
    assert same["precision"] == same["recall"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, test_x.shape, dtype=np.uint8)
    bad = feature_net.evaluate_samples(model, params, train_x, noise)
    print("digits FD: held-out", held_out["fd"], "noise", bad["fd"])
    assert bad["fd"] > 10 * held_out["fd"]
    assert held_out["precision"] > 0.8 and bad["precision"] < 0.2
