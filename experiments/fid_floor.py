"""The FID floor of the scaled-down tables: real held-out digits scored like samples.

    python experiments/fid_floor.py --workdir=runs/exp_fid_floor

The 359 test images and random subsets of the train split (N = 359, 500, 1000) are scored against
the train split's feature-net statistics exactly as the generated samples in ddpm_table.py and
ddim_table.py are. FID is biased upwards at small N, so these are the values a perfect model would
get at those sample counts; differences between sampler cells smaller than the spread seen here
are noise. (Train subsets are drawn from the reference set itself, so they are optimistic.)

Outputs: fid_floor.{md,csv}, results.json.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_fid_floor', 'Where the table goes.')
flags.DEFINE_string('feature_net_dir', C.DEFAULT_FEATURE_NET_DIR, 'The digits feature net.')
flags.DEFINE_integer('repeats', 3, 'Random subsets per train-split N.')


def split_images(config, split):
    from diffusion_jax import image_utils, input_pipeline  # pylint: disable=import-outside-toplevel
    ds = input_pipeline.get_dataset(config.data, split)
    return np.concatenate([image_utils.to_uint8(b['image'][b['mask']])
                           for b in input_pipeline.eval_iterator(ds, 128)])


def main(_):
    from diffusion_jax.evaluation import sample_quality  # pylint: disable=import-outside-toplevel
    C.ensure_feature_net(FLAGS.feature_net_dir)
    config = C.digits_config(**{'eval.feature_space': 'feature_net',
                                'eval.feature_net_dir': FLAGS.feature_net_dir,
                                'eval.reference_split': 'train',
                                'eval.reference_dir': os.path.join(FLAGS.feature_net_dir,
                                                                   'reference')})
    space = sample_quality.FeatureSpace(config.eval)
    rows = []
    test = split_images(config, 'test')
    train = split_images(config, 'train')
    cases = [('test split (held out)', test)]
    rng = np.random.default_rng(0)
    for n in (359, 500, 1000):
        for r in range(FLAGS.repeats):
            cases.append((f'train subset N={n} #{r}', train[rng.permutation(len(train))[:n]]))
    for name, images in cases:
        ref = sample_quality.reference_features(config, space, max_keep=len(images),
                                                folder=config.eval.reference_dir)
        m = sample_quality.sample_metrics(space(images), ref)
        rows.append(dict(images=name, **m))
        logging.info('%s: %s', name, m)
    C.write_table(FLAGS.workdir, 'fid_floor', rows, ['images', 'num_samples', 'fid',
                                                      'inception_score', 'precision', 'recall'],
                  header='Real digits scored like samples (feature-net space, vs the train split).')
    C.write_json(FLAGS.workdir, 'results.json', rows)


if __name__ == '__main__':
    app.run(main)
