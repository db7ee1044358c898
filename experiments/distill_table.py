"""Few-step generation (issue 22): feature-net FID against network calls (NFE = 1, 2, 4, 8) of
distilled students beside the teacher's training-free solvers, on one digits teacher.

    python experiments/distill_table.py --workdir=runs/exp_distill_table \
        --teacher=runs/digits --progressive=runs/digits_pd --consistency=runs/digits_cd \
        --ect=runs/digits_ect [--feature_net_dir=runs/exp_feature_net] [--num_samples=1000]

The students are ordinary runs of configs/digits_distill.py trained from --teacher (the script
trains none: give their workdirs; an empty flag drops the row). Rows:
  teacher ancestral, all T steps (NFE = T): the teacher's best;
  teacher ddim (η = 0) and dpmpp_2m over 'trailingK' (Lin et al. 2023: the last step at T-1);
  progressive: the checkpoint of the round whose student takes K steps (distill_rounds.json),
    sampled with ddim over 'trailingK';
  consistency, ect: sampling.method='consistency' over 'trailingK' (one call per level).
Every cell draws N samples from the same x_T seeds (sampling.seed = 0) and is scored against the
digits train split in the feature net's space. samples/s: a second, warm draw of the same cell
(the first includes the compile). Distillation wall time: the first to the last line of each
student's train.log (the compile included), on the machine it ran on.

Outputs: distill_fid.{md,csv}, distill_all.csv, results.json. Feature-net FID on 8x8 digits:
NOT comparable with the papers' CIFAR-10 Inception FIDs, quoted in the markdown for orientation.
"""
from __future__ import annotations

import datetime
import json
import os
import time

from absl import app, flags, logging

import exp_common as C

from diffusion_jax import generate, image_utils, run, sharding  # noqa: E402
from diffusion_jax.evaluation import sample_quality  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_distill_table', 'Where the tables go.')
flags.DEFINE_string('teacher', 'runs/digits', 'The teacher run (configs/digits.py).')
flags.DEFINE_string('progressive', 'runs/digits_pd', 'A progressive run (empty: no row).')
flags.DEFINE_string('consistency', 'runs/digits_cd', 'A consistency run (empty: no row).')
flags.DEFINE_string('ect', 'runs/digits_ect', 'An ect run (empty: no row).')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_integer('num_samples', 1000, 'Samples per cell.')
flags.DEFINE_list('nfes', ['1', '2', '4', '8'], 'NFE columns.')
flags.DEFINE_bool('throughput', True, 'Time a second, warm draw of each few-step cell.')
flags.DEFINE_bool('ancestral', True, "The teacher's all-T-steps ancestral cell.")

# Published, NOT comparable (CIFAR-10 32x32, 50k samples, Inception FID, their networks).
PUBLISHED = (
    'Published CIFAR-10 FIDs, NOT comparable (Inception features, 50k samples, 32x32 images, '
    'their own networks and training budgets): progressive distillation (Salimans & Ho 2022, '
    '"Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022, Table 1/Fig. 4) '
    '2.57 at 8 steps, 3.00 at 4, 4.51 at 2, 9.12 at 1; consistency distillation (Song et al. '
    '2023, "Consistency Models", ICML 2023, Table 1, LPIPS) 3.55 at 1 step, 2.93 at 2; easy '
    'consistency tuning (Geng et al. 2024, "Consistency Models Made Easy", ICLR 2025) 2-step FID '
    '2.73 within 1 A100 hour, 2.11 at 2 steps with longer tuning.')


class Scorer:
    """Feature-net FID/precision/recall of any run's samples, at any of its checkpoints."""

    def __init__(self, feature_net_dir: str):
        C.ensure_feature_net(feature_net_dir)
        self.feature_net_dir = feature_net_dir
        self.mesh = sharding.make_mesh()
        self.space = None

    def score(self, workdir: str, n: int, step=None, throughput=False, **sampling) -> dict:
        overrides = {f'sampling.{k}': v for k, v in sampling.items()}
        overrides.update({'sampling.batch_size': 250, 'sampling.seed': 0,
                          'eval.feature_space': 'feature_net',
                          'eval.feature_net_dir': self.feature_net_dir,
                          'eval.reference_split': 'train',
                          'eval.reference_dir': os.path.join(self.feature_net_dir, 'reference')})
        loaded = run.load(workdir, overrides, step=step, use_ema=True, mesh=self.mesh)
        config = loaded.config
        if self.space is None:
            self.space = sample_quality.FeatureSpace(config.eval)
        start = time.time()
        samples, _ = generate.draw_samples(config, loaded.variables, self.mesh, n)
        first = time.time() - start
        out = dict(sample_seconds=round(first, 1), checkpoint_step=loaded.step)
        if throughput:
            start = time.time()
            generate.draw_samples(config, loaded.variables, self.mesh, n)
            out['samples_per_sec'] = round(n / (time.time() - start), 1)
        images = image_utils.to_uint8(samples)
        ref = sample_quality.reference_features(config, self.space, max_keep=n,
                                                folder=config.eval.reference_dir)
        out.update(sample_quality.sample_metrics(self.space(images), ref))
        return out


