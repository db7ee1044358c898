"""Shared helpers of the experiment scripts (issue 6): configs, training, NLL, feature-net FID, tables.

Every script writes into its --workdir: a table (<name>.md + <name>.csv), figures (*.png) and a
results.json. Trained models are reused when their workdir already holds the final checkpoint, so a
script can be re-run (or pointed at an existing run with --model_workdir) without retraining.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from diffusion_jax import checkpointing, generate, image_utils, run, sharding  # noqa: E402
from diffusion_jax.evaluation import evaluate, sample_quality  # noqa: E402

# Where the shared digits artefacts live unless a flag says otherwise.
DEFAULT_MODEL_WORKDIR = 'runs/exp_digits_model'  # the default configs/digits.py run, shared by 1, 2, 5
DEFAULT_FEATURE_NET_DIR = 'runs/exp_feature_net'  # python -m diffusion_jax.evaluation.feature_net


def digits_config(**overrides):
    """configs/digits.py with dotted overrides, e.g. {'diffusion.loss_type': 'kl'}."""
    from configs import digits  # pylint: disable=import-outside-toplevel
    config = digits.get_config()
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split('.')
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def ensure_trained(config, workdir: str) -> float:
    """Trains config in workdir unless its final checkpoint is there; returns the seconds spent."""
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    if checkpointing.latest_step(workdir) == config.training.num_train_steps:
        logging.info('reusing the trained run in %s', workdir)
        return 0.0
    start = time.time()
    train.train_and_evaluate(config, workdir)
    return time.time() - start


def ensure_feature_net(folder: str) -> None:
    from diffusion_jax.evaluation import feature_net  # pylint: disable=import-outside-toplevel
    if not os.path.exists(os.path.join(folder, feature_net.META_FILE)):
        subprocess.run([sys.executable, '-m', 'diffusion_jax.evaluation.feature_net',
                        '--dataset=digits', f'--out={folder}'], check=True, cwd=ROOT)


def test_nll(config, workdir: str, estimator: str = 'full') -> tuple[dict, float]:
    """The NLL bound (bits/dim) of config.eval.split, with its parts; and the seconds it took."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.eval.nll = True
        config.eval.sample_quality = False
        config.eval.nll_estimator = estimator
    start = time.time()
    result = evaluate.run_eval(config, workdir)['nll']
    return result, time.time() - start


class SampleScorer:
    """Feature-net FID / IS / precision / recall of a run's samples under many sampler settings."""

    def __init__(self, config, workdir: str, feature_net_dir: str, reference_dir: str):
        ensure_feature_net(feature_net_dir)
        self.config = config.copy_and_resolve_references()
        with self.config.unlocked():
            self.config.eval.feature_space = 'feature_net'
            self.config.eval.feature_net_dir = feature_net_dir
            self.config.eval.reference_split = 'train'
            self.config.eval.reference_dir = reference_dir
        self.mesh = sharding.make_mesh()
        loaded = run.load(workdir, self.config, use_ema=True, mesh=self.mesh)
        self.config, self.step, self.variables = loaded.config, loaded.step, loaded.variables
        self.space = sample_quality.FeatureSpace(self.config.eval)

    def score(self, num_samples: int, batch_size: int = 250, grid_path: str | None = None,
              **sampling) -> dict:
        """sampling: fields of config.sampling (method, num_steps, eta, seed, ...)."""
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            for k, v in sampling.items():
                config.sampling[k] = v
            config.sampling.batch_size = batch_size
        start = time.time()
        samples, _ = generate.draw_samples(config, self.variables, self.mesh, num_samples)
        seconds = time.time() - start
        images = image_utils.to_uint8(samples)
        ref = sample_quality.reference_features(config, self.space, max_keep=num_samples,
                                                folder=config.eval.reference_dir)
        result = sample_quality.sample_metrics(self.space(images), ref)
        if grid_path:
            image_utils.save_grid(grid_path, images[:64])
        return dict(result, sample_seconds=round(seconds, 1))


def write_table(folder: str, name: str, rows: list[dict], columns: list[str],
                header: str = '') -> str:
    """Writes folder/name.csv and folder/name.md; returns the markdown."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{name}.csv'), 'w', newline='', encoding='utf-8') as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, '') for c in columns})

    def fmt(v):
        if isinstance(v, float):
            if v != 0 and abs(v) < 0.01:
                return f'{v:.1e}'
            return f'{v:.3f}' if abs(v) < 1000 else f'{v:.0f}'
        return str(v)
    lines = ([header, ''] if header else []) + ['| ' + ' | '.join(columns) + ' |',
                                               '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |' for r in rows]
    md = '\n'.join(lines) + '\n'
    with open(os.path.join(folder, f'{name}.md'), 'w', encoding='utf-8') as f:
        f.write(md)
    return md


def write_json(folder: str, name: str, obj) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, 'item') else str(o))


def device_note() -> str:
    return f'{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores'


__all__ = ['digits_config', 'ensure_trained', 'ensure_feature_net', 'test_nll', 'SampleScorer',
           'write_table', 'write_json', 'device_note', 'np']
