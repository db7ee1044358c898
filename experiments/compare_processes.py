"""Processes compared on the digits (issue 19): FID against network calls, and the ODE NLL.

    nice -n 10 python experiments/compare_processes.py --workdir=runs/exp_compare_processes \
        [--runs_root=runs] [--eps_workdir=runs/digits] [--cond_workdir=runs/digits_cond] \
        [--stage=all|train|fid|nll|table] [--rows=...] [--calls=5,10,20,50]

Rows (each trained here for configs/digits.py's 1,500 steps, same UNet, batch, optimiser, EMA):
  eps_ddpm      configs/digits.py: ε-prediction, L_simple, T = 200 (Ho et al. 2020)
                (--eps_workdir: reuse an identical configs/digits.py run, read only)
  v_minsnr      the same chain with v-prediction and min-SNR-γ = 5 (Hang et al. 2023)
  flow_uniform  configs/digits_flow.py with t ~ U(0, 1)
  flow_lognorm  configs/digits_flow.py (SD3's logit-normal t, m = 0, s = 1)
  edm           configs/digits_edm.py (Karras et al. 2022, Table 1)
  flow_lognorm_selfcond  flow_lognorm with training.self_condition=True (Chen et al. 2022)
  cond_cfg_w<w> / cond_cfg_w<w>_interval  the class-conditional ε-DDPM run --cond_workdir,
                classifier-free guidance at --cfg_scale without and with --guidance_interval
                (Kynkäänniemi et al. 2024; σ = √((1-ᾱ)/ᾱ))

Cells: feature-net FID (diffusion_jax.evaluation.feature_net, N = --num_samples against the
train split, the same x_T seeds everywhere: sampling.seed = 0) at each number of network calls,
the best of the row's candidate solvers (SOLVERS; Heun costs 2K - 1 calls, so it gets the largest
K with 2K - 1 <= calls, and is tried at --heun_calls only); each cell names its solver and K.
Gaussian rows run over 'linspaceK' respaced steps, flow over uniform t, EDM over its ρ = 7 grid.
ODE NLL: bits/dim of the first --nll_batches batches of 128 held-out test digits through each
process's probability-flow ODE (eval.nll_estimator='ode': dopri5, rtol = atol = 1e-5, one
Rademacher probe, uniform dequantisation x + u/128, u ~ U(0, 1)^D on the 256-level grid).

Outputs in --workdir: rows/<row>.json (every cell) and rows/<row>.nll.json, one file per row
and part, so separate processes can score rows and NLLs at once and a re-run resumes;
compare_fid.{md,csv} (the table) and compare_all.csv (every solver x calls cell). Feature-net
FID on 8x8 digits is NOT comparable with the papers' CIFAR-10 Inception FIDs.
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags, logging

import exp_common as C

from diffusion_jax import samplers  # noqa: E402  (exp_common puts the repository on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_compare_processes', 'Where the tables go.')
flags.DEFINE_string('runs_root', 'runs', 'Trained runs go to <runs_root>/compare_<row>.')
flags.DEFINE_string('eps_workdir', '', 'An existing configs/digits.py run at 1,500 steps to '
                    'reuse (read only) for the eps_ddpm row; empty: train one.')
flags.DEFINE_string('cond_workdir', '', 'A class-conditional digits run (model.num_classes=10, '
                    'training.label_dropout=0.1) for the guidance rows; empty: skip them.')
flags.DEFINE_float('cfg_scale', 1.0, 'CFG weight w of the guidance rows (w = 0: no guidance).')
flags.DEFINE_string('guidance_interval', '0.28,5.0', "sampling.guidance_interval 'lo,hi' (σ units).")
flags.DEFINE_enum('stage', 'all', ['train', 'fid', 'nll', 'table', 'all'],
                  'train: only train the rows; fid / nll: only score (FID cells / ODE NLL; '
                  "--rows' trained runs); table: only write the tables from out/rows/*.json; "
                  'all: train, FID, NLL, tables.')
flags.DEFINE_list('rows', ['eps_ddpm', 'v_minsnr', 'flow_uniform', 'flow_lognorm', 'edm',
                           'flow_lognorm_selfcond'], 'Rows to train / score.')
flags.DEFINE_list('calls', ['5', '10', '20', '50'], 'Network-call columns.')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_integer('num_samples', 1000, 'Samples per cell.')
flags.DEFINE_bool('nll', True, 'Also the ODE NLL of the test split.')
flags.DEFINE_float('budget_s', 0, 'Skip the largest calls column of a row once this many '
                   'seconds passed (0: none).')
flags.DEFINE_integer('batch_size', 250, 'Sampler batch.')
flags.DEFINE_integer('nll_batches', 0, 'eval.num_batches of the NLL (0: all 359 test digits).')
flags.DEFINE_list('guide_solvers', ['dpmpp_2m'], 'Solvers of the guidance rows.')
flags.DEFINE_list('heun_calls', ['20', '50'], 'The calls columns Heun is tried at (at 5 calls '
                  'its K = 3 steps are far behind: FID 57 on the VP digits model, section 6).')
flags.DEFINE_list('guide_calls', ['10', '20'], 'The calls columns of the guidance rows.')


def row_config(row: str):
    """The config of a table row: the digits default, or its flow/EDM sibling, with overrides."""
    from configs import digits, digits_edm, digits_flow  # pylint: disable=import-outside-toplevel
    if row in ('eps_ddpm', 'v_minsnr'):
        config = digits.get_config()
    elif row.startswith('flow'):
        config = digits_flow.get_config()
    elif row == 'edm':
        config = digits_edm.get_config()
    else:
        raise ValueError(f'unknown row {row!r}')
    with config.unlocked():
        if row == 'v_minsnr':
            config.diffusion.model_mean_type = 'v'
            config.diffusion.loss_weighting = 'min_snr'
            config.diffusion.min_snr_gamma = 5.0  # Hang et al. 2023, Sec. 4
        if row == 'flow_uniform':
            config.diffusion.flow.time_sampling = 'uniform'
        if row.endswith('selfcond'):
            config.training.self_condition = True
            # [x_t, x̂_0] in: set here, as the file's in_channels is not re-derived (it was not
            # typed on a command line; config_validation refuses the mismatch).
            config.model.in_channels = 2 * config.data.channels
        config.name = f'compare_{row}'
    return config


def row_workdir(row: str) -> str:
    if row == 'eps_ddpm' and FLAGS.eps_workdir:
        return FLAGS.eps_workdir
    return os.path.join(FLAGS.runs_root, f'compare_{row}')


def train_rows() -> dict:
    seconds = {}
    for row in FLAGS.rows:
        config = row_config(row)
        workdir = row_workdir(row)
        logging.info('row %s: %s', row, workdir)
        seconds[row] = round(C.ensure_trained(config, workdir), 1)
        logging.info('row %s trained in %.0f s', row, seconds[row])
    return seconds


# The candidates for "each process's best solver": DPM-Solver++(2M) and EDM's Heun, the two
# best on the digits VP model from 10 to 50 calls (experiments/README.md, section 6: unipc and
# dpmpp_3m within N = 500 noise of dpmpp_2m, ddim far behind); flow/EDM's Euler is DDIM there.
# Two, not more, to fit 1,000 samples per cell on the shared 2-core CPU.
SOLVERS = {'gaussian': ('dpmpp_2m', 'heun'), 'flow': ('dpmpp_2m', 'heun'),
           'edm': ('dpmpp_2m', 'heun')}
SPACING = 'linspace'  # gaussian rows: both ends of the T = 200 chain kept (solver_table.py's)


def steps_for(method: str, calls: int) -> int:
    """The largest K whose chain costs at most `calls` network evaluations (Heun: 2K - 1)."""
    k = 1
    while samplers.nfe(method, k + 1) <= calls:
        k += 1
    return k


def sampling_for(config, method: str, k: int) -> dict:
    out = dict(method=method, seed=0)  # clip_denoised: the config's (gaussian: on; flow/EDM: off)
    if config.diffusion.get('process', 'gaussian') == 'gaussian':
        t_steps = config.diffusion.num_timesteps
        out['num_steps'] = '' if k >= t_steps else f'{SPACING}{k}'
        out['eta'] = 0.0
    else:
        out['num_steps'] = str(k)
    return out


def guidance_rows():
    """(row name, sampling overrides) of the class-conditional run: CFG without / with the
    interval (sampling.guidance_interval; σ = √((1-ᾱ)/ᾱ) of the VP chain)."""
    if not FLAGS.cond_workdir:
        return []
    cfg = dict(guidance_scale=FLAGS.cfg_scale)
    return [(f'cond_cfg_w{FLAGS.cfg_scale:g}', dict(cfg, guidance_interval='')),
            (f'cond_cfg_w{FLAGS.cfg_scale:g}_interval',
             dict(cfg, guidance_interval=FLAGS.guidance_interval))]


def _row_path(out: str, row: str) -> str:
    return os.path.join(out, 'rows', f'{row}.json')


def load_row(out: str, row: str) -> dict | None:
    """One row's cells (out/rows/<row>.json) and ODE NLL (out/rows/<row>.nll.json): files per
    row and per part, so that several processes can score different rows and parts at once,
    and a re-run resumes where one stopped."""
    path = _row_path(out, row)
    entry = None
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            entry = json.load(f)
    if os.path.exists(path[:-len('.json')] + '.nll.json'):
        with open(path[:-len('.json')] + '.nll.json', encoding='utf-8') as f:
            nll = json.load(f)
        entry = dict(entry or dict(workdir=nll['workdir'], process=nll['process'], cells=[]),
                     nll=nll['nll'])
    return entry


def save_row(out: str, row: str, entry: dict) -> None:
    C.write_json(os.path.join(out, 'rows'), f'{row}.json',
                 {k: v for k, v in entry.items() if k != 'nll'})


def score_row(out, row, config, workdir, extra=None, solvers=None, nll_only=False, calls=None):
    """Every (solver, calls) cell of one row at N = --num_samples (Heun only at --heun_calls),
    then its ODE NLL; what out/rows/<row>.json already holds is kept."""
    process = config.diffusion.get('process', 'gaussian')
    entry = load_row(out, row) or dict(workdir=workdir, process=process, cells=[])
    done = {(c['solver'], c['calls']) for c in entry['cells']}
    scorer = None
    start = time.time()
    calls_list = sorted(int(v) for v in (calls or FLAGS.calls))
    for calls in calls_list if not nll_only else ():
        if FLAGS.budget_s and calls == max(calls_list) and time.time() - START > FLAGS.budget_s:
            entry.setdefault('skipped', []).append(calls)
            logging.info('row %s: %d calls skipped (budget)', row, calls)
            continue
        for method in solvers or SOLVERS[process]:
            if (method, calls) in done or (method == 'heun' and
                                           str(calls) not in FLAGS.heun_calls):
                continue
            if scorer is None:
                scorer = C.SampleScorer(config, workdir, FLAGS.feature_net_dir,
                                        os.path.join(out, 'reference'))
            k = steps_for(method, calls)
            sampling = dict(sampling_for(scorer.config, method, k), **(extra or {}))
            r = scorer.score(FLAGS.num_samples, batch_size=FLAGS.batch_size, **sampling)
            cell = dict(solver=method, calls=calls, K=k, nfe=samplers.nfe(method, k),
                        num_steps=sampling['num_steps'], **r)
            logging.info('row %s: %s', row, cell)
            entry['cells'].append(cell)
            save_row(out, row, entry)
    if not nll_only:
        entry['score_seconds'] = round(entry.get('score_seconds', 0) + time.time() - start, 1)
        save_row(out, row, entry)
    if FLAGS.nll and not extra and (nll_only or FLAGS.stage != 'fid') and 'nll' not in entry:
        nll_config = config.copy_and_resolve_references()
        with nll_config.unlocked():
            nll_config.eval.num_batches = FLAGS.nll_batches
            nll_config.eval.ode_dequantization = 'uniform'
        nll, seconds = C.test_nll(nll_config, workdir, estimator='ode')
        nll = dict(nll, seconds=round(seconds, 1))
        C.write_json(os.path.join(out, 'rows'), f'{row}.nll.json',
                     dict(workdir=workdir, process=process, nll=nll))
        logging.info('row %s: NLL %s', row, nll)


def best_cells(entry) -> dict:
    """calls -> the cell with the lowest finite FID among the row's solvers."""
    best = {}
    for c in entry['cells']:
        fid = c.get('fid')
        if fid is None or not math.isfinite(float(fid)):
            continue
        if c['calls'] not in best or fid < best[c['calls']]['fid']:
            best[c['calls']] = c
    return best


