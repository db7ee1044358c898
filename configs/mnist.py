"""DDPM on MNIST (LeCun et al. 1998) from tfds: 70,000 28x28 grey handwritten digits.

    python -m diffusion_jax.main --config=configs/mnist.py --config.data.data_dir=DIR

Needs a prepared tfds `mnist` (`pip install diffusion_jax[tf] && tfds build mnist
--file_format=array_record`); the same original IDX files also work with data.source='idx'
and data.data_dir pointing at them. Model and training as configs/fashion_mnist.py.
"""
from __future__ import annotations

import pathlib
import sys

import ml_collections

try:
    import configs
except ImportError:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import configs
from configs import fashion_mnist

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'mnist')
    config = fashion_mnist.get_config('runlocal' if 'runlocal' in options else None)
    config.name = 'mnist'  # run name: the default workdir is runs/mnist
    config.data.dataset = 'mnist'  # tfds name
    config.data.source = 'tfds'  # 'tfds' | 'idx' (the original MNIST files in data_dir)
    config.data.data_dir = ''  # '' = tfds's default data_dir
    return config
