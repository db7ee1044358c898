"""DDIM Table 1 (Song et al. 2021): FID against sampling steps S and stochasticity η, on digits.

    python experiments/ddim_table.py --workdir=runs/exp_ddim_table [--scale=cpu|full]
        [--model_workdir=runs/exp_digits_model]

Rows: η ∈ {0, 0.2, 0.5, 1} (DDIM's generalised sampler, σ_t = η·√β̃_t over the respaced steps) and
σ̂ (the ancestral sampler with the larger variance β_t of the respaced schedule: method='ancestral',
model_var_type='fixed_large', as DDIM's "σ̂" row). Columns: S steps with DDIM's stride
(num_steps='ddimS'). The digits model has T = 200, so the paper's S = 1000 column becomes S = 200
(= T, no respacing). Cells not computed within --budget_s are written as 'skipped'. A subset of
the grid: --steps=200 --etas= --sigma_hat (only the σ̂ cell at S = 200), into another --workdir.

Outputs: ddim_fid.{md,csv} (FID grid), ddim_all.csv (every metric), results.json, ddim_fid.png.
Feature-net FID on digits — not comparable with the paper's CIFAR-10 Inception FIDs.
"""
from __future__ import annotations

import os
import time

from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_ddim_table', 'Where the table and figure go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: N=500 samples per cell; full: N=10,000.')
flags.DEFINE_string('model_workdir', C.DEFAULT_MODEL_WORKDIR, 'The trained default digits run.')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_list('steps', ['10', '20', '50', '100', '200'], 'S values (≤ T = 200).')
flags.DEFINE_integer('num_samples', 0, 'Samples per cell; 0: the scale default.')
flags.DEFINE_list('etas', ['0', '0.2', '0.5', '1'], 'The η rows (DDIM).')
flags.DEFINE_bool('sigma_hat', True, 'Include the σ̂ row (ancestral sampler with β_t).')
flags.DEFINE_float('budget_s', 0, 'Skip the remaining cells once this many seconds passed (0: none).')

SCALES = {'cpu': 500, 'full': 10_000}


SIGMA_HAT = 'sigma_hat (ancestral, β_t)'


def requested_rows():
    """[(row name, η or None for σ̂)] of the requested rows."""
    etas = [float(e) for e in FLAGS.etas]
    return [(f'eta={e:g}', e) for e in etas] + ([(SIGMA_HAT, None)] if FLAGS.sigma_hat else [])


def row_names():
    return [name for name, _ in requested_rows()]


def main(_):
    out = FLAGS.workdir
    os.makedirs(out, exist_ok=True)
    n = FLAGS.num_samples or SCALES[FLAGS.scale]
    config = C.digits_config()
    C.ensure_trained(config, FLAGS.model_workdir)
    scorer = C.SampleScorer(config, FLAGS.model_workdir, FLAGS.feature_net_dir,
                            os.path.join(FLAGS.feature_net_dir, 'reference'))
    steps = [int(s) for s in FLAGS.steps]
    grid = {r: {} for r in row_names()}
    everything, skipped = [], []
    start = time.time()
    # Cheap columns first, so a budget cuts the expensive S = T cells.
    for s in sorted(steps):
        for name, eta in requested_rows():
            if FLAGS.budget_s and time.time() - start > FLAGS.budget_s:
                grid[name][s] = 'skipped'
                skipped.append((name, s))
                continue
            sampling = dict(num_steps=f'ddim{s}' if s < config.diffusion.num_timesteps else '',
                            seed=0)
            if eta is None:
                sampling.update(method='ancestral')  # fixed_large: σ² = β_t of the respaced chain
            else:
                sampling.update(method='ddim', eta=eta)
            r = scorer.score(n, **sampling)
            grid[name][s] = r['fid']
            everything.append(dict(sampler=name, S=s, **r))
            logging.info('S=%d %s: %s', s, name, r)
            rows = [dict(sampler=k, **{f'S={s2}': grid[k].get(s2, '') for s2 in steps})
                    for k in row_names()]
            C.write_table(out, 'ddim_fid', rows, ['sampler'] + [f'S={s2}' for s2 in steps], header=(
                f'DDIM Table 1 protocol on digits, SCALED DOWN: feature-net FID (lower is better) '
                f'of {n} samples per cell vs the train split; T = {config.diffusion.num_timesteps} '
                f'so S = {config.diffusion.num_timesteps} is the full chain.'))
            C.write_table(out, 'ddim_all', everything, ['sampler', 'S', 'fid', 'inception_score',
                                                        'precision', 'recall', 'num_samples',
                                                        'sample_seconds'])
            C.write_json(out, 'results.json', dict(num_samples=n, grid=grid, cells=everything,
                                                   skipped=skipped, device=C.device_note(),
                                                   seconds=time.time() - start))
    plot(out, grid, steps)


def plot(out, grid, steps):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, cells in grid.items():
        xs = [s for s in steps if isinstance(cells.get(s), float)]
        ax.plot(xs, [cells[s] for s in xs], marker='o', label=name)
    ax.set_xscale('log')
    ax.set_xlabel('sampling steps S')
    ax.set_ylabel('feature-net FID (digits)')
    ax.set_title('DDIM Table 1 protocol, digits (scaled down)', fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'ddim_fid.png'))


if __name__ == '__main__':
    app.run(main)
