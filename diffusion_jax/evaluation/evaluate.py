"""`--mode=eval`: the numbers diffusion papers are judged by, for the latest checkpoint of a run.

  * NLL in bits/dim on a data split (DDPM Table 1's NLL column): the full T-step bound
    (calc_bpd_loop: L_T + Σ L_t + L_0, reported with its parts) or, with
    eval.nll_estimator='sampled' / 'importance', the unbiased K-timestep estimate (uniform or
    importance-sampled t) with its standard error.
  * Sample quality (eval.sample_quality=True): eval.num_samples samples with the config's sampler,
    then FID, Inception Score and precision/recall (k=3) against reference statistics of a data
    split, cached once per (dataset, split, feature space). The feature space is InceptionV3
    (eval.feature_space='inception', weights from eval.inception_weights) or, for MNIST-scale
    data, a small classifier trained on the dataset (eval.feature_space='feature_net',
    eval.feature_net_dir) — the latter's FID is not comparable with Inception FID.

Results go to workdir/eval/<what>_<step>.json (written atomically), plus a sample grid.
"""
from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging

from diffusion_jax import image_utils, sharding
from diffusion_jax.evaluation import likelihood


ESTIMATORS = ('full', 'sampled', 'importance')


def _nll_fns(config, model, diffusion):
    """Jitted (variables, x0, y, rng[, probs]) -> per-image bound terms: the full bound and the
    K-timestep estimate."""
    conditional = int(config.model.get('num_classes', 0) or 0) > 0
    k = int(config.eval.get('nll_timesteps_per_image', 32))

    def bind(variables, y):
        return lambda x_t, t: model.apply(variables, x_t, t, y=y if conditional else None)

    def full(variables, x0, y, rng):
        return likelihood.full_bpd(diffusion, bind(variables, y), x0, rng)

    def sampled(variables, x0, y, rng, probs):
        return likelihood.sampled_bpd(diffusion, bind(variables, y), x0, rng, k, probs=probs)
    return jax.jit(full), jax.jit(sampled)


def evaluate_nll(config, workdir: str, variables, step: int, mesh) -> dict:
    """Streams config.eval.split through the bound; returns (and writes) the summary.

    eval.nll_estimator: 'full' (all T terms, the published protocol), 'sampled' (K uniform t per
    image) or 'importance' (the first batch in full, whose terms set p(t) ∝ √E[L_t²] for K
    importance-sampled t per image on the rest). All three are unbiased for the same bound.
    """
    from diffusion_jax import input_pipeline, models  # pylint: disable=import-outside-toplevel
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    e = config.eval
    estimator = e.get('nll_estimator', 'full')
    if estimator not in ESTIMATORS:
        raise ValueError(f'eval.nll_estimator={estimator!r}: use one of {", ".join(ESTIMATORS)}.')
    model = models.get_model(config.model)
    diffusion = create_diffusion(config.diffusion)
    ds = input_pipeline.get_dataset(config.data, e.split)
    num_batches = e.num_batches or None
    total = math.ceil(len(ds) / e.batch_size) if num_batches is None else num_batches
    full_fn, sampled_fn = _nll_fns(config, model, diffusion)
    uniform = np.full((diffusion.num_timesteps,), 1.0 / diffusion.num_timesteps, np.float32)
    probs = None if estimator == 'full' else uniform
    acc = likelihood.BpdAccumulator()
    key = jax.random.key(config.training.seed + 1)
    start = time.time()
    for i, batch in enumerate(input_pipeline.eval_iterator(ds, e.batch_size, num_batches)):
        x0, y, mask = sharding.shard_batch((batch['image'], batch['label'], batch['mask']), mesh)
        rng = jax.random.fold_in(key, i)
        use_full = probs is None or (estimator == 'importance' and i == 0)
        out = full_fn(variables, x0, y, rng) if use_full else sampled_fn(variables, x0, y, rng,
                                                                          probs)
        # The padding that fills the last batch is computed (one compiled shape) but not counted.
        out, mask = sharding.to_host((out, mask))
        mask = np.asarray(mask, bool)
        if 'vb' in out:
            vb = np.asarray(out.pop('vb'))[mask]
            if estimator == 'importance':
                probs = np.asarray(likelihood.importance_probs(vb), np.float32)
        terms = {'total': out['total'], 'prior': out['prior']} if estimator != 'full' else out
        acc.add({name: np.asarray(v)[mask] for name, v in terms.items()})
        elapsed = time.time() - start
        logging.info('eval nll: batch %d/%d, %.4f bits/dim so far, %.1fs elapsed, ETA %.0fs',
                     i + 1, total, acc.mean('total'), elapsed, elapsed / (i + 1) * (total - i - 1))
    result = dict(acc.summary(), step=step, split=e.split, dataset=config.data.dataset,
                  estimator=estimator, num_timesteps=diffusion.num_timesteps)
    if estimator != 'full':
        result['timesteps_per_image'] = int(e.get('nll_timesteps_per_image', 32))
    if jax.process_index() == 0:
        image_utils.write_json(os.path.join(workdir, 'eval', f'nll_{step}.json'), result)
    logging.info('eval nll at step %d: %.4f ± %.4f bits/dim over %d images', step,
                 result['total_bpd'], result['total_bpd_stderr'], result['num_images'])
    return result


def run_eval(config, workdir: str) -> dict:
    """The `--mode=eval` driver: NLL and, when asked, sample quality. Returns the results."""
    from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
    e = config.eval
    mesh = sharding.make_mesh()
    sharding.check_global_batch(e.batch_size, mesh, 'eval.batch_size')
    variables, step = checkpointing.load_params_for_inference(
        config, workdir, use_ema=bool(e.get('use_ema', True)))
    variables = sharding.replicate(variables, mesh)
    results = {}
    if e.get('nll', True):
        results['nll'] = evaluate_nll(config, workdir, variables, step, mesh)
    if e.get('sample_quality', False):
        from diffusion_jax.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
        results['sample_quality'] = sample_quality.evaluate_samples(config, workdir, variables,
                                                                    step, mesh)
    return results
