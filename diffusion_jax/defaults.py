"""The defaults of the config sections the modes own, and where a run lives by default.

    config.sampling = defaults.default_sampling_config()   # configs/__init__.sampling_section
    config.eval = defaults.default_eval_config()           # configs/__init__.eval_section

Part of the run layer (with run.py, config_validation and train_state): the stored config of a run
trained before a field existed gets that field's default from here (run.with_mode_defaults), so
these live below the modes that read them (train, generate, evaluation). The old names
generate.default_sampling_config and evaluation.evaluate.default_eval_config re-export them.
"""
from __future__ import annotations

import os

import ml_collections

from diffusion_jax.evaluation.likelihood import ODE_ATOL, ODE_RTOL
from diffusion_jax.samplers.common import DEFAULT_LANGEVIN_STEPS, DEFAULT_SNR


def default_sampling_config() -> ml_collections.ConfigDict:
    """The `sampling` section of every experiment config."""
    c = ml_collections.ConfigDict()
    # One of samplers.METHODS: 'ancestral' (DDPM Alg. 2) | 'ddim' | 'langevin' | 'pc' |
    # 'dpmpp_2m' | 'dpmpp_3m' (DPM-Solver++, Lu et al. 2022) | 'unipc' (Zhao et al. 2023) |
    # 'heun' (EDM Alg. 1, Karras et al. 2022; 2K-1 network calls)
    c.method = 'ancestral'
    c.num_steps = ''  # respacing: '' = all T steps; '250' (even) or 'ddim50' (DDIM's stride)
    c.eta = 0.0  # DDIM's η: 0 deterministic, 1 the ancestral sampler with β̃ (Song et al. 2021)
    c.clip_denoised = True  # clip x̂_0 to [-1, 1] at every step (Ho et al.'s sampler)
    # Dynamic thresholding of x̂_0 (Saharia et al. 2022, Imagen, Sec. 2.3: p = 0.995): the
    # percentile p in [0, 1); 0 = off. Every method applies it before the clip.
    c.dynamic_threshold = 0.0
    c.num_samples = 64  # samples to draw: a grid to look at (FID-scale: eval.num_samples)
    c.checkpoint_step = -1  # which checkpoint to sample; -1: the latest valid one
    c.batch_size = 256  # global batch per sampler call; a multiple of the device count
    c.guidance_scale = 0.0  # classifier-free w: ε = (1+w) ε(x,y) - w ε(x,∅); 0 = conditional
    # Guidance rescale φ of Lin et al. 2023 (eq. 15-16; they use 0.7) for classifier-free
    # guidance: the guided output takes the conditional's std, mixed with weight φ; 0 = off.
    c.guidance_rescale = 0.0
    # Guidance interval (Kynkäänniemi et al. 2024): 'lo,hi' applies classifier-free guidance only
    # where σ lies in (lo, hi] (σ = √((1-ᾱ)/ᾱ); t/(1-t) for flow; σ for EDM; EDM2-XXL's is about
    # '0.28,1.61'), decided once per step from the step's current σ (both evaluations of a Heun
    # step, as the reference sampler); '' = guidance at every step.
    c.guidance_interval = ''
    # Autoguidance (Karras et al. 2024): guide with a weaker model of the same process and data
    # instead of the unconditional one: out = (1+w) out(x) - w out_weak(x) with w =
    # guidance_scale (Karras et al.'s weight is 1 + w). The workdir of the guide run: a smaller
    # and/or shorter-trained run (the paper's guide), or this run's own workdir with an early
    # guidance_model_step (the cheap variant); '' = off (guidance_scale is classifier-free).
    c.guidance_model_workdir = ''
    c.guidance_model_step = -1  # the guide's checkpoint; -1: its latest valid one
    # Classifier-free guidance of the first K mean-output channels only, the rest conditional;
    # 0 = every channel. DiT's sampler guides 3 of the 4 SD-VAE latent channels
    # (facebookresearch/DiT forward_with_cfg; its FID-50K 2.27 needs 3).
    c.guidance_channels = 0
    c.classifier_scale = 0.0  # classifier guidance s (Dhariwal & Nichol 2021); 0 = off
    # How classifier guidance composes with clipping in ddim, dpmpp_*, unipc and heun:
    # 'condition_score' (guided-diffusion: ε from the clipped x̂_0, shifted, guided x̂_0
    # unclipped) | 'eps_shift' (the shifted raw ε̂, then clip: DPM-Solver++'s reference and
    # diffusers') | 'auto': the method's reference (eps_shift for dpmpp_*/unipc, else
    # condition_score). Equal without clipping.
    c.ddim_guidance = 'auto'
    c.classifier_workdir = ''  # workdir of the noisy classifier run (its config.json + checkpoint)
    c.labels = ''  # class labels: '' random uniform, '3' all class 3, '0,1,2' cycled
    # Text runs (model.text_encoder): one prompt for every sample, or a file of prompts (one
    # per line, cycled over the samples); the negative prompt replaces the empty prompt as
    # classifier-free guidance's unconditional branch (as the Stable Diffusion pipelines do).
    c.prompt = ''  # text runs: one prompt for every sample, e.g. 'three and seven'
    c.prompts_file = ''  # text runs: a file of prompts, one per line, cycled over the samples
    c.negative_prompt = ''  # text runs: the unconditional branch's prompt ('' = the empty one)
    c.use_ema = True  # sample with the EMA parameters (Ho et al. 2020, App. B)
    c.progressive = False  # also write DDPM Fig. 6 (x̂_0 along the chain) and Fig. 7 (same x_t)
    c.progress_every = 0  # chain steps between Fig. 6 columns; 0 = K/10 (11 columns)
    c.interpolation = False  # also write DDPM (Fig. 8) and DDIM (Sec. 5.3) interpolation strips
    c.interpolation_t_frac = 0.5  # DDPM's interpolation depth t/T: t = 500 of 1000 (Fig. 8)
    c.interpolation_lambdas = 11  # λ = 0, 0.1, …, 1 (DDPM Fig. 8)
    # DDIM inversion for the interpolation strips: 'reference' (guided-diffusion's
    # ddim_reverse_sample, ε at the input's level, t -> t+1) | 'target_level' (ε_θ(x_{t-1}, t))
    c.inversion = 'reference'
    # EDM Algorithm 2's churn for method='heun' on diffusion.process='edm' or 'flow' (Karras et
    # al. 2022, Table 5): S_churn, 0 = deterministic (Algorithm 1).
    c.s_churn = 0.0
    c.s_tmin = 0.0  # churn only where σ >= S_tmin (σ for EDM, t/(1-t) for flow)
    c.s_tmax = float('inf')  # and σ <= S_tmax (inf: no upper bound)
    c.s_noise = 1.0  # S_noise: the std of the added noise relative to N(0, I)
    c.langevin_snr = DEFAULT_SNR  # r of the Langevin step (Song et al. 2021: 0.16)
    c.langevin_steps = DEFAULT_LANGEVIN_STEPS  # Langevin steps per level / per PC step
    c.seed = 0  # seeds x_T, the chain's noise and the random labels
    return c


