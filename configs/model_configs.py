"""Model sections of the experiment configs: `config.model = model_configs.ddpm_cifar10()`.

`diffusion_jax.models.get_model(config.model)` builds the network that `name` selects. Image
models are NHWC; `attn_resolutions` lists spatial sizes in pixels (16 means the 16x16 level).
num_heads / num_head_channels: exactly one of them > 0 (0 = unset).
"""
from __future__ import annotations

import ml_collections


def ddpm_cifar10() -> ml_collections.ConfigDict:
    """Ho et al. 2020's CIFAR-10 UNet: 35,746,307 parameters ("35.7 million", Appendix B)."""
    c = ml_collections.ConfigDict()
    c.name = 'unet'  # network: 'unet' | 'classifier' | 'mlp'
    c.image_size = 32  # CIFAR-10 images are 32x32
    c.in_channels = 3  # RGB input
    c.out_channels = 3  # predicts eps only (fixed variance, Ho et al. 2020, Sec. 3.2)
    c.ch = 128  # base width; Ho et al.'s released run_cifar.py
    c.ch_mult = (1, 2, 2, 2)  # 4 resolutions 32..4 (Ho et al. 2020, Appendix B; run_cifar.py)
    c.num_res_blocks = 2  # two res blocks per resolution (Ho et al. 2020, Appendix B)
    c.attn_resolutions = (16,)  # self-attention at 16x16 (Ho et al. 2020, Appendix B)
    c.dropout = 0.1  # CIFAR-10 dropout (Ho et al. 2020, Appendix B)
    c.num_heads = 1  # single-head attention (Ho et al.'s reference code)
    c.num_head_channels = 0  # unset: the head count comes from num_heads
    c.use_scale_shift_norm = False  # embedding added before GroupNorm (Ho et al.)
    c.resblock_updown = False  # strided conv down, nearest + conv up (Ho et al.)
    c.rescale_skip = False  # no 1/sqrt(2) on residual sums (Ho et al.)
    c.timestep_embedding = 'ddpm'  # sin then cos, frequencies exp(-ln(1e4) i/(half-1))
    c.num_classes = 0  # unconditional
    c.num_groups = 32  # GroupNorm groups (Ho et al. 2020, Sec. 4; 32 in their reference code)
    c.dtype = 'float32'  # compute dtype; parameters stay float32
    c.norm_epsilon = 1e-6  # GroupNorm ε: tf.contrib.layers.group_norm's, as in Ho et al.'s code
    # Stride-2 conv padding. Ho et al.'s TF code pads 'SAME', i.e. (0, 1); this config keeps the
    # symmetric (1, 1) its runs were trained with (same parameters); configs/pretrained.py's
    # ddpm_cifar10_32 sets 'same' to load Ho et al.'s weights.
    c.downsample_padding = 'symmetric'
    c.timestep_scale = 1.0  # the embedding sees t itself (improved-diffusion T=4000 models: 0.25)
    c.num_heads_upsample = 0  # heads of the up path's attention; 0: num_heads
    c.qkv_order = 'new'  # qkv channels as (3, heads, C/heads); 'legacy': (heads, 3, C/heads)
    c.attention_implementation = 'auto'  # cuDNN fused attention on GPUs where it applies, else XLA
    c.remat = False  # jax.checkpoint per res/attention block: recompute activations in the backward pass
    return c


def improved_ddpm_cifar10() -> ml_collections.ConfigDict:
    """Nichol & Dhariwal 2021's CIFAR-10 UNet (L_hybrid, learned Σ): 52,546,438 parameters."""
    c = ddpm_cifar10()
    c.out_channels = 6  # eps and the variance interpolation v (Nichol & Dhariwal 2021, Sec. 3.1)
    c.num_res_blocks = 3  # improved-diffusion README, CIFAR-10 flags: --num_res_blocks 3
    c.attn_resolutions = (16, 8)  # 16x16 and 8x8 (improved-diffusion script_util defaults)
    c.dropout = 0.3  # improved-diffusion README, CIFAR-10 flags: --dropout 0.3
    c.num_heads = 4  # 4 attention heads (improved-diffusion script_util defaults)
    c.use_scale_shift_norm = True  # adaptive GN (improved-diffusion script_util defaults)
    c.timestep_embedding = 'improved'  # cos then sin, frequencies exp(-ln(1e4) i/half)
    return c


