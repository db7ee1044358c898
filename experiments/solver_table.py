"""Fast solvers on one trained digits model: feature-net FID against the number of network
evaluations (NFE), and the probability-flow ODE likelihood next to the variational bound.

    python experiments/solver_table.py --workdir=runs/exp_solver_table [--scale=cpu|full]
        [--model_workdir=runs/exp_digits_model] [--spacing=linspace] [--budget_s=0]

Rows: ddim (η = 0), dpmpp_2m, dpmpp_3m, unipc, heun (diffusion_jax.samplers), every one over the
same respaced steps (--spacing, default 'linspace': both ends of the chain kept, DPM-Solver's
"time-uniform" steps), the same x_T seeds (sampling.seed = 0) and the same number of samples.
Columns: NFE ∈ {5, 10, 20, 50}. The K-step methods use K = NFE steps; heun costs 2K - 1, so it
gets the largest K with 2K - 1 ≤ NFE (its NFE is printed in the long table). An extra row, ddim
with DDIM's own stride ('ddimK', as experiments/ddim_table.py), ties the table to that one.
Spacing study: dpmpp_2m and heun at NFE = 10 under every spacing of diffusion_jax.respace.

NLL: the full T-term bound (eval.nll_estimator='full') and the probability-flow ODE likelihood
(eval.nll_estimator='ode': dopri5, rtol = atol = 1e-5, Rademacher probe, uniform dequantisation),
both in bits/dim on the 359 test digits.

Outputs: solver_fid.{md,csv} (FID grid), solver_all.csv (every metric), solver_spacing.{md,csv},
solver_nll.{md,csv}, results.json. Feature-net FID on 8x8 digits: NOT comparable with the papers'
CIFAR-10 Inception FIDs, which the markdown quotes for orientation only.
"""
from __future__ import annotations

import os
import time

from absl import app, flags, logging

import exp_common as C

from diffusion_jax import samplers  # noqa: E402  (exp_common puts the repository on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_solver_table', 'Where the tables go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: N=500 samples per cell; full: N=10,000.')
flags.DEFINE_string('model_workdir', C.DEFAULT_MODEL_WORKDIR, 'The trained default digits run.')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_list('nfes', ['5', '10', '20', '50'], 'NFE columns.')
flags.DEFINE_list('methods', ['ddim', 'dpmpp_2m', 'dpmpp_3m', 'unipc', 'heun'], 'Rows.')
flags.DEFINE_string('spacing', 'linspace', 'Spacing prefix of sampling.num_steps for every row.')
flags.DEFINE_bool('ddim_stride_row', True, "Add ddim over DDIM's own 'ddimK' stride.")
flags.DEFINE_list('spacing_study', ['linspace', 'trailing', 'ddim', 'logsnr', 'karras'],
                  'Spacings for the NFE = 10 study of dpmpp_2m and heun (empty: skip).')
flags.DEFINE_bool('nll', True, 'Also the bound and the ODE likelihood of the test split.')
flags.DEFINE_integer('num_samples', 0, 'Samples per cell; 0: the scale default.')
flags.DEFINE_float('budget_s', 0, 'Skip the remaining cells once this many seconds passed (0: none).')

SCALES = {'cpu': 500, 'full': 10_000}
# Published CIFAR-10 figures (50k samples, Inception FID, other models): orientation only.
PUBLISHED = (
    'Published, NOT comparable (CIFAR-10 32x32, Inception FID, their own continuous-time '
    'score-based models): DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion '
    'Probabilistic Model Sampling in Around 10 Steps", NeurIPS 2022, arXiv:2206.00927, abstract) '
    'FID 4.70 at NFE = 10 and 2.87 at NFE = 20; UniPC (Zhao et al. 2023, "UniPC: A '
    'Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", '
    'arXiv:2302.04867, abstract) FID 3.87 at NFE = 10 (unconditional CIFAR-10).')


def steps_for(method: str, nfe: int) -> int:
    """The largest K whose chain costs at most `nfe` network evaluations."""
    k = 1
    while samplers.nfe(method, k + 1) <= nfe:
        k += 1
    return k


def sampling_for(method: str, spacing: str, k: int, num_timesteps: int) -> dict:
    num_steps = '' if k >= num_timesteps else f'{spacing}{k}'
    out = dict(method=method, num_steps=num_steps, seed=0)
    if method == 'ddim':
        out['eta'] = 0.0
    return out


