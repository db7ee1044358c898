"""The swiss roll of Sohl-Dickstein et al. 2015 (their Fig. 1; the survey's Fig. 3).

    python experiments/swissroll.py --workdir=runs/exp_swissroll [--scale=cpu|full]

Trains configs/swissroll.py (T = 100, an MLP, < 1 min on a CPU; reused if already trained in
<workdir>/model), then draws two rows of scatter panels at t = 0, 1, 2, T/20, T/10, T-1:
  top:    the forward process, samples of q(x_t | x_0) for test points x_0 (DDPM eq. 4);
  bottom: the learned reverse chain from x_T ~ N(0, I), the same particles shown at the same t
          (samplers.reverse_from run segment by segment, so every panel is one trajectory).
Plus the closeness of the samples to the roll: mean distance of each generated point to its nearest
test point, against the same number for a second set of real test points (the data's own spread).

Outputs: swissroll_trajectories.png, swissroll.{md,csv}, results.json, model/ (the trained run).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_swissroll', 'Where the run, table and figure go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: 1,000 particles; full: 5,000.')

SCALES = {'cpu': 1000, 'full': 5000}


def nearest_distances(a, b):
    """For each point of a, the distance to the nearest point of b: [len(a)]."""
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d2.min(1))


def nearest_distance(a, b):
    """Mean over a of the distance to the nearest point of b."""
    return float(nearest_distances(a, b).mean())


def main(_):
    from configs import swissroll  # pylint: disable=import-outside-toplevel
    from diffusion_jax import guidance, input_pipeline, run, samplers  # pylint: disable=import-outside-toplevel
    out, n = FLAGS.workdir, SCALES[FLAGS.scale]
    config = swissroll.get_config()
    model_dir = os.path.join(out, 'model')
    t_train = C.ensure_trained(config, model_dir)
    loaded = run.load(model_dir, use_ema=True)
    variables, step, model, diffusion = (loaded.variables, loaded.step, loaded.model,
                                         loaded.diffusion)
    model_fn = guidance.bind_model(model.apply, variables)
    T = diffusion.num_timesteps
    # The roll's arms lie ~0.15 apart and √(1-ᾱ_t) is already 0.19 at t = 5 (T = 100, linear):
    # the structure dissolves in the first few steps, so those are the steps shown.
    ts = [0, 1, 2, T // 20, T // 10, T - 1]

    test = _points(input_pipeline, input_pipeline.get_dataset(config.data, 'test'))
    x0 = test[:n]
    key = jax.random.key(0)
    forward = []
    for i, t in enumerate(ts):
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        forward.append(np.asarray(diffusion.q_sample(x0, np.full((len(x0),), t), noise)))

    start = time.time()
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 99), x0.shape))
    reverse = {T - 1: x}
    level = T - 1
    for j, t in enumerate(sorted(ts[:-1], reverse=True)):
        # reverse_from runs steps level, level-1, …, stop; stop = t + 1 leaves x_t.
        x = np.asarray(samplers.reverse_from(diffusion, model_fn, jax.random.fold_in(key, 100 + j),
                                             x, level, stop=t + 1))
        reverse[t] = x
        level = t
    t_sample = time.time() - start

    spread = nearest_distance(test[n:2 * n], x0)
    dist = nearest_distance(reverse[0], x0)
    # The fraction within 0.05 of the roll (here: of a test point), the measure configs/swissroll.py
    # quotes for its choice of T.
    within = float((nearest_distances(reverse[0], x0) < 0.05).mean())
    within_real = float((nearest_distances(test[n:2 * n], x0) < 0.05).mean())
    row = dict(particles=n, train_steps=config.training.num_train_steps, T=T,
               mean_nn_dist_samples=dist, mean_nn_dist_real_heldout=spread,
               frac_within_0p05_samples=within, frac_within_0p05_real_heldout=within_real,
               train_s=round(t_train, 1), sample_s=round(t_sample, 1))
    md = C.write_table(out, 'swissroll', [row], list(row), header=(
        'Swiss roll (Sohl-Dickstein et al. 2015 setting; our T=100 MLP, SCALED DOWN): mean '
        'distance of each point to its nearest test point, generated vs held-out real points.'))
    logging.info('\n%s', md)
    C.write_json(out, 'results.json', dict(row=row, ts=ts, step=step, device=C.device_note()))
    plot(os.path.join(out, 'swissroll_trajectories.png'), ts, forward, [reverse[t] for t in ts])


def _points(input_pipeline, ds):
    batches = [b['image'][b['mask']] for b in input_pipeline.eval_iterator(ds, 500)]
    return np.concatenate(batches).astype(np.float32)


def plot(path, ts, forward, reverse):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(2, len(ts), figsize=(2.0 * len(ts), 4.3), dpi=90)
    for row, (name, pts) in enumerate((('q(x_t | x_0)', forward), ('p_θ reverse', reverse))):
        for col, (t, p) in enumerate(zip(ts, pts)):
            ax = axes[row, col]
            ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-2.5, 2.5)
            ax.set_ylim(-2.5, 2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f'{name}, t={t}', fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    app.run(main)
