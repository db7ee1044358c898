"""DDPM on CIFAR-10 as in Ho et al. 2020 ("Denoising Diffusion Probabilistic Models").

    python -m diffusion_jax.main --config=configs/cifar10.py
    python -m diffusion_jax.main --config=configs/cifar10.py:runlocal   # tiny, for a laptop

T = 1000 linear β from 1e-4 to 0.02, ε-prediction with L_simple, fixed variance (σ² = β, their
CIFAR-10 choice), the 35.7M-parameter UNet, Adam at 2e-4 with 5000 warm-up steps, batch 128,
gradient clipping at 1, EMA 0.9999, dropout 0.1, random horizontal flips, 800k steps.
Citations: Sec. 4 and Appendix B of the paper, and their released scripts/run_cifar.py.

This file is also the template of every other config: they start from it and override.
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
from configs import model_configs

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'cifar10')
    config = ml_collections.ConfigDict()
    config.name = 'cifar10'  # run name: the default workdir is runs/<name>
    # JAX's persistent compilation cache, so a second command does not compile again: 'auto' =
    # <user cache folder>/diffusion_jax/xla ($XDG_CACHE_HOME or ~/.cache), '' = off, or a folder.
    config.compile_cache_dir = 'auto'

    config.model = model_configs.ddpm_cifar10()  # 35,746,307 parameters (Ho et al., App. B)

    config.diffusion = d = ml_collections.ConfigDict()
    d.beta_schedule = 'linear'  # Ho et al. 2020, Sec. 4
    d.num_timesteps = 1000  # T = 1000 (Ho et al. 2020, Sec. 4)
    d.beta_start = 1e-4  # β_1 (Ho et al. 2020, Sec. 4)
    d.beta_end = 0.02  # β_T (Ho et al. 2020, Sec. 4)
    d.rescale_zero_terminal_snr = False  # True: rescale √ᾱ to ᾱ_T = 0 (Lin et al. 2023, Alg. 1; needs model_mean_type 'v')
    d.model_mean_type = 'eps'  # ε-prediction (Ho et al. 2020, Sec. 3.2)
    d.model_var_type = 'fixed_large'  # σ² = β_t, Ho et al.'s CIFAR-10 choice (run_cifar.py)
    d.loss_type = 'mse'  # L_simple (Ho et al. 2020, eq. 14)
    d.timestep_sampler = 'uniform'  # t ~ U{1..T} (Ho et al. 2020, Algorithm 1)
    d.process = 'gaussian'  # 'gaussian' (this DDPM family) | 'flow' | 'edm' (diffusion_jax.processes)
    d.loss_weighting = 'none'  # 'min_snr': min-SNR-γ (Hang et al. 2023), gaussian + loss_type 'mse'
    d.min_snr_gamma = 5.0  # γ of min-SNR (Hang et al. 2023, Sec. 4: γ = 5)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'cifar10'  # tfds name, or 'digits' | 'swissroll' (embedded)
    data.source = 'tfds'  # 'tfds' | 'idx' (embedded datasets ignore it)
    data.data_dir = ''  # tfds data_dir ('' = tfds default ~/tensorflow_datasets)
    data.download = False  # let tfds download and prepare (needs internet and TensorFlow)
    data.image_size = 32  # CIFAR-10 is 32x32
    data.channels = 3  # RGB
    data.crop_size = 0  # centre crop side before resizing (0: the shorter side)
    data.num_classes = 10  # labels read with the images (the model is unconditional here)
    data.random_flip = True  # random horizontal flips (Ho et al. 2020, App. B)
    data.train_split = 'train'  # 50,000 training images
    data.prefetch = 2  # batches prepared ahead in a background thread
    data.num_workers = 0  # threads decoding/resizing each batch (tfds, idx); 0: the prefetch thread alone

    config.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global batch (Ho et al. 2020, App. B)
    t.num_train_steps = 800_000  # Ho et al. 2020, App. B: CIFAR-10 trained for 800k steps
    t.log_every_steps = 100  # metrics to the log, TensorBoard and metrics.jsonl
    t.checkpoint_every_steps = 10_000  # periodic async checkpoints (also at the end)
    t.keep_checkpoints = 3  # how many of the latest checkpoints to keep
    t.sample_every_steps = 50_000  # EMA sample grid into samples/<step>/ (0: never)
    t.num_sample_images = 64  # images in each periodic grid
    t.ema_decay = 0.9999  # Ho et al. 2020, App. B
    t.seed = 0  # seeds init, data order, t, noise and dropout
    t.label_dropout = 0.0  # P(y -> null label) for classifier-free guidance (conditional models)
    # P(caption -> the empty prompt) for classifier-free guidance of text runs (model.text_encoder)
    t.caption_dropout = 0.0
    # Non-finite loss/gradient: 0 stops the run at that step; N > 0 skips up to N such updates
    # (params, EMA and optimiser left unchanged) and stops at the (N+1)-th.
    t.skip_nonfinite_steps = 0
    # Train steps per jitted call (a lax.scan, as VDM does): K > 1 saves K - 1 dispatches per
    # call where they dominate (small models, CPU); the loop acts between calls, so
    # num_train_steps and the log/checkpoint/sample cadences must be multiples of K.
    t.steps_per_call = 1
    # Gradient accumulation: the step computes the gradient `microbatch` examples at a time (a
    # lax.scan inside the jitted step; equal to the whole batch's up to float32 summation
    # order), so a batch whose activations do not fit still trains. A divisor of batch_size
    # and a multiple of the device count; 0 = the whole batch at once.
    t.microbatch = 0
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): with probability 1/2 the network also
    # gets a first pass's stop-gradient x̂_0 as extra input channels (model.in_channels = 2·C,
    # derived); samplers feed the previous step's x̂_0. False: the plain network.
    t.self_condition = False

    config.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-4  # Ho et al. 2020, App. B (2e-4 for 32x32 images)
    o.warmup_steps = 5000  # linear warm-up from 0 (Ho et al., run_cifar.py: warmup=5000)
    o.grad_clip = 1.0  # global-norm clipping (Ho et al., run_cifar.py: grad_clip=1.); 0 = off
    o.b1 = 0.9  # Adam β1 (TF's default, which Ho et al. used)
    o.b2 = 0.999  # Adam β2 (TF's default)
    o.eps = 1e-8  # Adam ε (TF's default)
    o.weight_decay = 0.0  # decoupled weight decay (AdamW); 0 = plain Adam

    config.sharding = ml_collections.ConfigDict()
    # Mesh ('data', 'fsdp') of shape (devices / N, N); the batch is split over all devices.
    config.sharding.fsdp = 1  # FSDP: params/EMA/optimiser state split over N devices; 1 = replicated

    config.sampling = configs.sampling_section()  # see diffusion_jax/generate.py

    config.eval = configs.eval_section()  # see configs/__init__.py

    if 'runlocal' in options:
        configs.shrink_for_local(config)
    return config
