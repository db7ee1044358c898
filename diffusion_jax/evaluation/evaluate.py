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

A cold-diffusion run (diffusion.process='cold') reports restoration errors instead of the NLL
(evaluation/cold_eval.py). Results go to workdir/eval/<what>_<step>.json (written atomically),
plus a sample grid.
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


ESTIMATORS = ('full', 'sampled', 'importance', 'ode')


def default_eval_config():
    """The `eval` section of every experiment config: CIFAR-10's protocol (Ho et al. 2020);
    the config files override what differs."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    e = ml_collections.ConfigDict()
    e.split = 'test'  # the 10,000 CIFAR-10 test images (Ho et al. report test NLL)
    e.batch_size = 256  # global eval batch
    e.num_batches = 0  # 0: the whole split
    e.checkpoint_step = -1  # which checkpoint to evaluate; -1: the latest valid one
    e.use_ema = True  # evaluate the EMA parameters (Ho et al. 2020 report EMA results)
    e.nll = True  # the NLL bound in bits/dim (Ho et al. 2020, Table 1)
    e.nll_estimator = 'full'  # 'full': all T terms, as published | 'sampled' | 'importance': K terms per image
    e.nll_timesteps_per_image = 32  # K of the 'sampled' estimator
    # nll_estimator='ode': the probability-flow ODE likelihood (Song et al. 2021; score_sde's
    # likelihood.py defaults: RK45 = dopri5, rtol = atol = 1e-5, Rademacher probe, uniform
    # dequantisation). Not the bound: the exact likelihood of the ODE's density model.
    e.ode_solver = 'dopri5'  # 'dopri5' | 'tsit5' (adaptive) | 'heun' | 'euler' (fixed steps only)
    e.ode_rtol = likelihood.ODE_RTOL  # relative tolerance of the adaptive step control
    e.ode_atol = likelihood.ODE_ATOL  # absolute tolerance of the adaptive step control
    e.ode_num_steps = 0  # 0: adaptive; N > 0: N equal steps of ode_solver
    e.ode_hutchinson = 'rademacher'  # trace estimator probe: 'rademacher' | 'gaussian' | 'exact'
    e.ode_dequantization = 'uniform'  # 'uniform' (a bound on the discrete NLL) | 'none'
    e.sample_quality = False  # also FID / IS / precision-recall of sampled images
    e.num_samples = 50_000  # samples for FID (Ho et al. 2020, Sec. 4: 50k)
    e.samples_path = ''  # score this samples.npz (uint8 NHWC 'images') instead of sampling
    e.reference_split = 'train'  # FID reference statistics from this split (Ho et al.: train)
    e.reference_dir = ''  # where reference statistics are cached ('' = workdir/eval)
    e.feature_space = 'inception'  # 'inception' (FID proper) | 'feature_net' (MNIST-scale data)
    e.inception_weights = ''  # converted InceptionV3 weights (diffusion_jax.evaluation.inception)
    e.feature_net_dir = ''  # a trained feature net (diffusion_jax.evaluation.feature_net)
    return e


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


def _ode_fn(config, model, diffusion):
    """Jitted (variables, x0, y, rng) -> likelihood.ode_bpd's dict, options from config.eval."""
    conditional = int(config.model.get('num_classes', 0) or 0) > 0
    e = config.eval
    options = dict(solver=e.get('ode_solver', 'dopri5'),
                   rtol=float(e.get('ode_rtol', likelihood.ODE_RTOL)),
                   atol=float(e.get('ode_atol', likelihood.ODE_ATOL)),
                   num_steps=int(e.get('ode_num_steps', 0)),
                   hutchinson=e.get('ode_hutchinson', 'rademacher'),
                   dequantization=e.get('ode_dequantization', 'uniform'))
    # Refuse bad options and ᾱ_T = 0 before compiling or reading data.
    likelihood._check_ode_options(options['solver'], options['num_steps'],  # pylint: disable=protected-access
                                  options['hutchinson'])
    if options['dequantization'] not in likelihood.DEQUANTIZATION:
        raise ValueError(f"eval.ode_dequantization={options['dequantization']!r}: use one of "
                         f'{", ".join(likelihood.DEQUANTIZATION)}.')
    likelihood.ContinuousVP.from_diffusion(diffusion)

    def ode(variables, x0, y, rng):
        fn = lambda x_t, t: model.apply(variables, x_t, t, y=y if conditional else None)
        return likelihood.ode_bpd(diffusion, fn, x0, rng, **options)
    return jax.jit(ode), options