def write_tables(out, rows):
    calls_list = sorted(int(v) for v in FLAGS.calls)
    table, every = [], []
    for row in rows:
        entry = load_row(out, row)
        if entry is None:
            continue
        best = best_cells(entry)
        line = dict(row=row, process=entry['process'])
        for calls in calls_list:
            c = best.get(calls)
            if c is None:  # not run (a budget, or not in this row's --calls)
                line[f'{calls} calls'] = '—'
            else:
                line[f'{calls} calls'] = f"{c['fid']:.2f} ({c['solver']}, K={c['K']})"
        line['ODE NLL (bits/dim)'] = _nll_text(entry['nll']) if entry.get('nll') else '—'
        table.append(line)
        every += [dict(row=row, **c) for c in entry['cells']]
    columns = ['row', 'process'] + [f'{c} calls' for c in calls_list] + ['ODE NLL (bits/dim)']
    md = C.write_table(out, 'compare_fid', table, columns, header=(
        f'Feature-net FID (lower is better) of {FLAGS.num_samples} samples per cell against the '
        'digits train split, the same x_T seeds (sampling.seed = 0) in every cell, each cell the '
        'best of the row\'s solvers at that many network calls (solver, K steps; Heun: 2K - 1 '
        'calls). ODE NLL: bits/dim of the held-out test digits, uniform dequantisation. '
        f'Machine: {C.device_note()}.'))
    C.write_table(out, 'compare_all', every, ['row', 'solver', 'calls', 'K', 'nfe', 'num_steps',
                                              'fid', 'inception_score', 'precision', 'recall',
                                              'num_samples', 'sample_seconds'])
    return md


