"""--mode=sample computes only what was asked: the last (or only) batch is sized to the samples
still needed, rounded up to the device count (8 fake CPU devices), not sampling.batch_size."""
import os
import pathlib
import sys

import numpy as np
import pytest

from configs import model_configs
from diffusion_jax import config_validation, generate
from diffusion_jax.samplers import batches, chain

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_generate import _config, random_params  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import


@pytest.mark.parametrize('num_samples, batch, devices, sizes', [
    (4, 256, 8, [8]), (8, 256, 8, [8]), (1, 256, 1, [1]), (256, 256, 8, [256]),
    (300, 256, 8, [256, 48]), (513, 256, 8, [256, 256, 8]), (20, 16, 8, [16, 8]),
])
def test_batch_sizes(num_samples, batch, devices, sizes):
    assert batches.batch_sizes(num_samples, batch, devices) == sizes


@pytest.mark.parametrize('num_samples, shapes', [(4, [8]), (20, [16, 8])])
def test_sample_mode_draws_only_what_is_needed(tmp_path, random_params, monkeypatch,  # noqa: F811
                                               num_samples, shapes):
    drawn = []
    original = chain.sample

    def recording(diffusion, model_fn, rng, shape, **kwargs):
        drawn.append(shape[0])
        return original(diffusion, model_fn, rng, shape, **kwargs)
    monkeypatch.setattr(chain, 'sample', recording)
    config = _config(model_configs.swissroll_mlp(hidden_dim=16, num_layers=1),
                     method='ddim', num_steps='ddim4', num_samples=num_samples, batch_size=16)
    config.data.update(dataset='swissroll', source='embedded', image_size=0, channels=0)
    folder = generate.run_resolved(config_validation.resolve(config, 'sample'), str(tmp_path))
    assert drawn == shapes
    with np.load(os.path.join(folder, 'samples.npz')) as f:
        assert f['points'].shape == (num_samples, 2) and np.isfinite(f['points']).all()
