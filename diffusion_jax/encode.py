"""Encodes a dataset once with a trained autoencoder: the latent cache of a latent run.

    python -m diffusion_jax.encode --workdir=runs/digits_vae \
        --config=configs/digits_latent_dit.py --out=runs/digits_vae/latents_train.npz
    python -m diffusion_jax.main --config=configs/digits_latent_dit.py \
        --config.data.latents_cache=runs/digits_vae/latents_train.npz

Writes (atomically) an .npz with, for every example of the split in order, the posterior's
`mean` and `logvar` [N, h, w, c] float32 (unscaled: training applies s and draws ε each step,
latents.make_batch_encoder(from_cache=True), so a cached run sees the same law of batches as one
encoding on the fly) and `label` [N] int32. It prints the std of the means and 1/std, LDM's
choice of the scale factor s (Rombach et al. 2022, App. G: data.latent_scale). Single process.
--workdir must be an autoencoder run (model.name='autoencoder'); --config gives the data section
(dataset, split) that the latent run trains on; its data.latents is ignored here.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when this module runs as the program: importing it as a
    library (encode_dataset) next to diffusion_jax.main, whose --config/--workdir share these
    names in absl's one global registry, must not define them twice."""
    config_flags.DEFINE_config_file('config', None, 'The latent run\'s config (its data section).',
                                    lock_config=True)
    flags.DEFINE_string('workdir', None, 'The autoencoder run (a workdir or a converted preset).')
    flags.DEFINE_string('out', None, 'The .npz to write.')
    flags.DEFINE_string('split', None, 'Which split (default: the config\'s data.train_split).')
    flags.DEFINE_integer('batch_size', 256, 'Images per encoder call.')


def encode_dataset(workdir: str, data_config, out: str, split: str | None = None,
                   batch_size: int = 256) -> dict:
    """Encodes data_config's split with the autoencoder run in workdir and writes `out`;
    returns {'num_examples', 'latent_shape', 'std', 'inverse_std'} (of the means).
    Nothing is written when the workdir is not an autoencoder run (ValueError)."""
    # pylint: disable=import-outside-toplevel
    import jax
    import numpy as np
    from diffusion_jax import image_utils, input_pipeline, latents
    if not out or not out.endswith('.npz'):
        raise ValueError(f'--out={out!r}: give the path of the .npz to write (…/latents.npz).')
    ae = latents.load(workdir)
    split = split or data_config.train_split
    ds = input_pipeline.get_dataset(data_config, split)
    moments = jax.jit(lambda v, x: ae.model.apply(v, x, method='encode'))
    means, logvars, labels = [], [], []
    for batch in input_pipeline.eval_iterator(ds, batch_size):
        keep = batch['mask']
        mean, logvar = jax.device_get(moments(ae.variables, batch['image']))
        means.append(mean[keep])
        logvars.append(logvar[keep])
        labels.append(batch['label'][keep])
    mean, logvar = np.concatenate(means), np.concatenate(logvars)
    image_utils.save_npz(out, mean=mean, logvar=logvar, label=np.concatenate(labels))
    std = float(np.std(mean))
    return dict(num_examples=len(mean), latent_shape=tuple(mean.shape[1:]), std=std,
                inverse_std=1.0 / std)


def main(argv) -> int:
    del argv
    if FLAGS.config is None or not FLAGS.workdir:
        raise ValueError('--config=FILE (the latent run\'s) and --workdir=AUTOENCODER are needed.')
    stats = encode_dataset(FLAGS.workdir, FLAGS.config.data, FLAGS.out, FLAGS.split,
                           FLAGS.batch_size)
    logging.info('wrote %s: %d latents of shape %s; std of the means %.4f (LDM\'s scale '
                 'factor 1/std = %.4f: data.latent_scale)', FLAGS.out, stats['num_examples'],
                 stats['latent_shape'], stats['std'], stats['inverse_std'])
    return 0


def _run(argv):
    try:
        return main(argv)
    except ValueError as e:
        if FLAGS.verbosity >= 1:
            raise
        print(f'error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    _define_flags()
    app.run(_run)
