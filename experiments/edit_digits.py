"""Editing held-out digits, judged by the digits feature net: its classifier's accuracy (against
the true labels of the 359 test digits, or the target class of a class swap) and the Fréchet
distance of its features to the training digits ("FID", feature-net space; not Inception FID).

    python experiments/edit_digits.py --gaussian_workdir=runs/digits \
        --feature_net_dir=runs/feature_net_digits [--cond_workdir=runs/digits_cond] \
        [--classifier_workdir=runs/digits_classifier] [--cold_blur_workdir=runs/cold_blur] \
        [--cold_mask_workdir=runs/cold_mask] [--parts=repaint,sdedit,swap,cold] \
        [--out=experiments/results/edit_digits.json]

Parts (each merged into --out as it finishes; grids under --grid_dir, one per method, rows of
original | mask or corrupted input | result):
  repaint  the right half inpainted, plain chain (j = r = 1) and with resampling (default
           j = r = 10, Lugmayr et al.); the masked input (right half grey) as the floor.
  sdedit   digits corrupted by strokes (one random white line segment each) and by N(0, σ²)
           pixel noise (clipped), SDEdit at strengths 0.2 … 0.8 (Meng et al. Fig. 3's
           realism-faithfulness curve): accuracy to the true labels (faithfulness) and FID to the
           training digits (realism), the corrupted input and the clean test digits as the ends.
  swap     DDIM class swap on the class-conditional run: invert with the true label, decode with
           the target (y + 1) mod 10 at classifier-free guidance scales w; the target accuracy
           and the per-image L2 distance to the input (the unchanged decode's as the floor); with
           --classifier_workdir also the unconditional run guided by the noisy classifier.
  cold     cold diffusion: FID of 1,000 blur-run samples (Algorithm 2 and 1); the mask run's
           restoration of its own hole D(x_0, T) beside the Gaussian run's RePaint of the same
           hole (binarised: m_T >= 0.5 kept), and of right-half-masked digits (the cold network
           applied once, R(x, T): a degradation outside its family) beside RePaint.
Every number comes from library calls (run.load, samplers.*, feature_net).
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

from diffusion_jax import guidance, image_utils, input_pipeline, samplers, sharding  # noqa: E402
from diffusion_jax import run as run_lib  # noqa: E402
from diffusion_jax.evaluation import feature_net  # noqa: E402
from diffusion_jax.respace import space_timesteps  # noqa: E402
from diffusion_jax.samplers import batches  # noqa: E402


def strokes(shape, seed: int) -> np.ndarray:
    """One random white (+1) line segment per image: endpoints uniform over the pixel grid,
    rasterised at 4 points per pixel of length. Returns a stroke mask [N, H, W, 1] (1 = ink)."""
    n, height, width = shape[:3]
    rng = np.random.default_rng(seed)
    out = np.zeros((n, height, width, 1), np.float32)
    for i in range(n):
        (y0, x0), (y1, x1) = rng.uniform(0, [height, width], (2, 2))
        m = int(4 * max(abs(y1 - y0), abs(x1 - x0), 1))
        ys = np.clip(np.round(np.linspace(y0, y1, m)).astype(int), 0, height - 1)
        xs = np.clip(np.round(np.linspace(x0, x1, m)).astype(int), 0, width - 1)
        out[i, ys, xs, 0] = 1.0
    return out


class Judge:
    """Accuracy and FID (feature-net space) against the training digits."""

    def __init__(self, directory, train_images):
        self.net, self.params, _ = feature_net.load_feature_net(directory)
        self.real = image_utils.to_uint8(train_images)

    def acc(self, x, labels):
        return feature_net.accuracy(self.net, self.params, image_utils.to_uint8(x), labels)

    def fid(self, x):
        return float(feature_net.evaluate_samples(self.net, self.params, self.real,
                                                  image_utils.to_uint8(x))['fd'])


def grid(path, columns, rows: int = 12):
    """Rows of (column_0 | column_1 | …) of the first `rows` images, as a PNG."""
    cols = [image_utils.to_uint8(np.asarray(c)[:rows]) for c in columns]
    image_utils.save_grid(path, np.stack(cols, 1).reshape((-1,) + cols[0].shape[1:]),
                          ncols=len(cols))


def _save(results, out):
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    old = {}
    if os.path.isfile(out):
        with open(out, encoding='utf-8') as f:
            old = json.load(f)
    old.update(results)
    with open(out, 'w', encoding='utf-8') as f:
        json.dump(old, f, indent=2)


def part_repaint(args, judge, d, model_fn, x0, labels):
    res = {}
    mask = jnp.asarray(samplers.make_mask('right_half', x0.shape))
    res['masked_input_floor'] = judge.acc(mask * x0, labels)  # 0 = mid-grey in [-1, 1]
    for name, (j, r) in (('repaint_plain', (1, 1)),
                         ('repaint_resampled', (args.jump_length, args.jump_n_sample))):
        t0 = time.time()
        out = samplers.repaint(d, model_fn, jax.random.key(0), x0, mask, jump_length=j,
                               jump_n_sample=r)
        res[name] = judge.acc(out, labels)
        res[name + '_fid'] = judge.fid(out)
        res[name + '_seconds'] = time.time() - t0
        print(name, res[name], f'{time.time() - t0:.0f}s', flush=True)
        if name == 'repaint_resampled':
            grid(os.path.join(args.grid_dir, 'edit_repaint.png'), [x0, mask * x0, out])
    return res


def part_sdedit(args, judge, d, model_fn, x0, labels):
    ink = strokes(x0.shape, 1)
    inputs = {
        'strokes': jnp.where(ink > 0, 1.0, x0),
        'noise': jnp.clip(x0 + args.noise_std * jax.random.normal(jax.random.key(1), x0.shape),
                          -1, 1)}
    res = {'sdedit_clean_fid': judge.fid(x0), 'sdedit_noise_std': args.noise_std}
    for kind, x_in in inputs.items():
        rows = {'input': dict(accuracy=judge.acc(x_in, labels), fid=judge.fid(x_in),
                              rms_to_clean=float(jnp.sqrt(jnp.mean((x_in - x0)**2))))}
        print('sdedit', kind, 'input', rows['input'], flush=True)
        for s in [float(v) for v in args.strengths.split(',')]:
            t0 = time.time()
            out = samplers.sdedit(d, model_fn, jax.random.key(2), x_in, s)
            rows[str(s)] = dict(accuracy=judge.acc(out, labels), fid=judge.fid(out),
                                rms_to_clean=float(jnp.sqrt(jnp.mean((out - x0)**2))),
                                rms_to_input=float(jnp.sqrt(jnp.mean((out - x_in)**2))),
                                seconds=time.time() - t0)
            print('sdedit', kind, s, rows[str(s)], flush=True)
            if kind == 'strokes' and abs(s - 0.4) < 1e-6:
                grid(os.path.join(args.grid_dir, 'edit_sdedit.png'), [x0, x_in, out])
        res[f'sdedit_{kind}'] = rows
    return res


def part_swap(args, judge, x0, labels):
    res = {}
    cond = run_lib.load(args.cond_workdir)
    d = cond.diffusion.respace(space_timesteps(cond.diffusion.num_timesteps, args.ddim_steps))
    classes = int(cond.config.model.num_classes)
    target = (labels + 1) % classes
    apply, variables = cond.model.apply, cond.variables
    src = guidance.bind_model(apply, variables, jnp.asarray(labels))
    l2 = lambda a: float(np.mean(np.sqrt(np.sum(np.square(np.asarray(a - x0)),  # noqa: E731
                                                 axis=(1, 2, 3)))))
    rows = {}
    for w in [float(v) for v in args.scales.split(',')]:
        t0 = time.time()
        fn = guidance.classifier_free_model_fn(apply, variables, jnp.asarray(target), w,
                                               null_label=classes)
        out = samplers.ddim_edit(d, src, x0, edit_model_fn=fn)
        rows[str(w)] = dict(target_accuracy=judge.acc(out['edited'], target),
                            source_accuracy=judge.acc(out['edited'], labels),
                            l2_to_input=l2(out['edited']), fid=judge.fid(out['edited']),
                            seconds=time.time() - t0)
        rows['reconstruction'] = dict(source_accuracy=judge.acc(out['reconstruction'], labels),
                                      l2_to_input=l2(out['reconstruction']),
                                      rms_mean=float(np.mean(out['reconstruction_error'])))
        print('swap cfg', w, rows[str(w)], flush=True)
        if abs(w - 1.0) < 1e-6:
            grid(os.path.join(args.grid_dir, 'edit_ddim_swap.png'),
                 [x0, out['reconstruction'], out['edited']])
    res['swap_cfg'] = rows
    res['swap_ddim_steps'] = args.ddim_steps
    if args.classifier_workdir:
        _wait_for(args.classifier_workdir)
        unc = run_lib.load(args.gaussian_workdir)
        du = unc.diffusion.respace(space_timesteps(unc.diffusion.num_timesteps, args.ddim_steps))
        clf = run_lib.load(args.classifier_workdir)
        grad = guidance.classifier_grad_fn(clf.model, clf.variables)
        fn = guidance.bind_model(unc.model.apply, unc.variables)
        rows = {}
        for s in [float(v) for v in args.classifier_scales.split(',')]:
            t0 = time.time()
            out = samplers.ddim_edit(du, fn, x0, edit_guidance=guidance.classifier_guidance(
                grad, jnp.asarray(target), s))
            rows[str(s)] = dict(target_accuracy=judge.acc(out['edited'], target),
                                source_accuracy=judge.acc(out['edited'], labels),
                                l2_to_input=l2(out['edited']), fid=judge.fid(out['edited']),
                                seconds=time.time() - t0)
            rows['reconstruction'] = dict(l2_to_input=l2(out['reconstruction']))
            print('swap classifier', s, rows[str(s)], flush=True)
        res['swap_classifier'] = rows
    return res


def _wait_for(workdir, step=None, timeout=5400):
    """Waits until the run in workdir has its final checkpoint (training.num_train_steps, or
    `step`): the runs this script reads may still be training when it starts."""
    t0 = time.time()
    while True:
        on_disk = run_lib.Run(workdir)
        if on_disk.has_config():
            want = step or int(on_disk.config.training.num_train_steps)
            if on_disk.latest_step() == want:
                return
        if time.time() - t0 > timeout:
            raise TimeoutError(f'{workdir} has no final checkpoint')
        time.sleep(30)


def part_cold(args, judge, d, model_fn, x0, labels):
    res = {}
    mesh = sharding.make_mesh()
    if args.cold_blur_workdir:
        _wait_for(args.cold_blur_workdir)
        for method in ('cold', 'cold_naive'):
            blur = run_lib.load(args.cold_blur_workdir, {'sampling.method': method,
                                                         'sampling.batch_size': 200})
            samples, _ = batches.draw_samples(blur.config, blur.variables, mesh,
                                              args.num_samples)
            res[f'cold_blur_{method}_fid'] = judge.fid(samples)
            print('cold blur', method, res[f'cold_blur_{method}_fid'], flush=True)
            if method == 'cold':
                grid(os.path.join(args.grid_dir, 'edit_cold_blur.png'),
                     [samples[:12], samples[12:24], samples[24:36]])
    if args.cold_mask_workdir:
        _wait_for(args.cold_mask_workdir)
        cm = run_lib.load(args.cold_mask_workdir)
        c = cm.diffusion
        fn = guidance.bind_model(cm.model.apply, cm.variables)
        x_T = c.degrade(x0, jnp.full((x0.shape[0],), c.num_timesteps))
        res['cold_mask_degraded_floor'] = judge.acc(x_T, labels)
        for method in ('cold', 'cold_naive'):
            out = samplers.cold_restore(c, fn, x_T, method=method)
            res[f'cold_mask_{method}'] = judge.acc(out, labels)
            res[f'cold_mask_{method}_fid'] = judge.fid(out)
            if method == 'cold':
                hole = np.asarray(c.mult[c.num_timesteps])[None, :, :, None]
                grid(os.path.join(args.grid_dir, 'edit_cold_mask.png'),
                     [x0, x_T, out])
        # The Gaussian run's RePaint of the same hole (binarised: m_T >= 0.5 kept), on its chain
        # respaced to --hole_steps steps (the resampled chain's network calls stay affordable).
        d = d.respace(space_timesteps(d.num_timesteps, args.hole_steps))
        keep = jnp.asarray(np.broadcast_to(hole >= 0.5, x0.shape).astype(np.float32))
        res['cold_hole_kept_fraction'] = float(np.mean(hole >= 0.5))
        res['cold_hole_masked_floor'] = judge.acc(keep * x0, labels)
        for name, (j, r) in (('plain', (1, 1)), ('resampled', (args.jump_length,
                                                                args.jump_n_sample))):
            t0 = time.time()
            out = samplers.repaint(d, model_fn, jax.random.key(0), x0, keep, jump_length=j,
                                   jump_n_sample=r)
            res[f'cold_hole_repaint_{name}'] = judge.acc(out, labels)
            res[f'cold_hole_repaint_{name}_fid'] = judge.fid(out)
            res[f'cold_hole_repaint_{name}_seconds'] = time.time() - t0
            print('cold hole repaint', name, res[f'cold_hole_repaint_{name}'], flush=True)
        # Right-half-masked digits, restored once by the cold network (R(x, T)).
        half = jnp.asarray(samplers.make_mask('right_half', x0.shape))
        out = c.restore(fn, half * x0, jnp.full((x0.shape[0],), c.num_timesteps))
        res['cold_mask_right_half_direct'] = judge.acc(out, labels)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--gaussian_workdir', required=True)
    p.add_argument('--feature_net_dir', required=True)
    p.add_argument('--cond_workdir', default='')
    p.add_argument('--classifier_workdir', default='')
    p.add_argument('--cold_blur_workdir', default='')
    p.add_argument('--cold_mask_workdir', default='')
    p.add_argument('--parts', default='repaint,sdedit,swap,cold')
    p.add_argument('--jump_length', type=int, default=10)
    p.add_argument('--jump_n_sample', type=int, default=10)
    p.add_argument('--strengths', default='0.2,0.4,0.6,0.8')
    p.add_argument('--noise_std', type=float, default=1.0, help='sdedit noise corruption')
    p.add_argument('--ddim_steps', default='ddim50')
    p.add_argument('--scales', default='0,1,3', help='classifier-free w of the class swap')
    p.add_argument('--classifier_scales', default='1,3,10')
    p.add_argument('--num_samples', type=int, default=1000)
    p.add_argument('--hole_steps', default='100', help='RePaint chain of the cold-hole rows')
    p.add_argument('--grid_dir', default='experiments/results')
    p.add_argument('--out', default='experiments/results/edit_digits.json')
    args = p.parse_args(argv)
    loaded = run_lib.load(args.gaussian_workdir)
    train_ds = input_pipeline.get_dataset(loaded.config.data, loaded.config.data.train_split)
    judge = Judge(args.feature_net_dir, train_ds.get(np.arange(len(train_ds)))['image'])
    test = input_pipeline.get_dataset(loaded.config.data, 'test')
    batch = test.get(np.arange(len(test)))
    x0, labels = jnp.asarray(batch['image']), np.asarray(batch['label'])
    model_fn = guidance.bind_model(loaded.model.apply, loaded.variables)
    d = loaded.diffusion
    os.makedirs(args.grid_dir, exist_ok=True)
    _save(dict(num_images=int(len(labels)), clean=judge.acc(x0, labels),
               machine='2-core CPU (shared)'), args.out)
    parts = args.parts.split(',')
    if 'repaint' in parts:
        _save(part_repaint(args, judge, d, model_fn, x0, labels), args.out)
    if 'sdedit' in parts:
        _save(part_sdedit(args, judge, d, model_fn, x0, labels), args.out)
    if 'swap' in parts and args.cond_workdir:
        _wait_for(args.cond_workdir)
        _save(part_swap(args, judge, x0, labels), args.out)
    if 'cold' in parts:
        _save(part_cold(args, judge, d, model_fn, x0, labels), args.out)
    print(open(args.out, encoding='utf-8').read())


if __name__ == '__main__':
    main()
