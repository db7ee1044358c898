"""Sample-quality metrics on feature vectors: FID, Inception Score, precision and recall.

All functions take features (e.g. ``inception.inception_features(...)['pool']``, [N, D]) or
logits, not images, so the same code serves the Inception space and the small classifier space
of ``feature_net``.

Fréchet Inception Distance (Heusel et al. 2017), between Gaussian fits N(mu1, S1), N(mu2, S2):

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Covariances are unbiased (divide by n - 1, as numpy.cov in the reference code). The trace of
the matrix square root is computed without forming (S1 S2)^{1/2}: the eigenvalues of S1 S2 are
those of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so

    Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})),

two symmetric eigendecompositions in float64 with negative round-off eigenvalues clipped to 0.
This never goes complex or singular, unlike scipy.linalg.sqrtm on a near-singular product.

Inception Score (Salimans et al. 2016), from logits [N, K], in ``num_splits`` equal splits:

    IS = exp( E_x KL(p(y|x) || p(y)) ),   p(y) = E_x p(y|x) within the split,

reported as mean and standard deviation over the splits (the remainder N mod splits is
dropped, as in the original code). For numbers comparable with the literature feed the
Inception ``logits_unbiased``.

Improved precision and recall (Kynkäänniemi et al. 2019), k = 3: each feature vector phi of a
set defines a ball of radius NN_k(phi) (distance to its k-th nearest neighbour in the same set,
itself excluded). With real features R and generated features G,

    precision = |{g in G : exists r in R, ||g - r|| <= NN_k(r)}| / |G|
    recall    = |{r in R : exists g in G, ||r - g|| <= NN_k(g)}| / |R|

Feature statistics stream over batches in float64: ``RunningStats`` holds n, sum_i x_i [D] and
sum_i x_i x_i^T [D, D]; partial statistics (devices, hosts, shards of a dataset) add up with
``merge``. ``reference_stats`` caches a dataset split's statistics in an .npz file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import image_utils

# eval.feature_space: the networks features come from, 'inception' (evaluation/inception.py, FID
# proper) or 'feature_net' (evaluation/feature_net.py, a classifier trained on MNIST-scale data).
FEATURE_SPACES = ('inception', 'feature_net')


# ------------------------------------------------------------------------------------------
# Streaming statistics.


class RunningStats(NamedTuple):
    """Sufficient statistics of a feature set, a pytree of float64 numpy arrays.

    n [] (count), total [D] (sum of x), total_outer [D, D] (sum of x x^T). float64 because the
    covariance is formed as a difference of nearly equal large sums, sum x x^T / n - mu mu^T,
    which amplifies the round-off accumulated over tens of thousands of samples.
    """
    n: np.ndarray
    total: np.ndarray
    total_outer: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> "RunningStats":
        return cls(np.zeros((), np.float64), np.zeros(dim, np.float64),
                   np.zeros((dim, dim), np.float64))

    def update(self, features) -> "RunningStats":
        """Statistics with one more batch of features [B, D] added."""
        x = np.asarray(features, dtype=np.float64)
        return RunningStats(self.n + x.shape[0], self.total + x.sum(0),
                            self.total_outer + x.T @ x)

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Statistics of the union of two disjoint feature sets."""
        return RunningStats(*(a + b for a, b in zip(self, other)))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu [D] and the unbiased covariance [D, D] (needs n >= 2)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.total / self.n
        cov = (self.total_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2  # symmetric to the last bit, for eigh

    @classmethod
    def from_features(cls, batches: Iterable) -> "RunningStats":
        """Stream an iterable of [B, D] feature batches into statistics."""
        stats = None
        for batch in batches:
            batch = np.asarray(batch)
            if stats is None:
                stats = cls.zeros(batch.shape[-1])
            stats = stats.update(batch)
        if stats is None:
            raise ValueError("no feature batches")
        return stats


def merge_across_processes(stats: RunningStats) -> RunningStats:
    """Sum statistics over all JAX processes (hosts); identity for a single process.

    JAX arrays are float32 unless x64 is on, so each float64 leaf is sent as two float32
    parts hi + lo (hi = float32(x), lo = float32(x - hi)) and summed back in float64 on the
    host: ~48 bits of the mantissa survive instead of 24.
    """
    if jax.process_count() == 1:
        return stats
    return RunningStats(*(_sum_over_processes(x) for x in stats))


def _sum_over_processes(x) -> np.ndarray:
    """Sum a float64 array over processes, sent as float32 parts hi + lo."""
    x = np.asarray(x, np.float64)
    hi = x.astype(np.float32)
    lo = (x - hi).astype(np.float32)
    parts = multihost_utils.process_allgather(np.stack([hi, lo]), tiled=False)  # [P, 2, ...]
    return np.asarray(parts, np.float64).sum(axis=(0, 1))


# ------------------------------------------------------------------------------------------
# Fréchet distance.


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh (round-off negatives -> 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64. mu [D], sigma [D, D]."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shapes differ: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(a: RunningStats, b: RunningStats) -> float:
    """FID between two feature sets given as RunningStats."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def fid_from_features(features1, features2) -> float:
    """FID between two feature arrays [N1, D] and [N2, D]."""
    return fid_from_stats(RunningStats.from_features([features1]),
                          RunningStats.from_features([features2]))


# ------------------------------------------------------------------------------------------
# Inception Score.


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))); logits [N, K]."""
    logits = np.asarray(logits, np.float64)
    n = logits.shape[0] // num_splits
    if n == 0:
        raise ValueError(f"{logits.shape[0]} samples cannot fill {num_splits} splits")
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))  # log softmax
    scores = []
    for part in np.split(log_p[:n * num_splits], num_splits):
        log_marginal = np.log(np.exp(part).mean(0))
        kl = (np.exp(part) * (part - log_marginal)).sum(-1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------
# Improved precision and recall.


@jax.jit
def _sq_distances(a, b):
    """Squared Euclidean distances [A, B] via ||a||^2 - 2 a.b + ||b||^2, clipped at 0."""
    d = (jnp.sum(a * a, -1)[:, None] - 2.0 * jnp.dot(a, b.T, precision="highest")
         + jnp.sum(b * b, -1)[None, :])
    return jnp.maximum(d, 0.0)


def _row_blocks(x: np.ndarray, batch_size: int):
    """Yield (start, block) with the last block zero-padded to batch_size (one compilation)."""
    batch_size = min(batch_size, x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        block = x[start:start + batch_size]
        pad = batch_size - block.shape[0]
        yield start, np.pad(block, ((0, pad), (0, 0))) if pad else block


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(block, x, k):
    # top_k of the negated distances: the k + 1 smallest; index 0 is the point itself.
    return -jax.lax.top_k(-_sq_distances(block, x), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(block, centres, radii):
    return jnp.any(_sq_distances(block, centres) <= radii[None, :], axis=1)


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
    """Squared distance [N] of each vector to its k-th nearest neighbour in the same set."""
    x = np.asarray(features, np.float32)
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} vectors, have {x.shape[0]}")
    out = [np.asarray(_kth_neighbour(block, x, k)) for _, block in _row_blocks(x, batch_size)]
    return np.concatenate(out)[:x.shape[0]]


def _fraction_covered(queries, centres, radii, batch_size: int) -> float:
    """Fraction of queries inside at least one ball (centres[j], radius^2 radii[j])."""
    q, c, r = (np.asarray(a, np.float32) for a in (queries, centres, radii))
    hits = [np.asarray(_inside_any_ball(block, c, r)) for _, block in _row_blocks(q, batch_size)]
    return float(np.concatenate(hits)[:q.shape[0]].mean())


def precision_recall(real_features, fake_features, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake vs real [N, D].

    Distances are computed in row blocks of ``batch_size`` against the whole other set, so
    memory is O(batch_size * N) rather than O(N^2).
    """
    real_radii = knn_radii(real_features, k, batch_size)
    fake_radii = knn_radii(fake_features, k, batch_size)
    precision = _fraction_covered(fake_features, real_features, real_radii, batch_size)
    recall = _fraction_covered(real_features, fake_features, fake_radii, batch_size)
    return precision, recall


# ------------------------------------------------------------------------------------------
# Reference-statistics cache.


def stats_to_arrays(stats: RunningStats) -> dict[str, np.ndarray]:
    """RunningStats -> {'n', 'total', 'total_outer', 'mu', 'sigma'} for saving."""
    mu, sigma = stats.mean_cov()
    return dict(stats._asdict(), mu=mu, sigma=sigma)


def stats_from_arrays(arrays: Mapping[str, np.ndarray]) -> RunningStats:
    return RunningStats(*(np.asarray(arrays[f], np.float64) for f in RunningStats._fields))


def cache_key_suffix(key: Mapping | None) -> str:
    """A short hash of `key` (JSON, sorted) for the cache file's name: '' without a key."""
    if not key:
        return ''
    text = json.dumps({k: str(v) for k, v in key.items()}, sort_keys=True)
    return '_' + hashlib.sha256(text.encode()).hexdigest()[:12]


def reference_stats(cache_path: str | os.PathLike,
                    compute_fn: Callable[[], Mapping[str, np.ndarray] | RunningStats],
                    key: Mapping | None = None) -> dict[str, np.ndarray]:
    """Load the arrays cached at ``cache_path`` (.npz), or compute, save and return them.

    ``compute_fn()`` returns a mapping of arrays (e.g. statistics plus the features needed for
    precision/recall) or a RunningStats (saved via ``stats_to_arrays``). The file is written
    with ``image_utils.atomic_write``, so a crash or exception never leaves a partial cache that a later
    run would trust.

    key: everything that changes the statistics (dataset, split, image size, crop, feature
    space and its weights' identity); its hash goes into the file name (cache_key_suffix) and
    the key itself into the file ('cache_key', JSON), and a file whose stored key differs is
    not used. Several processes: all of them compute (compute_fn may hold collectives) unless
    every one sees the cache; process 0 alone writes it, and the others wait at a barrier until
    it is in place.
    """
    cache_path = epath.Path(os.fspath(cache_path))
    if key:
        cache_path = cache_path.with_name(cache_path.stem + cache_key_suffix(key)
                                          + cache_path.suffix)
    key_text = json.dumps({k: str(v) for k, v in (key or {}).items()}, sort_keys=True)
    cached = _load_cache(cache_path, key_text if key else None)
    if not _every_process(cached is not None):
        cached = None
    if cached is not None:
        return cached
    arrays = compute_fn()
    if isinstance(arrays, RunningStats):
        arrays = stats_to_arrays(arrays)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if jax.process_index() == 0:
        stored = dict(arrays, cache_key=np.asarray(key_text)) if key else arrays
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **stored)
        image_utils.atomic_write(os.fspath(cache_path), buf.getvalue())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'fid.reference_stats:{cache_path.name}')
    return arrays


def _load_cache(path: epath.Path, key_text: str | None) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with path.open('rb') as f, np.load(f) as data:
        arrays = {k: data[k] for k in data.files}
    stored_key = arrays.pop('cache_key', None)
    if key_text is not None and (stored_key is None or str(stored_key) != key_text):
        return None
    return arrays


def _every_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))

