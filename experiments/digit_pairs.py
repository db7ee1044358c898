"""Prompt accuracy of a digit-pairs text run (issue 21), against classifier-free guidance scale,
for the seen (training) and held-out pairs, next to a class-conditional digits model.

    python experiments/digit_pairs.py --workdir=runs/digit_pairs_text \
        --cond_workdir=runs/digits_cond --out=experiments/results/digit_pairs

Each of the 100 prompts "<left> and <right>" is sampled --per_pair times (sampling.prompts_file
semantics: the 100 captions cycled) at each scale w; the two 8x8 halves of every sample are
classified by the digits feature net (diffusion_jax.evaluation.feature_net, the network the
digits FID uses; trained here into --feature_net_dir when it is not there). Prompt accuracy = the
fraction of samples whose left AND right halves are classified as the prompt's digits, over the
80 training pairs and over the 20 held-out pairs (never in a training batch: following them needs
composition). The class-conditional baseline samples the left and the right digit separately
from the digits_cond run (model.num_classes=10, label dropout 0.1) at the same w with the same
sampler, and scores the pair the same way: both classified right. Standard errors are binomial,
sqrt(p(1-p)/n). Writes <out>.md, <out>.csv and <out>.json, and a grid of one sample per pair.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import generate, image_utils, input_pipeline, run, sharding, text  # noqa: E402
from diffusion_jax.evaluation import feature_net  # noqa: E402


def ensure_feature_net(folder: str):
    """(model, params, meta) of the digits feature net in folder, trained there if absent."""
    if not os.path.exists(os.path.join(folder, feature_net.META_FILE)):
        feature_net.main(['--dataset=digits', f'--out={folder}'])
    return feature_net.load_feature_net(folder)


def classify(net, images_uint8) -> np.ndarray:
    """Digit classes [N] of uint8 [N, 8, 8, 1] images."""
    model, params = net
    return feature_net.feature_net_features(model, params, images_uint8)['logits'].argmax(-1)


def sampling_overrides(args, w: float) -> dict:
    return {'sampling.method': args.method, 'sampling.num_steps': args.num_steps,
            'sampling.guidance_scale': float(w), 'sampling.batch_size': args.batch_size,
            'sampling.seed': args.seed}


def use_ema(args) -> bool:
    return args.use_ema.lower() in ('1', 'true', 'yes')


def text_samples(args, w: float, mesh):
    """(uint8 [100·per_pair, 8, 16, 1], pair ids [N]) of the text run at scale w."""
    loaded = run.load(args.workdir, dict(sampling_overrides(args, w), **{
        'sampling.prompt': 'zero and zero'}), step=args.step, use_ema=use_ema(args), mesh=mesh)
    prompts = [input_pipeline.pair_caption(p) for p in range(input_pipeline.NUM_PAIRS)]
    table = text.prompt_table(loaded.model, loaded.variables, text.load_tokenizer(args.workdir),
                              prompts)
    n = input_pipeline.NUM_PAIRS * args.per_pair
    samples, labels = generate.draw_samples(loaded.config, loaded.variables, mesh, n, text=table)
    return image_utils.to_uint8(samples), np.asarray(labels), loaded.step


def cond_samples(args, w: float, pairs: np.ndarray, mesh):
    """(left, right) uint8 [N, 8, 8, 1] of the class-conditional run for pairs [N]."""
    labels = np.concatenate([pairs // 10, pairs % 10])
    overrides = dict(sampling_overrides(args, w),
                     **{'sampling.labels': ','.join(str(int(v)) for v in labels)})
    loaded = run.load(args.cond_workdir, overrides, mesh=mesh)
    samples, drawn = generate.draw_samples(loaded.config, loaded.variables, mesh, len(labels))
    assert np.array_equal(drawn, labels)
    images = image_utils.to_uint8(samples)
    return images[:len(pairs)], images[len(pairs):]


def accuracy_rows(hit: np.ndarray, pairs: np.ndarray, train_pairs) -> dict:
    out = {}
    for name, sel in (('seen', np.isin(pairs, train_pairs)), ('held_out',
                                                               ~np.isin(pairs, train_pairs))):
        p, n = float(np.mean(hit[sel])), int(np.sum(sel))
        out[name] = p
        out[f'{name}_stderr'] = float(np.sqrt(p * (1 - p) / n))
        out[f'{name}_n'] = n
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', required=True, help='the digit-pairs text run')
    parser.add_argument('--step', type=int, default=None, help='its checkpoint (default latest)')
    parser.add_argument('--cond_workdir', default='', help='a class-conditional digits run')
    parser.add_argument('--feature_net_dir', default='runs/text_feature_net')
    parser.add_argument('--out', default='experiments/results/digit_pairs')
    parser.add_argument('--scales', default='0,1,3')
    parser.add_argument('--per_pair', type=int, default=4)
    parser.add_argument('--method', default='ddim')
    parser.add_argument('--num_steps', default='ddim25')
    parser.add_argument('--batch_size', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    # The text run's EMA (decay 0.995) still holds ~8% of the initial, zero-output network at
    # step 500: a run stopped early samples better from its raw parameters.
    parser.add_argument('--use_ema', default='true', help='text run: EMA (true) or raw params')
    args = parser.parse_args(argv)
    mesh = sharding.make_mesh()
    model, params, meta = ensure_feature_net(args.feature_net_dir)
    net = (model, params)
    stored = run.Run(args.workdir).config
    train_pairs, held_out = input_pipeline.pair_split(stored.data.split_seed)
    rows, grid = [], None
    for w in (float(v) for v in args.scales.split(',')):
        start = time.time()
        images, pairs, step = text_samples(args, w, mesh)
        left, right = classify(net, images[:, :, :8]), classify(net, images[:, :, 8:])
        hit = (left == pairs // 10) & (right == pairs % 10)
        row = dict(model=f'text ({stored.model.text_encoder}), step {step}'
                   f'{"" if use_ema(args) else ", raw params"}', w=w,
                   **accuracy_rows(hit, pairs, train_pairs),
                   left_right_digit_accuracy=float(np.mean(np.concatenate(
                       [left == pairs // 10, right == pairs % 10]))),
                   seconds=time.time() - start)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if grid is None or w == 1.0:
            grid = images[:input_pipeline.NUM_PAIRS]  # one sample per pair, pair order
        if args.cond_workdir:
            start = time.time()
            cl, cr = cond_samples(args, w, pairs, mesh)
            l2, r2 = classify(net, cl), classify(net, cr)
            hit = (l2 == pairs // 10) & (r2 == pairs % 10)
            row = dict(model='class-conditional digits (two samples)', w=w,
                       **accuracy_rows(hit, pairs, train_pairs),
                       left_right_digit_accuracy=float(np.mean(np.concatenate(
                           [l2 == pairs // 10, r2 == pairs % 10]))),
                       seconds=time.time() - start)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(rows=rows, workdir=args.workdir, cond_workdir=args.cond_workdir,
                  feature_net=dict(dir=args.feature_net_dir, test_accuracy=meta['test_accuracy']),
                  method=args.method, num_steps=args.num_steps, per_pair=args.per_pair,
                  use_ema=use_ema(args),
                  held_out_pairs=[int(p) for p in held_out], device=str(jax.devices()[0]))
    image_utils.write_json(str(out) + '.json', result)
    cols = ['model', 'w', 'seen', 'seen_stderr', 'held_out', 'held_out_stderr',
            'left_right_digit_accuracy', 'seen_n', 'held_out_n', 'seconds']
    with open(str(out) + '.csv', 'w') as f:
        f.write(','.join(cols) + '\n')
        for r in rows:
            f.write(','.join(str(r[c]) for c in cols) + '\n')
    lines = ['| model | w | seen pairs | held-out pairs | digits right (per half) |',
             '|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['model']} | {r['w']:g} | {r['seen']:.3f} ± {r['seen_stderr']:.3f} "
                     f"| {r['held_out']:.3f} ± {r['held_out_stderr']:.3f} | "
                     f"{r['left_right_digit_accuracy']:.3f} |")
    with open(str(out) + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    image_utils.save_grid(str(out) + '_samples.png', grid, ncols=10)
    print('\n'.join(lines))
    return result


if __name__ == '__main__':
    main()