def tiny_unet(image_size: int = 16, in_channels: int = 1, out_channels: int | None = None,
              num_classes: int = 0, **overrides) -> ml_collections.ConfigDict:
    """A UNet small enough for CPU tests and the digits data: 2 levels, attention at the lowest."""
    c = ddpm_cifar10()
    c.image_size = image_size  # e.g. 8, 16 or 28; must be even for 2 levels
    c.in_channels = in_channels  # 1 for grey-scale digits
    c.out_channels = out_channels or in_channels  # 2·in_channels for a learned variance
    c.ch = 32  # smallest width that GroupNorm's 32 groups allow
    c.ch_mult = (1, 2)  # two resolutions: image_size and image_size / 2
    c.num_res_blocks = 1  # one res block per resolution
    c.attn_resolutions = (image_size // 2,)  # attention only at the lowest resolution
    c.dropout = 0.0  # tiny models on small data train fast enough without it
    c.num_classes = num_classes  # > 0 for class-conditional / classifier-free guidance
    c.update(overrides)
    return c


_ADM_CH_MULT = {  # guided-diffusion script_util.create_classifier; 32 follows DDPM's CIFAR-10
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


def adm_classifier(image_size: int = 64, num_classes: int = 1000, in_channels: int = 3,
                   **overrides) -> ml_collections.ConfigDict:
    """Dhariwal & Nichol 2021's noisy-image classifier (guided-diffusion classifier_defaults).

    overrides replace fields, e.g. a small ch / ch_mult for tests; ch_mult is required for an
    image_size outside the table below.
    """
    ch_mult = overrides.pop('ch_mult', None) or _ADM_CH_MULT.get(image_size)
    if ch_mult is None:
        raise ValueError(f'adm_classifier(image_size={image_size}): use one of '
                         f'{sorted(_ADM_CH_MULT)} or pass ch_mult=... explicitly.')
    c = ml_collections.ConfigDict()
    c.name = 'classifier'  # network: 'unet' | 'classifier' | 'mlp'
    c.image_size = image_size  # input resolution
    c.in_channels = in_channels  # 3 for RGB
    c.num_classes = num_classes  # number of logits (1000 for ImageNet)
    c.ch = 128  # classifier_width (guided-diffusion classifier_defaults)
    c.ch_mult = tuple(ch_mult)  # widths per level (guided-diffusion create_classifier)
    c.num_res_blocks = 2  # classifier_depth (guided-diffusion classifier_defaults)
    # classifier_attention_resolutions "32,16,8" (guided-diffusion); at 32x32 images: 16 and 8.
    c.attn_resolutions = tuple(r for r in (32, 16, 8) if r < image_size)
    c.dropout = 0.0  # guided-diffusion trains its classifiers without dropout
    c.num_heads = 0  # unset: heads come from num_head_channels
    c.num_head_channels = 64  # 64 channels per head (Dhariwal & Nichol 2021, Sec. 3)
    c.use_scale_shift_norm = True  # adaptive GN (Dhariwal & Nichol 2021, Sec. 3)
    c.resblock_updown = True  # BigGAN residual up/down-sampling (Dhariwal & Nichol 2021, Sec. 3)
    c.rescale_skip = False  # ADM does not rescale residual sums
    c.timestep_embedding = 'improved'  # the improved-diffusion / ADM sinusoid
    c.pool = 'attention'  # attention pooling head (Dhariwal & Nichol 2021, Sec. 4)
    c.num_groups = 32  # GroupNorm groups
    c.dtype = 'float32'  # compute dtype; parameters stay float32
    c.norm_epsilon = 1e-6  # GroupNorm ε (guided-diffusion's GroupNorm32: 1e-5, set by its presets)
    c.downsample_padding = 'symmetric'  # OpenAI's stride-2 conv pads (1, 1)
    c.timestep_scale = 1.0  # the embedding sees t itself
    c.qkv_order = 'new'  # qkv channels as (3, heads, C/heads); guided-diffusion's legacy order
    c.attention_implementation = 'auto'  # cuDNN fused attention on GPUs where it applies, else XLA
    c.update(overrides)
    return c


def swissroll_mlp(**overrides) -> ml_collections.ConfigDict:
    """A time-conditioned MLP for 2-D swiss-roll points; trains on a CPU in seconds."""
    c = ml_collections.ConfigDict()
    c.name = 'mlp'  # network: 'unet' | 'classifier' | 'mlp'
    c.data_dim = 2  # points in the plane
    c.out_dim = 2  # eps only; 4 (= 2·data_dim) for a learned variance
    c.hidden_dim = 128  # width: enough for the swiss roll, small enough for a CPU
    c.num_layers = 3  # hidden layers, each conditioned on the timestep
    c.dropout = 0.0  # no regularisation needed for 2-D toy data
    c.timestep_embedding = 'ddpm'  # sinusoid as in Ho et al. 2020
    c.num_classes = 0  # unconditional
    c.dtype = 'float32'  # compute dtype; parameters stay float32
    c.update(overrides)
    return c


# Peebles & Xie 2023, Table 1 (and facebookresearch/DiT models.py's DiT_* constructors):
# name -> (depth N, hidden size d, heads). Patch sizes 2, 4 and 8 make the /2, /4, /8 models.
DIT_VARIANTS = {
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}
DIT_PATCH_SIZES = (2, 4, 8)
DIT_PRESETS = tuple(f'DiT-{v}/{p}' for v in DIT_VARIANTS for p in DIT_PATCH_SIZES)


def dit(preset: str = 'DiT-XL/2', image_size: int = 32, in_channels: int = 4,
        num_classes: int = 1000, learn_sigma: bool = True,
        **overrides) -> ml_collections.ConfigDict:
    """A DiT of Peebles & Xie 2023 ('DiT-S/2' ... 'DiT-XL/8', also written 'DiT-XL-2').

    Defaults are the paper's ImageNet-256 setting: 32x32x4 Stable Diffusion VAE latents, 1000
    classes, learned Σ. DiT-XL/2 there has 674,834,720 trainable parameters (the reference's
    675,129,632 also counts its frozen position table); DiT-S/2 32,865,056; DiT-B/4 130,426,496.
    """
    name = preset.replace('-', '/').replace('DiT/', 'DiT-', 1)
    if name not in DIT_PRESETS:
        raise ValueError(f'dit(preset={preset!r}): use one of {list(DIT_PRESETS)}.')
    variant, patch = name[len('DiT-'):].split('/')
    depth, hidden, heads = DIT_VARIANTS[variant]
    c = ml_collections.ConfigDict()
    c.name = 'dit'  # network: 'unet' | 'classifier' | 'mlp' | 'dit'
    c.image_size = image_size  # latent side (256 / 8 = 32 for SD-VAE latents of 256x256 images)
    c.in_channels = in_channels  # 4 SD-VAE latent channels
    c.patch_size = int(patch)  # p: tokens = (image_size / p)^2 (Peebles & Xie 2023, Sec. 3.2)
    c.hidden_size = hidden  # d (Table 1)
    c.depth = depth  # N blocks (Table 1)
    c.num_heads = heads  # attention heads (Table 1)
    c.mlp_ratio = 4.0  # MLP hidden width 4·d (DiT's DiTBlock default)
    c.num_classes = num_classes  # 1000 ImageNet classes (+ the null row of CFG), 0: unconditional
    c.learn_sigma = learn_sigma  # output 2·in_channels: ε and the variance interpolation v
    c.norm_epsilon = 1e-6  # DiT's LayerNorm(eps=1e-6)
    c.attention_implementation = 'auto'  # cuDNN fused attention on GPUs where it applies, else XLA
    c.dtype = 'float32'  # compute dtype; parameters stay float32
    c.remat = False  # jax.checkpoint per block: recompute activations in the backward pass
    c.update(overrides)
    return c


def tiny_dit(image_size: int = 8, in_channels: int = 4, num_classes: int = 10,
             learn_sigma: bool = True, **overrides) -> ml_collections.ConfigDict:
    """The DiT code path at CPU-test size: depth 2, width 64, 4 heads, patch 2."""
    c = dit('DiT-S/2', image_size, in_channels, num_classes, learn_sigma)
    c.depth = 2  # two blocks: enough to test the block stacking
    c.hidden_size = 64  # small width; a multiple of 4 for the position table
    c.num_heads = 4  # head dimension 16
    c.update(overrides)
    return c


def sd_vae(image_size: int = 256, **overrides) -> ml_collections.ConfigDict:
    """The KL-f8 autoencoder of Stable Diffusion (Rombach et al. 2022), in diffusers'
    AutoencoderKL layout: the config.json of stabilityai/sd-vae-ft-ema / sd-vae-ft-mse."""
    c = ml_collections.ConfigDict()
    c.name = 'autoencoder'  # network: 'unet' | 'classifier' | 'mlp' | 'dit' | 'autoencoder'
    c.image_size = image_size  # images it is initialised for (it is fully convolutional)
    c.in_channels = 3  # RGB in [-1, 1]
    c.out_channels = 3  # RGB reconstruction
    c.latent_channels = 4  # z has 4 channels (KL-f8: 32x32x4 latents of 256x256 images)
    c.block_out_channels = (128, 256, 512, 512)  # 4 levels: f = 2^3 = 8
    c.layers_per_block = 2  # res blocks per encoder level (the decoder has one more)
    c.norm_num_groups = 32  # GroupNorm groups
    c.norm_epsilon = 1e-6  # diffusers' VAE GroupNorm ε
    # Latents are multiplied by this before diffusion (Rombach et al. 2022, Sec. 4.3.2 and
    # App. D.1: unit variance of the training latents; SD's config.json scaling_factor).
    c.scaling_factor = 0.18215
    c.attention_implementation = 'auto'  # cuDNN fused attention on GPUs where it applies, else XLA
    c.dtype = 'float32'  # compute dtype; parameters stay float32
    c.update(overrides)
    return c


def _sd_unet(num_heads, context_dim: int, linear: bool, sample_size: int):
    """diffusers' UNet2DConditionModel of Stable Diffusion (block_out_channels (320, 640, 1280,
    1280), layers_per_block 2, CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn,
    UpBlock2D + CrossAttnUpBlock2D x3) in this UNet's fields."""
    c = ddpm_cifar10()
    del c.num_heads  # a count, or one per level (SD 2.x): not the template's int type
    c.image_size = sample_size  # latent side (unet/config.json sample_size)
    c.in_channels = c.out_channels = 4  # SD-VAE latents, ε (or v) prediction
    c.ch = 320  # block_out_channels[0]
    c.ch_mult = (1, 2, 4, 4)  # block_out_channels / 320
    c.num_res_blocks = 2  # layers_per_block
    # Cross-attention at the three CrossAttn levels (and the middle), not the lowest level.
    c.attn_resolutions = (sample_size, sample_size // 2, sample_size // 4)
    c.dropout = 0.0  # inference configs carry none
    c.num_heads = num_heads  # diffusers' attention_head_dim is the head COUNT in these configs
    c.num_head_channels = 0
    c.timestep_embedding = 'improved'  # Timesteps(flip_sin_to_cos=True, freq_shift=0)
    c.norm_epsilon = 1e-5  # PyTorch GroupNorm's default (norm_eps)
    c.downsample_padding = 'symmetric'  # Downsample2D padding=1
    c.context_dim = context_dim  # cross_attention_dim: the text encoder's width
    c.transformer_depth = 1  # transformer_layers_per_block
    c.use_linear_projection = linear
    return c


def sd15_unet() -> ml_collections.ConfigDict:
    """stable-diffusion-v1-5's unet/config.json: 8 heads, CLIP ViT-L/14 context (768), conv
    projections, 64x64x4 latents; 859,520,964 parameters."""
    return _sd_unet(8, 768, False, 64)


def sd21_unet() -> ml_collections.ConfigDict:
    """stable-diffusion-2-1's unet/config.json: attention_head_dim [5, 10, 20, 20] heads of
    width 64, OpenCLIP-H context (1024), linear projections, 96x96x4 latents (768 px);
    865,910,724 parameters. (Its upcast_attention computes softmax in float32, which this
    UNet's attention does in every dtype.)"""
    return _sd_unet((5, 10, 20, 20), 1024, True, 96)
