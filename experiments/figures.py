"""DDPM Figs. 6, 7, 8 and DDIM's slerp interpolation from the trained digits model.

    python experiments/figures.py --workdir=runs/exp_figures [--scale=cpu|full]
        [--model_workdir=runs/exp_digits_model]

Runs diffusion_jax.generate.run_sampling with sampling.progressive and sampling.interpolation on a
copy of the model's checkpoint and config (so the shared model workdir is left untouched), then
copies the figures (already enlarged by the library; --zoom > 1 enlarges them further) here:
  progressive.png        DDPM Fig. 6: x̂_0 predicted along the reverse chain (left: t = T-1)
  same_xt.png            DDPM Fig. 7: each row one x_t (t = 3T/4, T/2, T/4), then 7 draws of p(x_0|x_t)
  interpolation_ddpm.png DDPM Fig. 8: q(x_t|x_0) of two samples at t = T/2, linear mix, decode
  interpolation_ddim.png DDIM Sec. 5.3: DDIM-encode to x_T, slerp, decode deterministically
  samples.png            a grid of ancestral samples
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
from absl import app, flags, logging

import exp_common as C

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/exp_figures', 'Where the figures go.')
flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'cpu: 100 samples; full: 1,000 (more grid).')
flags.DEFINE_string('model_workdir', C.DEFAULT_MODEL_WORKDIR, 'The trained default digits run.')
flags.DEFINE_integer('zoom', 1, 'Further nearest-neighbour enlargement of the PNGs (1: copy).')

FIGURES = ('progressive.png', 'same_xt.png', 'interpolation_ddpm.png', 'interpolation_ddim.png',
           'samples.png')


def enlarge(src, dst, zoom):
    if zoom == 1:
        shutil.copy(src, dst)
        return
    from PIL import Image  # pylint: disable=import-outside-toplevel  (a matplotlib dependency)
    im = Image.open(src)
    im.resize((im.width * zoom, im.height * zoom), Image.NEAREST).save(dst)


def main(_):
    from diffusion_jax import generate  # pylint: disable=import-outside-toplevel
    out = FLAGS.workdir
    config = C.digits_config()
    C.ensure_trained(config, FLAGS.model_workdir)
    model_copy = os.path.join(out, 'model')
    if not os.path.exists(model_copy):
        os.makedirs(model_copy)
        shutil.copy(os.path.join(FLAGS.model_workdir, 'config.json'), model_copy)
        shutil.copytree(os.path.join(FLAGS.model_workdir, 'checkpoints'),
                        os.path.join(model_copy, 'checkpoints'))
    with config.unlocked():
        s = config.sampling
        s.num_samples = {'cpu': 100, 'full': 1000}[FLAGS.scale]
        s.batch_size = 50
        s.progressive = True
        s.interpolation = True
        s.method = 'ancestral'
        s.seed = 0
    start = time.time()
    folder = generate.run_sampling(config, model_copy)
    seconds = time.time() - start
    written = []
    for name in FIGURES:
        src = os.path.join(folder, name)
        if os.path.exists(src):
            enlarge(src, os.path.join(out, name), FLAGS.zoom)
            written.append(name)
    C.write_json(out, 'results.json', dict(figures=written, seconds=round(seconds, 1),
                                           folder=folder, device=C.device_note(),
                                           sampling=config.sampling.to_dict()))
    logging.info('figures %s in %s (%.0fs)', written, out, seconds)


if __name__ == '__main__':
    app.run(main)
