"""The noisy-image classifier trains through the same loop (cross-entropy on x_t ~ q(x_t|x_0)),
and its run is what classifier-guided sampling loads."""
import json
import os

import jax
import numpy as np
import pytest

from configs import digits_classifier
from diffusion_jax import generate, train


pytestmark = pytest.mark.usefixtures('fast_compiles')


def test_classifier_learns_and_guides_sampling(tmp_path):
    c = digits_classifier.get_config()
    c.model.update(ch_mult=(1,), attn_resolutions=(), resblock_updown=False)
    c.diffusion.update(num_timesteps=20, beta_start=5e-3, beta_end=0.3)
    c.training.update(batch_size=64, num_train_steps=60, log_every_steps=20,
                      checkpoint_every_steps=60)
    c.optim.update(learning_rate=3e-3, weight_decay=0.0)
    workdir = str(tmp_path / 'clf')
    train.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    first, last = rows[0], rows[-1]
    assert np.isfinite(last['loss']) and last['loss'] < first['loss']
    # Better than chance (0.1) on noisy digits after 60 steps, averaged over all noise levels.
    assert last['accuracy'] > 0.3, rows
    assert not os.path.exists(os.path.join(workdir, 'samples'))  # a classifier draws nothing

    # The guided sampler loads this run's classifier from its workdir.
    c.sampling.update(classifier_workdir=workdir, classifier_scale=1.0)
    grad_fn, num_classes = generate._load_classifier(c)  # pylint: disable=protected-access
    assert num_classes == 10
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    grad = grad_fn(x, jax.numpy.array([0, 5, 10, 19]), jax.numpy.array([0, 1, 2, 3]))
    assert grad.shape == x.shape and bool(jax.numpy.all(jax.numpy.isfinite(grad)))
