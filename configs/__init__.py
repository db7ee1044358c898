"""Experiment configs: one file per experiment, each a plain `get_config(arg=None)`.

    python -m diffusion_jax.main --config=configs/digits.py
    python -m diffusion_jax.main --config=configs/cifar10.py:runlocal --config.training.seed=1

`arg` (the text after ':') is a comma-separated list of options a file documents, e.g.
'runlocal' (shrink everything for a laptop) or 'vlb'. The helpers below are shared by the files.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, allowed: tuple[str, ...], config_name: str) -> set[str]:
    """'a,b' -> {'a', 'b'}; an option the file does not offer is an error naming them."""
    options = {a.strip() for a in (arg or '').split(',') if a.strip()}
    unknown = sorted(options - set(allowed))
    if unknown:
        raise ValueError(f'{config_name}: unknown config argument(s) {unknown}; this file offers '
                         f'{list(allowed)} (e.g. --config=configs/{config_name}.py:'
                         f'{allowed[0] if allowed else ""}).')
    return options


def sampling_section() -> ml_collections.ConfigDict:
    """The `sampling` section: the sampler defaults of diffusion_jax.defaults."""
    from diffusion_jax import defaults  # pylint: disable=import-outside-toplevel
    return defaults.default_sampling_config()


def eval_section() -> ml_collections.ConfigDict:
    """The `eval` section: the evaluation defaults of diffusion_jax.defaults."""
    from diffusion_jax import defaults  # pylint: disable=import-outside-toplevel
    return defaults.default_eval_config()


def shrink_for_local(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """runlocal: a tiny UNet, a small batch and a few steps, to test a setup on a laptop CPU."""
    model = config.model
    # At most 32x32 pixels (the pipeline resizes), so even the LSUN config runs on a laptop.
    model.image_size = config.data.image_size = min(config.data.image_size, 32)
    model.ch = 32  # GroupNorm's 32 groups need at least 32 channels
    model.ch_mult = (1, 2)  # two levels
    model.num_res_blocks = 1
    model.attn_resolutions = (model.image_size // 2,)  # attention at the lower level only
    model.num_heads, model.num_head_channels = 1, 0
    config.training.batch_size = 8
    config.training.num_train_steps = 20
    config.training.log_every_steps = 5
    config.training.checkpoint_every_steps = 10
    config.training.sample_every_steps = 20
    config.training.num_sample_images = 4
    config.optim.warmup_steps = 0
    config.eval.batch_size = 8
    config.eval.num_batches = 1
    return config