def main(_):
    out = FLAGS.workdir
    os.makedirs(out, exist_ok=True)
    n = FLAGS.num_samples or SCALES[FLAGS.scale]
    config = C.digits_config()
    C.ensure_trained(config, FLAGS.model_workdir)
    t_steps = config.diffusion.num_timesteps
    unknown = [m for m in FLAGS.methods if m not in samplers.METHODS]
    if unknown:
        raise ValueError(f'--methods: unknown {unknown}; registered: {", ".join(samplers.METHODS)}.')
    scorer = C.SampleScorer(config, FLAGS.model_workdir, FLAGS.feature_net_dir,
                            os.path.join(FLAGS.feature_net_dir, 'reference'))
    nfes = [int(v) for v in FLAGS.nfes]
    rows = [(m, m, FLAGS.spacing) for m in FLAGS.methods]
    if FLAGS.ddim_stride_row:
        rows.append(('ddim (ddimK stride)', 'ddim', 'ddim'))
    grid = {name: {} for name, _, _ in rows}
    cells, skipped, start = [], [], time.time()
    results = dict(num_samples=n, spacing=FLAGS.spacing, device=C.device_note())

    def over_budget():
        return FLAGS.budget_s and time.time() - start > FLAGS.budget_s

    def score(row, method, spacing, nfe):
        k = steps_for(method, nfe)
        sampling = sampling_for(method, spacing, k, t_steps)
        r = scorer.score(n, **sampling)
        cell = dict(sampler=row, spacing=spacing, nfe_target=nfe, K=k,
                    nfe=samplers.nfe(method, k), num_steps=sampling['num_steps'], **r)
        logging.info('%s', cell)
        return cell

    def write_grid():
        table = [dict(sampler=k, **{f'NFE={v}': grid[k].get(v, '') for v in nfes}) for k in grid]
        C.write_table(out, 'solver_fid', table, ['sampler'] + [f'NFE={v}' for v in nfes], header=(
            f'Feature-net FID (lower is better) of {n} samples per cell against the digits train '
            f'split, one trained model (T = {t_steps}), the same x_T seeds in every cell; steps '
            f"'{FLAGS.spacing}K' (heun: 2K - 1 ≤ NFE). SCALED DOWN: digits 8x8, not CIFAR-10.\n\n"
            + PUBLISHED))
        C.write_table(out, 'solver_all', cells, ['sampler', 'spacing', 'nfe_target', 'K', 'nfe',
                                                 'num_steps', 'fid', 'inception_score',
                                                 'precision', 'recall', 'num_samples',
                                                 'sample_seconds'])
        C.write_json(out, 'results.json', dict(results, grid=grid, cells=cells, skipped=skipped,
                                               seconds=time.time() - start))

    for nfe in sorted(nfes):  # cheap columns first, so a budget cuts the expensive ones
        for row, method, spacing in rows:
            if over_budget():
                grid[row][nfe] = 'skipped'
                skipped.append((row, nfe))
                continue
            cell = score(row, method, spacing, nfe)
            grid[row][nfe] = cell['fid']
            cells.append(cell)
            write_grid()
    study = []
    for method in ('dpmpp_2m', 'heun') if FLAGS.spacing_study else ():
        for spacing in FLAGS.spacing_study:
            if over_budget():
                skipped.append((method, spacing))
                continue
            cell = next((c for c in cells if c['sampler'] == method and c['spacing'] == spacing
                         and c['nfe_target'] == 10), None) or score(method, method, spacing, 10)
            study.append(cell)
            C.write_table(out, 'solver_spacing', study, ['sampler', 'spacing', 'K', 'nfe',
                                                         'num_steps', 'fid', 'precision',
                                                         'recall'], header=(
                f'Spacing study at NFE = 10 ({n} samples per cell, feature-net FID): the steps '
                'of diffusion_jax.respace.space_timesteps.'))
    results['spacing_study'] = study
    write_grid()
    if FLAGS.nll:
        nll_rows = []
        for estimator in ('full', 'ode'):
            r, seconds = C.test_nll(config, FLAGS.model_workdir, estimator)
            row = dict(estimator=estimator, total_bpd=r['total_bpd'],
                       stderr=r['total_bpd_stderr'], num_images=r['num_images'],
                       nfe_per_image=(t_steps if estimator == 'full' else r['nfe_mean']),
                       seconds=round(seconds, 1))
            nll_rows.append(row)
            results[f'nll_{estimator}'] = r
            C.write_table(out, 'solver_nll', nll_rows, ['estimator', 'total_bpd', 'stderr',
                                                        'num_images', 'nfe_per_image', 'seconds'],
                          header=('Test-split bits/dim of the same model: the variational bound '
                                  "(all T terms) and the probability-flow ODE likelihood "
                                  '(dopri5, rtol = atol = 1e-5, Rademacher, uniform '
                                  'dequantisation; nfe = ODE evaluations per batch, each a '
                                  'forward + a forward-mode pass).'))
            write_grid()


if __name__ == '__main__':
    app.run(main)
