"""Sample quality of a run: FID, Inception Score and precision/recall of generated samples.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^{1/2})      (Heusel et al. 2017)
    IS  = exp(E_x KL(p(y|x) ‖ p(y)))                             (Salimans et al. 2016), 10 splits
    precision/recall: Kynkäänniemi et al. 2019 with k = 3 nearest neighbours.

Features come from one of two spaces (config.eval.feature_space):
  'inception'    the FID InceptionV3 (pool 2048-d, logits 1008), weights from
                 config.eval.inception_weights (see diffusion_jax.evaluation.inception): the numbers
                 compare with published ones when the protocol matches (50,000 samples against the
                 training set's statistics).
  'feature_net'  a small classifier trained on the dataset itself (python -m
                 diffusion_jax.evaluation.feature_net --dataset=... --out=DIR; config.eval.
                 feature_net_dir). The practice of MNIST-scale papers; NOT comparable with
                 Inception FID.
The reference statistics of (dataset, split, feature space) are computed once and cached in
config.eval.reference_dir (default workdir/eval) as .npz, with up to num_samples real features kept
for precision/recall.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from diffusion_jax import image_utils
from diffusion_jax.evaluation import fid

FEATURE_SPACES = ('inception', 'feature_net')


class FeatureSpace:
    """features(uint8 NHWC [N, ...]) -> dict(features [N, D], logits [N, K]); and a name."""

    def __init__(self, eval_config):
        space = eval_config.get('feature_space', 'inception')
        if space not in FEATURE_SPACES:
            raise ValueError(f'eval.feature_space={space!r}: use one of {", ".join(FEATURE_SPACES)}.')
        self.name = space
        if space == 'inception':
            from diffusion_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
            path = eval_config.get('inception_weights', '') or ''
            self._variables = inception.load_pytorch_fid_weights(path)
            self._fn = lambda images: _rename(inception.inception_features(self._variables, images))
        else:
            from diffusion_jax.evaluation import feature_net  # pylint: disable=import-outside-toplevel
            folder = eval_config.get('feature_net_dir', '') or ''
            if not os.path.exists(os.path.join(folder, feature_net.META_FILE)):
                raise FileNotFoundError(
                    f'eval.feature_net_dir={folder!r} holds no trained feature net: train one with '
                    'python -m diffusion_jax.evaluation.feature_net --dataset=<dataset> --out=DIR '
                    'and set --config.eval.feature_net_dir=DIR.')
            model, params, self.meta = feature_net.load_feature_net(folder)
            self._fn = lambda images: feature_net.feature_net_features(model, params, images)

    def __call__(self, images_uint8) -> dict:
        return self._fn(images_uint8)


def _rename(out: dict) -> dict:
    # Published Inception Scores use the logits without the final bias (the original TF code).
    return dict(features=out['pool'], logits=out.get('logits_unbiased', out['logits']))


def reference_features(config, space: FeatureSpace, max_keep: int, folder: str) -> dict:
    """Statistics (float64 mean/cov accumulators) of the reference split, and up to max_keep of
    its features for precision/recall, cached on disk."""
    from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    e = config.eval
    split = e.get('reference_split', 'train')
    # max_keep is in the name: a cache made for fewer samples must not cap precision/recall.
    name = f'ref_{config.data.dataset.replace("/", "_")}_{split}_{space.name}_{max_keep}.npz'

    def compute():
        ds = input_pipeline.get_dataset(config.data, split)
        stats, kept = None, []
        for batch in input_pipeline.eval_iterator(ds, e.batch_size):
            images = image_utils.to_uint8(batch['image'][batch['mask']])
            feats = space(images)['features']
            stats = (stats or fid.RunningStats.zeros(feats.shape[1])).update(feats)
            if sum(len(k) for k in kept) < max_keep:
                kept.append(feats)
        arrays = fid.stats_to_arrays(fid.merge_across_processes(stats))
        arrays['features'] = np.concatenate(kept)[:max_keep].astype(np.float32)
        return arrays

    return fid.reference_stats(os.path.join(folder, name), compute)


def sample_metrics(fake_features: dict, ref: dict, k: int = 3, is_splits: int = 10) -> dict:
    """FID, IS and precision/recall of fake features against reference arrays."""
    fake_stats = fid.RunningStats.zeros(fake_features['features'].shape[1]).update(
        fake_features['features'])
    fid_value = fid.fid_from_stats(fid.stats_from_arrays(ref), fake_stats)
    is_mean, is_std = fid.inception_score(fake_features['logits'], num_splits=is_splits)
    real = ref['features']
    fake = fake_features['features'][:len(real)]
    precision, recall = fid.precision_recall(real, fake, k=k)
    return dict(fid=float(fid_value), inception_score=float(is_mean),
                inception_score_std=float(is_std), precision=float(precision),
                recall=float(recall), num_samples=int(fake_features['features'].shape[0]),
                num_reference_for_pr=int(len(real)))


def evaluate_samples(config, workdir: str, variables, step: int, mesh) -> dict:
    """Draws config.eval.num_samples samples and scores them; writes eval/samples_<step>.json."""
    from diffusion_jax import generate  # pylint: disable=import-outside-toplevel
    e = config.eval
    space = FeatureSpace(e)
    num = int(e.get('num_samples', 50_000))
    samples, _ = generate.draw_samples(config, variables, mesh, num)
    images = image_utils.to_uint8(samples)
    fake = space(images)
    ref = reference_features(config, space, max_keep=num,
                             folder=e.get('reference_dir', '') or os.path.join(workdir, 'eval'))
    result = dict(sample_metrics(fake, ref), step=step, feature_space=space.name,
                  sampler=config.sampling.method, num_steps=str(config.sampling.num_steps),
                  eta=float(config.sampling.eta), dataset=config.data.dataset)
    if jax.process_index() == 0:
        folder = os.path.join(workdir, 'eval')
        image_utils.write_json(os.path.join(folder, f'samples_{step}.json'), result)
        image_utils.save_grid(os.path.join(folder, f'samples_{step}.png'), images[:64])
    logging.info('sample quality at step %d: %s', step, result)
    return result