def default_eval_config():
    """The `eval` section of every experiment config: CIFAR-10's protocol (Ho et al. 2020);
    the config files override what differs."""
    e = ml_collections.ConfigDict()
    e.split = 'test'  # the 10,000 CIFAR-10 test images (Ho et al. report test NLL)
    e.batch_size = 256  # global eval batch
    e.num_batches = 0  # 0: the whole split
    e.checkpoint_step = -1  # which checkpoint to evaluate; -1: the latest valid one
    e.use_ema = True  # evaluate the EMA parameters (Ho et al. 2020 report EMA results)
    e.nll = True  # the NLL bound in bits/dim (Ho et al. 2020, Table 1)
    e.nll_estimator = 'full'  # 'full': all T terms, as published | 'sampled' | 'importance': K terms per image
    e.nll_timesteps_per_image = 32  # K of the 'sampled' estimator
    # nll_estimator='ode': the probability-flow ODE likelihood (Song et al. 2021; score_sde's
    # likelihood.py defaults: RK45 = dopri5, rtol = atol = 1e-5, Rademacher probe, uniform
    # dequantisation). Not the bound: the exact likelihood of the ODE's density model.
    e.ode_solver = 'dopri5'  # 'dopri5' | 'tsit5' (adaptive) | 'heun' | 'euler' (fixed steps only)
    e.ode_rtol = ODE_RTOL  # relative tolerance of the adaptive step control
    e.ode_atol = ODE_ATOL  # absolute tolerance of the adaptive step control
    e.ode_num_steps = 0  # 0: adaptive; N > 0: N equal steps of ode_solver
    e.ode_hutchinson = 'rademacher'  # trace estimator probe: 'rademacher' | 'gaussian' | 'exact'
    e.ode_dequantization = 'uniform'  # 'uniform' (a bound on the discrete NLL) | 'none'
    e.sample_quality = False  # also FID / IS / precision-recall of sampled images
    e.num_samples = 50_000  # samples for FID (Ho et al. 2020, Sec. 4: 50k)
    e.samples_path = ''  # score this samples.npz (uint8 NHWC 'images') instead of sampling
    e.reference_split = 'train'  # FID reference statistics from this split (Ho et al.: train)
    e.reference_dir = ''  # where reference statistics are cached ('' = workdir/eval)
    e.feature_space = 'inception'  # 'inception' (FID proper) | 'feature_net' (MNIST-scale data)
    e.inception_weights = ''  # converted InceptionV3 weights (diffusion_jax.evaluation.inception)
    e.feature_net_dir = ''  # a trained feature net (diffusion_jax.evaluation.feature_net)
    return e


def default_workdir(config) -> str:
    return os.path.join('runs', config.get('name', 'run'))


def default_edit_config() -> ml_collections.ConfigDict:
    """The `edit` section (--mode=edit)."""
    c = ml_collections.ConfigDict()
    c.method = 'repaint'  # repaint (Lugmayr et al. 2022) | sdedit (Meng et al. 2022) | ddim_edit
    c.images = ''  # .npz with `images` uint8 [N, H, W, C] (and optionally `labels` [N])
    # repaint: the region to generate: right_half | left_half | top_half | center |
    # random:<fraction> | an .npz with `masks` [N or 1, H, W(, 1 or C)], 1 = keep
    c.mask = 'right_half'
    c.jump_length = 10  # repaint's j (Lugmayr et al. 2022, Sec. 5: j = 10); 1 with r = 1: none
    c.jump_n_sample = 10  # repaint's r, resamplings per jump (Lugmayr et al.: r = 10)
    c.strength = 0.5  # sdedit: t0/T in (0, 1] (Meng et al. 2022 use 0.3-0.6)
    c.sdedit_method = 'ancestral'  # from t0: ancestral | ddim (sampling.eta); flow/edm: ancestral | a solver
    c.target_label = -1  # ddim_edit / conditional runs: decode with this class; -1: the input's
    c.guidance_scale = -1.0  # ddim_edit decoder's classifier-free w; -1: sampling.guidance_scale
    c.num_steps = ''  # edit chain's respacing ('' = all T); flow/edm: grid K ('' = sampling.num_steps)
    c.batch_size = 64  # images per call (a multiple of the device count uses every device)
    c.seed = 0  # seeds the chain's noise and random masks
    return c
