"""DDPM Tables 1 and 2 (Ho et al. 2020), protocol on the embedded digits, scaled for a CPU.

    python experiments/ddpm_table.py --workdir=runs/exp_ddpm_table [--scale=cpu|full]
        [--model_workdir=runs/exp_digits_model]

Table 1 protocol: the default configs/digits.py run (trained here unless --model_workdir already
holds its final checkpoint): test NLL with the full T-step bound (L_T, Σ L_t, L_0 reported
separately) and feature-net FID / IS / precision / recall of N ancestral samples against the train
split. Table 2 ("L_simple vs the true bound"): two shorter runs with the same steps, one with
loss_type='mse' (L_simple) and one with loss_type='kl' (the true variational bound), both with the
fixed variance σ² = β_t; their test NLL and FID.

Outputs in --workdir: table1.{md,csv}, table2.{md,csv}, results.json, samples_*.png.
The numbers are digits numbers with a small classifier's features — not comparable with the
papers' CIFAR-10 Inception numbers.
"""
from __future__ import annotations

import os
import time

from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_ddpm_table', 'Where tables, figures and the short runs go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: the scaled-down sizes; full: larger N.')
flags.DEFINE_string('model_workdir', C.DEFAULT_MODEL_WORKDIR,
                    'The default digits run (trained here if it lacks its final checkpoint).')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')

# (samples for the main model's FID, steps of the Table 2 runs, samples for their FID)
SCALES = {'cpu': dict(num_samples=1000, short_steps=600, short_samples=500),
          'full': dict(num_samples=10_000, short_steps=1500, short_samples=5000)}


def nll_row(name, nll, extra=None):
    row = dict(run=name, nll_total=nll['total_bpd'], nll_stderr=nll['total_bpd_stderr'],
               L_T_prior=nll['prior_bpd'], sum_L_t=nll['kl_sum_bpd'], L_0_decoder=nll['decoder_bpd'])
    row.update(extra or {})
    return row


def main(_):
    sc = SCALES[FLAGS.scale]
    out = FLAGS.workdir
    os.makedirs(out, exist_ok=True)
    ref_dir = os.path.join(FLAGS.feature_net_dir, 'reference')
    results = dict(scale=FLAGS.scale, device=C.device_note(), sizes=sc)

    # ---- Table 1 protocol: the default run.
    config = C.digits_config()
    t_train = C.ensure_trained(config, FLAGS.model_workdir)
    nll, t_nll = C.test_nll(config, FLAGS.model_workdir)
    scorer = C.SampleScorer(config, FLAGS.model_workdir, FLAGS.feature_net_dir, ref_dir)
    sq = scorer.score(sc['num_samples'], grid_path=os.path.join(out, 'samples_default.png'),
                      method='ancestral', num_steps='', seed=0)
    row = nll_row(f'digits default ({config.training.num_train_steps} steps, L_simple)', nll, dict(
        fid=sq['fid'], inception_score=sq['inception_score'], precision=sq['precision'],
        recall=sq['recall'], num_samples=sq['num_samples'], train_s=round(t_train, 1),
        nll_s=round(t_nll, 1), sample_s=sq['sample_seconds']))
    results['table1'] = dict(nll=nll, sample_quality=sq, row=row)
    C.write_json(out, 'results.json', results)
    cols1 = ['run', 'nll_total', 'nll_stderr', 'L_T_prior', 'sum_L_t', 'L_0_decoder', 'fid',
             'inception_score', 'precision', 'recall', 'num_samples', 'train_s', 'nll_s', 'sample_s']
    md1 = C.write_table(out, 'table1', [row], cols1, header=(
        f'DDPM Table 1 protocol on digits, SCALED DOWN ({FLAGS.scale}): NLL in bits/dim on the '
        f'359 test images (full T={config.diffusion.num_timesteps} bound); FID/IS/P/R in the '
        f'digits feature-net space, {sc["num_samples"]} samples vs the train split. '
        'Not comparable with CIFAR-10 Inception numbers.'))
    logging.info('\n%s', md1)

    # ---- Table 2: L_simple vs the true bound, same (shorter) training.
    rows2 = []
    for loss in ('mse', 'kl'):
        cfg = C.digits_config(**{'diffusion.loss_type': loss,
                                 'training.num_train_steps': sc['short_steps'],
                                 'training.sample_every_steps': sc['short_steps'],
                                 'training.checkpoint_every_steps': sc['short_steps']})
        wd = os.path.join(out, f'run_{loss}_{sc["short_steps"]}')
        t_train = C.ensure_trained(cfg, wd)
        nll, t_nll = C.test_nll(cfg, wd)
        sq = C.SampleScorer(cfg, wd, FLAGS.feature_net_dir, ref_dir).score(
            sc['short_samples'], grid_path=os.path.join(out, f'samples_{loss}.png'), seed=0)
        name = {'mse': 'L_simple (mse), fixed σ²=β_t', 'kl': 'true bound L (kl), fixed σ²=β_t'}[loss]
        rows2.append(nll_row(f'{name}, {sc["short_steps"]} steps', nll, dict(
            fid=sq['fid'], inception_score=sq['inception_score'], precision=sq['precision'],
            recall=sq['recall'], num_samples=sq['num_samples'], train_s=round(t_train, 1),
            nll_s=round(t_nll, 1), sample_s=sq['sample_seconds'])))
        results.setdefault('table2', {})[loss] = dict(nll=nll, sample_quality=sq, workdir=wd)
        C.write_json(out, 'results.json', results)
        md2 = C.write_table(out, 'table2', rows2, cols1, header=(
            f'DDPM Table 2 ablation on digits, SCALED DOWN: both objectives trained '
            f'{sc["short_steps"]} steps (same seed, data, network); NLL in bits/dim (test, full '
            f'bound); feature-net FID of {sc["short_samples"]} samples vs the train split.'))
    logging.info('\n%s', md2)


if __name__ == '__main__':
    app.run(main)
