"""Improved DDPM (Nichol & Dhariwal 2021): noise schedules and training objectives, on digits.

    python experiments/schedules_and_objectives.py --workdir=runs/exp_schedules [--scale=cpu|full]
        [--mse_workdir=runs/exp_ddpm_table/run_mse_600]

1. Schedules (pure computation, the survey's Fig. 5 / Nichol & Dhariwal Fig. 5): ᾱ_t against t/T for
   the linear (β 1e-4..0.02) and cosine (s = 0.008) schedules at T = 1000 -> schedules_alphabar.png,
   with the digits config's T = 200 linear schedule (endpoints ×1000/T) dashed for reference.
2. Objectives: short digits trainings, identical but for the objective (linear schedule, T = 200):
     L_simple   loss_type='mse',         model_var_type='fixed_large'  (Ho et al.)
     L_hybrid   loss_type='hybrid',      model_var_type='learned_range' (λ = 0.001)
     L_vlb      loss_type='rescaled_kl', model_var_type='learned_range', timestep_sampler='loss_aware'
   compared by test NLL (full T-step bound) and, unless --fid=false, feature-net FID.
   --mse_workdir reuses ddpm_table.py's L_simple run of the same length (same config).

Outputs: objectives.{md,csv}, schedules_alphabar.png, results.json, run_*/ (the trained runs).
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_schedules', 'Where the runs, table and figure go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: 600 steps, 500 samples; full: 1500, 5000.')
flags.DEFINE_string('mse_workdir', '', 'An existing L_simple run of the same steps to reuse.')
flags.DEFINE_string('mse_results', '', 'ddpm_table.py results.json whose Table 2 L_simple run (same '
                    'config as L_simple here, same seeds) supplies the L_simple row without '
                    'recomputing it; needs --mse_workdir pointing at that run.')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_bool('fid', True, 'Also score samples (feature-net FID).')
flags.DEFINE_list('objectives', ['L_simple', 'L_hybrid', 'L_vlb'], 'Which objectives to train.')

SCALES = {'cpu': dict(steps=600, samples=500), 'full': dict(steps=1500, samples=5000)}
OBJECTIVES = {
    'L_simple': {'diffusion.loss_type': 'mse', 'diffusion.model_var_type': 'fixed_large'},
    'L_hybrid': {'diffusion.loss_type': 'hybrid', 'diffusion.model_var_type': 'learned_range',
                 'model.out_channels': 2},
    'L_vlb': {'diffusion.loss_type': 'rescaled_kl', 'diffusion.model_var_type': 'learned_range',
              'diffusion.timestep_sampler': 'loss_aware', 'model.out_channels': 2},
}


def plot_schedules(path):
    from diffusion_jax import schedules  # pylint: disable=import-outside-toplevel
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    curves = {}
    for name, T, style in (('linear', 1000, '-'), ('cosine', 1000, '-'), ('linear', 200, ':')):
        betas = schedules.get_beta_schedule(name, T)
        abar = np.cumprod(1.0 - betas)
        curves[f'{name}_T{T}'] = abar
        ax.plot(np.arange(T) / T, abar, style, label=f'{name}, T={T}')
    ax.set_xlabel('diffusion step (t/T)')
    ax.set_ylabel('ᾱ_t')
    ax.set_title('ᾱ_t of the linear and cosine schedules', fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    lin, cos = curves['linear_T1000'], curves['cosine_T1000']
    return dict(linear_T1000_final=float(lin[-1]), cosine_T1000_final=float(cos[-1]),
                linear_frac_below_0p01=float((lin < 1e-2).mean()),
                cosine_frac_below_0p01=float((cos < 1e-2).mean()))


def _reused_mse(name, sc):
    """ddpm_table.py's Table 2 'mse' entry when it is this L_simple run (same steps and N)."""
    if name != 'L_simple' or not FLAGS.mse_results or not FLAGS.mse_workdir:
        return None
    with open(FLAGS.mse_results, encoding='utf-8') as f:
        entry = json.load(f).get('table2', {}).get('mse')
    if (entry is None or os.path.normpath(entry['workdir']) != os.path.normpath(FLAGS.mse_workdir)
            or entry['sample_quality']['num_samples'] != sc['samples']):
        return None
    logging.info('L_simple: reusing the NLL and FID of %s from %s', entry['workdir'],
                 FLAGS.mse_results)
    return entry


