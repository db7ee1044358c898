"""Editing held-out digits, judged by the digits feature net's classifier (accuracy against the
true labels of the 359 test digits).

    python experiments/edit_digits.py --gaussian_workdir=runs/digits \
        --feature_net_dir=runs/feature_net_digits [--cold_mask_workdir=runs/cold_mask] \
        [--out=experiments/results/edit_digits.json]

Rows:
  repaint right half, plain chain (j = r = 1) and with resampling (edit.jump_length/jump_n_sample,
      default j = r = 10, Lugmayr et al.), and the masked input itself (right half grey) as the
      floor; the clean digits as the ceiling;
  sdedit of digits corrupted by N(0, noise_std²) pixel noise (clipped) at strengths 0.2 … 0.8 (the
      realism-faithfulness trade-off of Meng et al. Fig. 3), with the corrupted input as floor;
  cold mask (if --cold_mask_workdir): the mask run's Algorithm 2 restoration of D(x_0, T), with
      D(x_0, T) as floor.
Every number comes from library calls (run.load, samplers.repaint / sdedit / cold_restore).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import guidance, image_utils, input_pipeline, samplers  # noqa: E402
from diffusion_jax import run as run_lib  # noqa: E402
from diffusion_jax.evaluation import feature_net  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--gaussian_workdir', required=True)
    p.add_argument('--feature_net_dir', required=True)
    p.add_argument('--cold_mask_workdir', default='')
    p.add_argument('--jump_length', type=int, default=10)
    p.add_argument('--jump_n_sample', type=int, default=10)
    p.add_argument('--strengths', default='0.2,0.4,0.6,0.8')
    p.add_argument('--noise_std', type=float, default=1.0, help='sdedit input corruption')
    p.add_argument('--out', default='experiments/results/edit_digits.json')
    args = p.parse_args(argv)
    fnet, fparams, _ = feature_net.load_feature_net(args.feature_net_dir)
    acc = lambda x: feature_net.accuracy(fnet, fparams, image_utils.to_uint8(x), labels)  # noqa

    loaded = run_lib.load(args.gaussian_workdir)
    test = input_pipeline.get_dataset(loaded.config.data, 'test')
    batch = test.get(np.arange(len(test)))
    x0, labels = jnp.asarray(batch['image']), np.asarray(batch['label'])
    model_fn = guidance.bind_model(loaded.model.apply, loaded.variables)
    d = loaded.diffusion
    results = dict(num_images=int(len(labels)), clean=acc(x0))
    mask = jnp.asarray(samplers.make_mask('right_half', x0.shape))
    results['masked_input_floor'] = acc(mask * x0)  # 0 = mid-grey in [-1, 1]
    for name, (j, r) in (('repaint_plain', (1, 1)),
                         ('repaint_resampled', (args.jump_length, args.jump_n_sample))):
        t0 = time.time()
        out = samplers.repaint(d, model_fn, jax.random.key(0), x0, mask, jump_length=j,
                               jump_n_sample=r)
        results[name] = acc(out)
        results[name + '_seconds'] = time.time() - t0
        print(name, results[name], f'{time.time() - t0:.0f}s', flush=True)
    noisy = jnp.clip(x0 + args.noise_std * jax.random.normal(jax.random.key(1), x0.shape), -1, 1)
    results['noisy_input_floor'] = acc(noisy)
    results['sdedit'] = {}
    for s in [float(v) for v in args.strengths.split(',')]:
        out = samplers.sdedit(d, model_fn, jax.random.key(2), noisy, s)
        results['sdedit'][str(s)] = dict(accuracy=acc(out),
                                         rms_to_clean=float(jnp.sqrt(jnp.mean((out - x0)**2))))
        print('sdedit', s, results['sdedit'][str(s)], flush=True)
    if args.cold_mask_workdir:
        cold_run = run_lib.load(args.cold_mask_workdir)
        c = cold_run.diffusion
        x_T = c.degrade(x0, jnp.full((x0.shape[0],), c.num_timesteps))
        fn = guidance.bind_model(cold_run.model.apply, cold_run.variables)
        results['cold_mask_degraded_floor'] = acc(x_T)
        for method in ('cold', 'cold_naive'):
            results[f'cold_mask_{method}'] = acc(samplers.cold_restore(c, fn, x_T, method=method))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == '__main__':
    main()
