"""Configs of the published checkpoints that `python -m diffusion_jax.convert` imports.

    python -m diffusion_jax.convert --from=improved-diffusion --preset=cifar10_uncond_50M_500K \
        --src=cifar10_uncond_50M_500K.pt --workdir=runs/cifar10_uncond_50M_500K
    python -m diffusion_jax.main --config=configs/pretrained.py:64x64_diffusion   # fine-tune

Each preset is the network, the diffusion (T, schedule, variance type, loss) and the sampling
defaults of the paper, with the flags of the released code cited:
  improved-diffusion README (Nichol & Dhariwal 2021): cifar10_uncond_50M_500K (L_hybrid),
    cifar10_uncond_vlb_50M_500K (L_vlb), imagenet64_uncond_100M_1500K (L_hybrid); their
    script_util defaults: num_heads=4, attention_resolutions=16,8, use_scale_shift_norm=True,
    rescale_timesteps=True (the network sees t·1000/T, here timestep_scale=1000/T).
  guided-diffusion README (Dhariwal & Nichol 2021): 64x64_diffusion, 128x128_diffusion,
    256x256_diffusion_uncond, 64x64_classifier, 256x256_classifier; sampling with
    --timestep_respacing 250 and the README's --classifier_scale.
  Ho et al. 2020, in diffusers' UNet2DModel layout (google/ddpm-cifar10-32): ddpm_cifar10_32.
  facebookresearch/DiT README (Peebles & Xie 2023): DiT-XL-2-256, DiT-XL-2-512 (class-conditional
    ImageNet on SD-VAE latents, 32x32x4 and 64x64x4; sample.py: 250 DDPM steps, --cfg-scale 4.0
    for pictures, 1.5 for the paper's FID-50K 2.27 at 256).
  Stable Diffusion's KL-f8 autoencoder in diffusers' AutoencoderKL layout (stabilityai/
    sd-vae-ft-ema, sd-vae-ft-mse; Rombach et al. 2022): sd_vae, the latent space of DiT.
OpenAI's GroupNorm32 is torch.nn.GroupNorm (ε = 1e-5) and pads its stride-2 convs by 1; Ho et
al.'s TF code uses ε = 1e-6 and 'SAME' padding ((0, 1) for stride 2), as does the diffusers port.
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
from configs import cifar10, model_configs

# torch.nn.GroupNorm's default ε, the GroupNorm32 of improved-/guided-diffusion.
TORCH_GROUPNORM_EPSILON = 1e-5
# Sampling steps of ADM's reported results (guided-diffusion README: --timestep_respacing 250).
ADM_SAMPLING_STEPS = '250'
# The guided-diffusion README's --classifier_scale for each model with its classifier. Not set
# as the preset's sampling.classifier_scale, so that a converted run samples with no flags; pass
# --config.sampling.classifier_scale=S --config.sampling.classifier_workdir=CLASSIFIER_RUN.
PAPER_CLASSIFIER_SCALE = {
    '64x64_diffusion': 1.0,  # with 64x64_classifier
    '128x128_diffusion': 0.5,  # with a 128x128 classifier (not among these presets)
    '256x256_diffusion_uncond': 10.0,  # with 256x256_classifier
}

# preset -> (checkpoint layout the converter reads, builder)
SOURCES = {
    'cifar10_uncond_50M_500K': 'improved-diffusion',
    'cifar10_uncond_vlb_50M_500K': 'improved-diffusion',
    'imagenet64_uncond_100M_1500K': 'improved-diffusion',
    '64x64_diffusion': 'guided-diffusion',
    '64x64_classifier': 'guided-diffusion',
    '256x256_diffusion_uncond': 'guided-diffusion',
    '256x256_classifier': 'guided-diffusion',
    '128x128_diffusion': 'guided-diffusion',
    'ddpm_cifar10_32': 'diffusers',
    'DiT-XL-2-256': 'dit',
    'DiT-XL-2-512': 'dit',
    'sd_vae': 'diffusers',
}
PRESETS = tuple(SOURCES)
OPTIONS = PRESETS  # `--config=configs/pretrained.py:NAME`
DEFAULT_PRESET = 'ddpm_cifar10_32'  # without a NAME: Ho et al.'s CIFAR-10 model


def _improved_unet(image_size: int, ch_mult, num_res_blocks: int, dropout: float,
                   num_timesteps: int) -> ml_collections.ConfigDict:
    m = model_configs.improved_ddpm_cifar10()
    m.image_size = image_size
    m.ch = 128  # --num_channels 128 (improved-diffusion README)
    m.ch_mult = tuple(ch_mult)  # improved-diffusion script_util.create_model, by image size
    m.num_res_blocks = num_res_blocks  # --num_res_blocks 3
    m.dropout = dropout  # --dropout 0.3 (CIFAR-10), default 0.0 (ImageNet-64)
    m.attn_resolutions = (16, 8)  # script_util default attention_resolutions "16,8"
    m.num_heads = 4  # script_util default num_heads=4 (num_heads_upsample=-1: the same)
    m.out_channels = 6  # --learn_sigma True
    m.norm_epsilon = TORCH_GROUPNORM_EPSILON
    m.qkv_order = 'legacy'  # improved-diffusion's QKVAttention splits per head
    m.timestep_scale = 1000.0 / num_timesteps  # rescale_timesteps=True
    return m


def _adm_unet(image_size: int, ch: int, ch_mult, num_res_blocks: int, dropout: float,
              num_classes: int, qkv_order: str, num_heads: int = 0,
              num_head_channels: int = 64) -> ml_collections.ConfigDict:
    m = model_configs.improved_ddpm_cifar10()
    m.image_size = image_size
    m.ch = ch  # --num_channels
    m.ch_mult = tuple(ch_mult)  # guided-diffusion script_util.create_model, by image size
    m.num_res_blocks = num_res_blocks  # --num_res_blocks
    m.attn_resolutions = (32, 16, 8)  # --attention_resolutions 32,16,8
    m.dropout = dropout  # --dropout (0.1 at 64x64, else the default 0.0)
    m.num_heads = num_heads  # --num_heads (128x128: 4), else unset
    m.num_head_channels = num_head_channels  # --num_head_channels 64, or -1 (unset: 0 here)
    m.use_scale_shift_norm = True  # --use_scale_shift_norm True
    m.resblock_updown = True  # --resblock_updown True
    m.num_classes = num_classes  # --class_cond True: 1000 ImageNet classes (+ our null row)
    m.out_channels = 6  # --learn_sigma True
    m.norm_epsilon = TORCH_GROUPNORM_EPSILON
    m.qkv_order = qkv_order  # --use_new_attention_order True -> 'new', default -> 'legacy'
    return m


def _adm_classifier(image_size: int, depth: int) -> ml_collections.ConfigDict:
    # classifier_defaults: width 128, attention "32,16,8", attention pool, scale-shift norm,
    # resblock_updown; create_classifier: num_head_channels=64, legacy qkv order.
    return model_configs.adm_classifier(
        image_size, num_classes=1000, num_res_blocks=depth,  # --classifier_depth
        attn_resolutions=(32, 16, 8), norm_epsilon=TORCH_GROUPNORM_EPSILON, qkv_order='legacy')


# Peebles & Xie 2023: latents of the Stable Diffusion VAE, which downsamples by 8 to 4 channels.
SD_VAE_DOWNSAMPLE = 8
SD_VAE_LATENT_CHANNELS = 4
# DiT's LabelEmbedder class_dropout_prob (Peebles & Xie 2023, Sec. 3.1: CFG training).
DIT_LABEL_DROPOUT = 0.1
# DiT's sample.py --cfg-scale default (pictures); the paper's FID-50K uses 1.5 (Table 4).
DIT_CFG_SCALE = 4.0


def _dit(config, image_size: int) -> None:
    """DiT-XL/2 at image_size pixels, on SD-VAE latents of image_size / 8 (DiT's models.py).

    Diffusion: improved DDPM's linear schedule, T = 1000, learned Σ, L_hybrid (DiT's
    diffusion/__init__.py create_diffusion defaults with learn_sigma=True). Training (Peebles &
    Xie 2023, Sec. 4): AdamW at a constant 1e-4, no warm-up, no gradient clipping, batch 256,
    class dropout 0.1. Sampling (sample.py): 250 steps; DiT's guidance scale s mixes
    ε_u + s(ε_c - ε_u), ours is w in (1 + w) ε_c - w ε_u, so w = s - 1 (DiT's own sampler guides
    only the first 3 of the 4 latent channels; here all 4 are). The network sees latents: until
    latent data (config.data.latents) exists, the data section describes the latent tensors
    (image_size / 8, 4 channels) so that the model's size derives from it.
    """
    latent = image_size // SD_VAE_DOWNSAMPLE
    config.model = model_configs.dit('DiT-XL/2', image_size=latent,
                                     in_channels=SD_VAE_LATENT_CHANNELS, num_classes=1000)
    _diffusion(config, 'linear', 1000, 'learned_range', 'hybrid')
    _imagenet(config, image_size)
    config.data.image_size = latent
    config.data.channels = SD_VAE_LATENT_CHANNELS
    config.training.label_dropout = DIT_LABEL_DROPOUT
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    config.training.batch_size = 256
    config.sampling.num_steps = ADM_SAMPLING_STEPS
    config.sampling.guidance_scale = DIT_CFG_SCALE - 1.0
    config.sampling.clip_denoised = False  # DiT's sample.py: latents are not in [-1, 1]


def _diffusion(config, schedule: str, num_timesteps: int, var_type: str, loss: str):
    d = config.diffusion
    d.beta_schedule = schedule  # --noise_schedule
    d.num_timesteps = num_timesteps  # --diffusion_steps
    if schedule == 'cosine':
        d.beta_start = d.beta_end = None
        d.cosine_s = 0.008  # Nichol & Dhariwal 2021, Sec. 3.2
    d.model_mean_type = 'eps'  # predict_xstart=False
    d.model_var_type = var_type  # learn_sigma -> learned_range; Ho et al.: fixed_large
    d.loss_type = loss  # L_hybrid | use_kl -> rescaled_kl | L_simple
    d.timestep_sampler = 'loss_aware' if loss == 'rescaled_kl' else 'uniform'


def _imagenet(config, image_size: int) -> None:
    data = config.data
    data.dataset = 'imagenet_resized/64x64' if image_size == 64 else 'imagenet2012'
    data.image_size = image_size
    data.num_classes = 1000
    data.random_flip = False
    config.eval.split = 'validation'
    config.eval.batch_size = 64


def preset_config(name: str) -> ml_collections.ConfigDict:
    """The full experiment config of a published checkpoint (see the module docstring)."""
    if name not in SOURCES:
        raise ValueError(f'preset={name!r} is not a known checkpoint: use one of {list(PRESETS)}.')
    config = cifar10.get_config()
    config.name = name
    s = config.sampling
    if name in ('cifar10_uncond_50M_500K', 'cifar10_uncond_vlb_50M_500K'):
        config.model = _improved_unet(32, (1, 2, 2, 2), 3, 0.3, 4000)
        vlb = name == 'cifar10_uncond_vlb_50M_500K'  # --use_kl True, loss-second-moment sampler
        _diffusion(config, 'cosine', 4000, 'learned_range', 'rescaled_kl' if vlb else 'hybrid')
        config.optim.learning_rate = 1e-4  # --lr 1e-4
    elif name == 'imagenet64_uncond_100M_1500K':
        config.model = _improved_unet(64, (1, 2, 3, 4), 3, 0.0, 4000)
        _diffusion(config, 'cosine', 4000, 'learned_range', 'hybrid')
        _imagenet(config, 64)
        config.data.num_classes = 0  # unconditional
        config.optim.learning_rate = 1e-4
    elif name == '64x64_diffusion':
        config.model = _adm_unet(64, 192, (1, 2, 3, 4), 3, 0.1, 1000, 'new')
        _diffusion(config, 'cosine', 1000, 'learned_range', 'hybrid')
        _imagenet(config, 64)
        s.num_steps = ADM_SAMPLING_STEPS
    elif name == '128x128_diffusion':
        config.model = _adm_unet(128, 256, (1, 1, 2, 3, 4), 2, 0.0, 1000, 'legacy', num_heads=4,
                                 num_head_channels=0)
        _diffusion(config, 'linear', 1000, 'learned_range', 'hybrid')
        _imagenet(config, 128)
        s.num_steps = ADM_SAMPLING_STEPS
    elif name == '256x256_diffusion_uncond':
        config.model = _adm_unet(256, 256, (1, 1, 2, 2, 4, 4), 2, 0.0, 0, 'legacy')
        _diffusion(config, 'linear', 1000, 'learned_range', 'hybrid')
        _imagenet(config, 256)
        s.num_steps = ADM_SAMPLING_STEPS
    elif name in ('64x64_classifier', '256x256_classifier'):
        size = int(name.split('x')[0])
        # README classifier flags: --classifier_depth 4 at 64x64, the default 2 at 256x256.
        config.model = _adm_classifier(size, 4 if size == 64 else 2)
        # The diffusion of the model it guides (the noise levels it was trained on).
        if size == 64:
            _diffusion(config, 'cosine', 1000, 'learned_range', 'hybrid')
        else:
            _diffusion(config, 'linear', 1000, 'learned_range', 'hybrid')
        _imagenet(config, size)
        config.training.sample_every_steps = 0  # a classifier draws no samples
    elif name == 'sd_vae':
        # sd-vae-ft-* config.json: sample_size 256; 256x256 RGB in [-1, 1], no labels, and an
        # autoencoder draws no diffusion samples.
        config.model = model_configs.sd_vae(256)
        _imagenet(config, 256)
        config.data.num_classes = 0
        config.training.sample_every_steps = 0
    elif name in ('DiT-XL-2-256', 'DiT-XL-2-512'):
        _dit(config, int(name.rsplit('-', 1)[1]))
    else:  # ddpm_cifar10_32: Ho et al.'s CIFAR-10 model (configs/cifar10.py) in TF's layout
        config.model.downsample_padding = 'same'  # TF 'SAME' / diffusers downsample_padding=0
        config.model.norm_epsilon = 1e-6  # diffusers config norm_eps=1e-06
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`--config=configs/pretrained.py:NAME` (fine-tuning or training from scratch)."""
    return preset_config((arg or '').strip() or DEFAULT_PRESET)