def _nll_text(nll) -> str:
    return f"{nll['total_bpd']:.3f} ± {nll['total_bpd_stderr']:.3f} (N = {nll['num_images']})"


START = time.time()


def main(_):
    out = FLAGS.workdir
    os.makedirs(out, exist_ok=True)
    if FLAGS.stage in ('train', 'all'):
        train_seconds = train_rows()
        C.write_json(out, f'train_seconds_{"_".join(FLAGS.rows)}.json', train_seconds)
    if FLAGS.stage == 'train':
        return
    rows = list(FLAGS.rows) + [name for name, _ in guidance_rows()]
    if FLAGS.stage in ('all', 'fid', 'nll'):
        C.ensure_feature_net(FLAGS.feature_net_dir)
        for row in FLAGS.rows:
            score_row(out, row, row_config(row), row_workdir(row), nll_only=FLAGS.stage == 'nll')
        if FLAGS.cond_workdir and FLAGS.stage != 'nll':
            from diffusion_jax import run as run_lib  # pylint: disable=import-outside-toplevel
            cond_config = run_lib.get_config(FLAGS.cond_workdir)
            for row, extra in guidance_rows():
                score_row(out, row, cond_config, FLAGS.cond_workdir, extra=extra,
                          solvers=FLAGS.guide_solvers, calls=FLAGS.guide_calls)
    print(write_tables(out, rows))


if __name__ == '__main__':
    app.run(main)