def train_wall_seconds(workdir: str) -> float | None:
    """Seconds from the first to the last timestamped line of workdir/train.log."""
    path = os.path.join(workdir, 'train.log')
    if not os.path.exists(path):
        return None
    stamps = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                stamps.append(datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f'))
            except ValueError:
                continue
    return (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None


def main(_):
    out, n = FLAGS.workdir, FLAGS.num_samples
    os.makedirs(out, exist_ok=True)
    nfes = [int(v) for v in FLAGS.nfes]
    scorer = Scorer(FLAGS.feature_net_dir)
    t_steps = int(run.Run(FLAGS.teacher).config.diffusion.num_timesteps)
    cells, grid, start = [], {}, time.time()
    results = dict(num_samples=n, device=C.device_note(), teacher=FLAGS.teacher)
    # Cells of an earlier run of this script into the same workdir are reused (same row, NFE,
    # run, checkpoint and N), so the table can be filled in as the students finish.
    cache_path = os.path.join(out, 'results.json')
    cached = json.load(open(cache_path, encoding='utf-8'))['cells'] if os.path.exists(
        cache_path) else []

    def add(row, nfe, workdir, step=None, **sampling):
        hit = [c for c in cached if (c['row'], c['nfe'], c['workdir'], c.get('step_arg'),
                                     c.get('num_samples')) == (row, nfe, workdir, step, n)]
        if hit:
            r = {k: v for k, v in hit[0].items()
                 if k not in ('row', 'nfe', 'workdir', 'step_arg', *sampling)}
        else:
            r = scorer.score(workdir, n, step=step, throughput=FLAGS.throughput and nfe <= 8,
                             **sampling)
        cell = dict(row=row, nfe=nfe, workdir=workdir, step_arg=step, **sampling, **r)
        logging.info('%s', cell)
        cells.append(cell)
        grid.setdefault(row, {})[nfe] = r['fid']
        write()

    def write():
        columns = [f'NFE={v}' for v in nfes]
        table = [dict(method=k, **{f'NFE={v}': grid[k].get(v, '') for v in nfes})
                 for k in grid if not k.startswith('teacher ancestral')]
        anc = [c for c in cells if c['row'].startswith('teacher ancestral')]
        header = (f'Feature-net FID (lower is better), {n} samples per cell against the digits '
                  f'train split, the same x_T seeds in every cell; one teacher ({FLAGS.teacher}, '
                  f'T = {t_steps})'
                  + (f', whose {t_steps}-step ancestral FID is {anc[0]["fid"]:.3f}' if anc else '')
                  + '. SCALED DOWN: digits 8x8, not CIFAR-10.\n\n' + PUBLISHED)
        C.write_table(out, 'distill_fid', table, ['method'] + columns, header=header)
        C.write_table(out, 'distill_all', cells, [
            'row', 'nfe', 'method', 'num_steps', 'checkpoint_step', 'fid', 'precision', 'recall',
            'inception_score', 'sample_seconds', 'samples_per_sec', 'workdir'])
        C.write_json(out, 'results.json', dict(results, grid=grid, cells=cells,
                                               seconds=time.time() - start))

    for name, flag in (('progressive', FLAGS.progressive), ('consistency', FLAGS.consistency),
                       ('ect', FLAGS.ect)):
        if flag:
            results[f'{name}_train_wall_seconds'] = train_wall_seconds(flag)
            results[f'{name}_train_steps'] = int(run.Run(flag).config.training.num_train_steps)
    for nfe in nfes:
        add('teacher ddim', nfe, FLAGS.teacher, method='ddim', num_steps=f'trailing{nfe}',
            eta=0.0)
        add('teacher dpmpp_2m', nfe, FLAGS.teacher, method='dpmpp_2m',
            num_steps=f'trailing{nfe}')
    if FLAGS.progressive:
        rounds = json.load(open(os.path.join(FLAGS.progressive, 'distill_rounds.json'),
                                encoding='utf-8'))['rounds']
        by_steps = {r['sampling_steps']: r['checkpoint_step'] for r in rounds}
        for nfe in nfes:
            if nfe in by_steps:
                add('progressive', nfe, FLAGS.progressive, step=by_steps[nfe], method='ddim',
                    num_steps=f'trailing{nfe}', eta=0.0)
    for name in ('consistency', 'ect'):
        workdir = getattr(FLAGS, name)
        for nfe in nfes if workdir else ():
            add(name, nfe, workdir, method='consistency', num_steps=f'trailing{nfe}')
    if FLAGS.ancestral:
        add(f'teacher ancestral {t_steps}', t_steps, FLAGS.teacher, method='ancestral',
            num_steps='')
    write()


if __name__ == '__main__':
    app.run(main)