def main(_):
    out, sc = FLAGS.workdir, SCALES[FLAGS.scale]
    os.makedirs(out, exist_ok=True)
    results = dict(scale=FLAGS.scale, sizes=sc, device=C.device_note())
    results['schedules'] = plot_schedules(os.path.join(out, 'schedules_alphabar.png'))
    # Rows of objectives run by an earlier invocation (e.g. --objectives=L_simple later) are kept.
    previous = os.path.join(out, 'results.json')
    if os.path.exists(previous):
        with open(previous, encoding='utf-8') as f:
            old = json.load(f).get('objectives', {})
        results['objectives'] = {k: v for k, v in old.items() if k not in FLAGS.objectives}
    C.write_json(out, 'results.json', results)
    for name in FLAGS.objectives:
        overrides = dict(OBJECTIVES[name], **{'training.num_train_steps': sc['steps'],
                                              'training.sample_every_steps': sc['steps'],
                                              'training.checkpoint_every_steps': sc['steps']})
        config = C.digits_config(**overrides)
        wd = os.path.join(out, f'run_{name}_{sc["steps"]}')
        if name == 'L_simple' and FLAGS.mse_workdir:
            wd = FLAGS.mse_workdir
        reused = _reused_mse(name, sc)
        if reused:
            t_train, (nll, t_nll), sq = 0.0, (reused['nll'], 0.0), reused['sample_quality']
        else:
            t_train = C.ensure_trained(config, wd)
            nll, t_nll = C.test_nll(config, wd)
        row = dict(objective=name, loss_type=config.diffusion.loss_type,
                   variance=config.diffusion.model_var_type,
                   t_sampler=config.diffusion.timestep_sampler, steps=sc['steps'],
                   nll_total=nll['total_bpd'], nll_stderr=nll['total_bpd_stderr'],
                   sum_L_t=nll['kl_sum_bpd'], L_0_decoder=nll['decoder_bpd'],
                   train_s=round(t_train, 1), nll_s=round(t_nll, 1))
        if FLAGS.fid and reused:
            row.update(fid=sq['fid'], precision=sq['precision'], recall=sq['recall'],
                       num_samples=sq['num_samples'], sample_s=sq['sample_seconds'])
        elif FLAGS.fid:
            sq = C.SampleScorer(config, wd, FLAGS.feature_net_dir,
                                os.path.join(FLAGS.feature_net_dir, 'reference')).score(
                sc['samples'], grid_path=os.path.join(out, f'samples_{name}.png'), seed=0)
            row.update(fid=sq['fid'], precision=sq['precision'], recall=sq['recall'],
                       num_samples=sq['num_samples'], sample_s=sq['sample_seconds'])
        results.setdefault('objectives', {})[name] = dict(nll=nll, row=row, workdir=wd)
        C.write_json(out, 'results.json', results)
        rows = [results['objectives'][k]['row'] for k in OBJECTIVES if k in results['objectives']]
        columns = ['objective', 'loss_type', 'variance', 't_sampler', 'steps', 'nll_total',
                   'nll_stderr', 'sum_L_t', 'L_0_decoder', 'fid', 'precision', 'recall',
                   'num_samples', 'train_s', 'nll_s', 'sample_s']
        md = C.write_table(out, 'objectives', rows, columns, header=(
            f'Improved-DDPM objectives on digits, SCALED DOWN: {sc["steps"]} training steps each '
            f'(linear schedule, T = 200); NLL in bits/dim on the 359 test images (full bound); '
            f'feature-net FID of {sc["samples"]} ancestral samples vs the train split.'))
        logging.info('\n%s', md)


if __name__ == '__main__':
    app.run(main)
