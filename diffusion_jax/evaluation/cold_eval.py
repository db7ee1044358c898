"""`--mode=eval` of a cold-diffusion run (diffusion.process='cold'): restoration errors on a data
split instead of the NLL (a deterministic degradation has no likelihood).

For x_0 of eval.split (eval.batch_size, eval.num_batches):
  direct_l1[s]    mean |R(D(x_0, s), s) - x_0|, the training objective at each level s = 1 … T
                  (the per-level loss: how much one restoration recovers)
  direct_l1       its mean over s
  chain_l1, chain_rmse   the chain's restoration of D(x_0, T) with sampling.method ('cold':
                  Bansal et al.'s Algorithm 2; 'cold_naive': Algorithm 1), against x_0: for mask
                  the inpainting error of the hidden region; for the mean-ending degradations
                  the distance of a generation from the image whose colour it started from.
  degraded_l1     mean |D(x_0, T) - x_0|, the floor any restoration must beat
Written to workdir/eval/restoration_<step>.json.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import cold as cold_lib
from diffusion_jax import guidance, image_utils, samplers, sharding
from diffusion_jax.samplers import chain


@functools.partial(jax.jit, static_argnames=('static',))
def _per_level_jit(dynamic, x0, *, static):
    cold, model_fn = static.merge(dynamic)

    def level(s):
        x_s = cold.degrade(x0, jnp.full((x0.shape[0],), s, jnp.int32))
        return jnp.mean(jnp.abs(cold.restore(model_fn, x_s, jnp.full((x0.shape[0],), s)) - x0))
    return jax.lax.map(level, jnp.arange(1, cold.num_timesteps + 1))


def _per_level_l1(cold, model_fn, x0):
    """[T]: mean |R(D(x_0, s), s) - x_0| for s = 1 … T."""
    dynamic, static = chain.partition((cold, model_fn))  # the model's apply is static
    return _per_level_jit(dynamic, x0, static=static)


def evaluate_restoration(config, workdir: str, loaded, mesh) -> dict:
    """The restoration errors of the run `loaded` (run.load) on config.eval.split."""
    from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    e, s = config.eval, config.sampling
    cold = loaded.diffusion
    if not isinstance(cold, cold_lib.ColdDiffusion):
        raise ValueError("evaluate_restoration needs diffusion.process='cold'.")
    ds = input_pipeline.get_dataset(config.data, e.split)
    total = math.ceil(len(ds) / e.batch_size)
    total = min(total, e.num_batches) if e.num_batches else total
    classes = int(config.model.get('num_classes', 0) or 0)
    sums = dict(direct=np.zeros(cold.num_timesteps), chain_l1=0.0, chain_sq=0.0, degraded=0.0)
    count = 0
    for i in range(total):
        idx = np.resize(np.arange(i * e.batch_size, min((i + 1) * e.batch_size, len(ds))),
                        e.batch_size)
        batch = ds.get(idx)
        x0 = jnp.asarray(batch['image'], jnp.float32)
        y = jnp.asarray(batch['label'], jnp.int32) if classes else None
        model_fn = guidance.bind_model(loaded.model.apply, loaded.variables, y)
        use = mesh if e.batch_size % mesh.devices.size == 0 else None
        x_T = cold.degrade(x0, jnp.full((x0.shape[0],), cold.num_timesteps, jnp.int32))
        out = samplers.cold_restore(cold, model_fn, x_T, method=s.method,
                                    clip_denoised=s.clip_denoised, mesh=use)
        n = min(e.batch_size, len(ds) - i * e.batch_size)
        err = np.asarray(sharding.to_host(out - x0))[:n]
        sums['direct'] += np.asarray(_per_level_l1(cold, model_fn, x0[:n])) * n
        sums['chain_l1'] += float(np.abs(err).mean(axis=tuple(range(1, err.ndim))).sum())
        sums['chain_sq'] += float(np.square(err).mean(axis=tuple(range(1, err.ndim))).sum())
        sums['degraded'] += float(np.abs(np.asarray(x_T - x0)[:n]).mean(
            axis=tuple(range(1, err.ndim))).sum())
        count += n
        if i == 0 and jax.process_index() == 0:
            grid = np.concatenate([image_utils.to_uint8(a[:8]) for a in (x0, x_T, out)])
            image_utils.save_grid(os.path.join(workdir, 'eval', f'restoration_{loaded.step}.png'),
                                  grid, ncols=8)
    direct = sums['direct'] / count
    results = dict(step=int(loaded.step), split=e.split, num_images=count, method=s.method,
                   degradation=cold.degradation, direct_l1=float(direct.mean()),
                   direct_l1_per_level=[float(v) for v in direct],
                   chain_l1=sums['chain_l1'] / count,
                   chain_rmse=math.sqrt(sums['chain_sq'] / count),
                   degraded_l1=sums['degraded'] / count)
    logging.info('eval restoration at step %d: chain L1 %.4f (RMSE %.4f), direct L1 %.4f, '
                 'degraded L1 %.4f over %d images', loaded.step, results['chain_l1'],
                 results['chain_rmse'], results['direct_l1'], results['degraded_l1'], count)
    if jax.process_index() == 0:
        image_utils.write_json(os.path.join(workdir, 'eval', f'restoration_{loaded.step}.json'),
                               results)
    return results