def evaluate_nll(config, workdir: str, variables, step: int, mesh) -> dict:
    """Streams config.eval.split through the bound; returns (and writes) the summary.

    eval.nll_estimator: 'full' (all T terms, the published protocol), 'sampled' (K uniform t per
    image) or 'importance' (the first batch in full, whose terms set p(t) ∝ √E[L_t²] for K
    importance-sampled t per image on the rest). All three are unbiased for the same bound.
    'ode': bits/dim through the probability-flow ODE (likelihood.ode_bpd, eval.ode_* options),
    reported with the mean number of network evaluations (nfe) per batch.
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
    ode_fn, ode_options = _ode_fn(config, model, diffusion) if estimator == 'ode' else (None, {})
    ode_nfe, ode_failed = [], 0
    uniform = np.full((diffusion.num_timesteps,), 1.0 / diffusion.num_timesteps, np.float32)
    probs = None if estimator == 'full' else uniform
    acc = likelihood.BpdAccumulator()
    key = jax.random.key(config.training.seed + 1)
    start = time.time()

    def consume(i, out, mask):
        """Batch i's results fetched to the host and accumulated."""
        nonlocal probs, ode_failed
        # The padding that fills the last batch is computed (one compiled shape) but not counted.
        out, mask = sharding.to_host((out, mask))
        mask = np.asarray(mask, bool)
        if 'vb' in out:
            vb = np.asarray(out.pop('vb'))[mask]
            if estimator == 'importance':
                probs = np.asarray(likelihood.importance_probs(vb), np.float32)
        if estimator == 'ode':
            ode_nfe.append(int(out['nfe']))
            ode_failed += 0 if bool(out['ok']) else 1
            out = {'total': out['bpd']}
        terms = {'total': out['total'], 'prior': out['prior']} if estimator not in (
            'full', 'ode') else out
        acc.add({name: np.asarray(v)[mask] for name, v in terms.items()})
        elapsed = time.time() - start
        logging.info('eval nll: batch %d/%d, %.4f bits/dim so far, %.1fs elapsed, ETA %.0fs',
                     i + 1, total, acc.mean('total'), elapsed, elapsed / (i + 1) * (total - i - 1))

    # One batch in flight: batch i+1 is dispatched before batch i is fetched, so the device is
    # not idle while the host accumulates. (The importance estimator's first batch sets p(t)
    # for the rest, so it is fetched before the next one is dispatched.)
    previous = None
    for i, batch in enumerate(input_pipeline.eval_iterator(ds, e.batch_size, num_batches)):
        x0, y, mask = sharding.shard_batch((batch['image'], batch['label'], batch['mask']), mesh)
        rng = jax.random.fold_in(key, i)
        use_full = probs is None or (estimator == 'importance' and i == 0)
        if estimator == 'ode':
            out = ode_fn(variables, x0, y, rng)
        else:
            out = full_fn(variables, x0, y, rng) if use_full else sampled_fn(variables, x0, y, rng,
                                                                              probs)
        if previous is not None:
            consume(*previous)
        previous = (i, out, mask)
        if estimator == 'importance' and i == 0:
            consume(*previous)
            previous = None
    if previous is not None:
        consume(*previous)
    result = dict(acc.summary(), step=step, split=e.split, dataset=config.data.dataset,
                  estimator=estimator, num_timesteps=diffusion.num_timesteps)
    if estimator in ('sampled', 'importance'):
        result['timesteps_per_image'] = int(e.get('nll_timesteps_per_image', 32))
    if estimator == 'ode':
        result.update(ode_options, nfe_mean=float(np.mean(ode_nfe)), nfe_per_batch=ode_nfe,
                      batches_over_max_steps=ode_failed)
        if ode_failed:
            logging.warning('eval nll (ode): %d batches ran out of solver steps; their bits/dim '
                            'are not valid.', ode_failed)
    if jax.process_index() == 0:
        image_utils.write_json(os.path.join(workdir, 'eval', f'nll_{step}.json'), result)
    logging.info('eval nll at step %d: %.4f ± %.4f bits/dim over %d images', step,
                 result['total_bpd'], result['total_bpd_stderr'], result['num_images'])
    return result


def run_eval(config, workdir: str) -> dict:
    """The `--mode=eval` driver: NLL and, when asked, sample quality. Returns the results.

    The model, diffusion and data come from the run's stored config.json (diffusion_jax.run);
    config (None: the stored one) contributes its eval and sampling sections.
    eval.checkpoint_step picks the checkpoint (-1: latest). With eval.samples_path set, only that
    file's samples are scored (FID / IS / precision-recall against the configured reference),
    without loading a model: the workdir need not hold a run then (config must be given).
    """
    # pylint: disable=import-outside-toplevel
    from diffusion_jax import config_validation, run
    on_disk = run.Run(workdir)
    if config is None or on_disk.has_config():
        config = run.merge_config(on_disk.config, config)
    config = config_validation.resolve(config, 'eval')
    e = config.eval
    if e.get('samples_path', ''):
        from diffusion_jax.evaluation import sample_quality
        return {'sample_quality': sample_quality.evaluate_samples_file(config, workdir)}
    mesh = sharding.make_mesh()
    sharding.check_global_batch(e.batch_size, mesh, 'eval.batch_size')
    loaded = run.load(workdir, config, step=e.get('checkpoint_step', run.LATEST),
                      use_ema=bool(e.get('use_ema', True)), mesh=mesh)
    variables, step = loaded.variables, loaded.step
    results = {}
    from diffusion_jax import cold
    if cold.is_cold(config.diffusion):  # no likelihood: the restoration errors instead
        from diffusion_jax.evaluation import cold_eval
        results['restoration'] = cold_eval.evaluate_restoration(config, workdir, loaded, mesh)
    elif e.get('nll', True):
        results['nll'] = evaluate_nll(config, workdir, variables, step, mesh)
    if e.get('sample_quality', False):
        from diffusion_jax.evaluation import sample_quality
        results['sample_quality'] = sample_quality.evaluate_samples(config, workdir, variables,
                                                                    step, mesh)
    return results
