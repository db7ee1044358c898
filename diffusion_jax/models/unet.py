"""The DDPM UNet (Ho et al. 2020) with the options of improved DDPM and ADM.

    eps_theta(x_t, t[, y]):  x_t [B, H, W, in_channels], t [B] -> [B, H, W, out_channels] float32

Structure (L = len(ch_mult) levels, resolution r_l = image_size / 2^l at level l):
    emb   = dense(swish(dense(sinusoid(t, ch)))) [B, 4·ch]  (+ label embedding if num_classes > 0)
    down: h = conv3x3(x) -> ch·ch_mult[0]; per level l: num_res_blocks × [ResBlock (+ attention if
          r_l in attn_resolutions)], then (l < L-1) a downsample: strided 3x3 conv, or a ResBlock
          with 2x2 average pooling when resblock_updown. Every output above, conv_in included, is
          pushed onto the skip stack hs.
    mid:  ResBlock, attention, ResBlock.
    up:   per level l = L-1..0: num_res_blocks + 1 × [ResBlock(concat(h, hs.pop())) (+ attention)],
          then (l > 0) an upsample: nearest x2 + 3x3 conv, or a ResBlock with nearest x2.
    out:  conv3x3_zero_init(swish(GN(h))) -> out_channels.

By configuration this is Ho et al.'s CIFAR-10 model (35,746,307 parameters), improved DDPM's
(52,546,438: num_res_blocks=3, 4 heads, attention at 16 and 8, scale-shift norm, 6 outputs) and
ADM (num_head_channels, resblock_updown, class conditioning). The output conv is zero-initialised,
so a fresh model predicts exactly 0.

Fields that exist so that the published checkpoints load into the same network (configs/
pretrained.py sets each preset's value; the defaults keep the configs of configs/*.py unchanged):
norm_epsilon (GroupNorm ε), downsample_padding ('symmetric' | 'same'), timestep_scale (the
embedding sees t·timestep_scale; callers always pass the integer timesteps of the diffusion),
num_heads_upsample (heads of the up path's attention; 0: num_heads), qkv_order ('new' | 'legacy'),
attention_implementation ('auto' | 'xla' | 'cudnn', see layers.select_attention_implementation).

Text conditioning (latent diffusion, Rombach et al. 2022): context_dim > 0 replaces every
attention block (down, mid, up at attn_resolutions) by a layers.SpatialTransformer of
transformer_depth blocks whose cross-attention reads a context sequence; the condition is then
passed where labels go, y = {'context': [B, L, context_dim], 'mask': [B, L] (optional, 1 keep)}.
num_heads may be one count per level (SD 2.x: (5, 10, 20, 20)); use_linear_projection records
whether the source checkpoint's proj_in/proj_out are Linear (SD 2.x) or 1x1 conv (SD 1.x) layers,
which compute the same map. context_dim = 0 (the default) is the UNet without these fields.

Memory: remat = True puts every ResBlock and attention block (down, mid, up) under
jax.checkpoint: the backward pass recomputes a block's activations from its input. Same
parameters, same outputs and gradients; the activation memory of training falls to about the
blocks' inputs plus one block's internals.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers

# Ho et al. 2020 (and improved DDPM / ADM): the timestep embedding MLP is 4 times the base width.
EMB_MULT = 4


def level_resolutions(image_size: int, ch_mult) -> list[int]:
    """Spatial resolution of each UNet level: image_size / 2^l."""
    return [image_size // 2**level for level in range(len(ch_mult))]


def validate_unet_fields(m) -> None:
    """Raises one ValueError naming the offending model_config field and the fix."""
    layers.compute_dtype(m.dtype)
    layers.check_choice('timestep_embedding', m.timestep_embedding, layers.TIMESTEP_EMBEDDINGS)
    layers.check_choice('downsample_padding', m.downsample_padding, layers.DOWNSAMPLE_PADDINGS)
    layers.check_choice('qkv_order', m.qkv_order, layers.QKV_ORDERS)
    layers.check_choice('attention_implementation', m.attention_implementation,
                        layers.ATTENTION_IMPLEMENTATIONS)
    if not m.norm_epsilon > 0:
        raise ValueError(f'model_config.norm_epsilon={m.norm_epsilon} must be > 0: use 1e-6 '
                         "(Ho et al.'s TF GroupNorm) or 1e-5 (PyTorch's GroupNorm).")
    if not m.timestep_scale > 0:
        raise ValueError(f'model_config.timestep_scale={m.timestep_scale} must be > 0: use 1, or '
                         '1000/T for a model trained with rescaled timesteps.')
    if any(h < 0 for h in per_level(getattr(m, 'num_heads_upsample', 0), m.ch_mult)):
        raise ValueError(f'model_config.num_heads_upsample={m.num_heads_upsample} must be >= 0 '
                         '(0: the same as num_heads).')
    factor = 2 ** (len(m.ch_mult) - 1)
    width = getattr(m, 'image_width', 0)
    if width < 0 or width % factor:
        raise ValueError(f'model_config.image_width={width} must be 0 (square) or a multiple of '
                         f'2**(len(ch_mult)-1)={factor}.')
    if m.image_size % factor:
        raise ValueError(
            f'model_config.image_size={m.image_size} is not divisible by 2**(len(ch_mult)-1)='
            f'{factor}: use an image_size that is a multiple of {factor}, or fewer ch_mult levels.')
    for mult in m.ch_mult:
        if (m.ch * mult) % m.num_groups:
            raise ValueError(
                f'model_config.ch={m.ch} × ch_mult entry {mult} = {m.ch * mult} channels is not '
                f'divisible by num_groups={m.num_groups} GroupNorm groups: choose ch and ch_mult '
                f'so that every level has a multiple of {m.num_groups} channels.')
    if isinstance(m.num_heads, tuple) and len(m.num_heads) != len(m.ch_mult):
        raise ValueError(f'model_config.num_heads={m.num_heads} has {len(m.num_heads)} entries for '
                         f'{len(m.ch_mult)} levels: give one head count per ch_mult entry, or one '
                         'number for all.')
    if any((h > 0) == (m.num_head_channels > 0) for h in per_level(m.num_heads, m.ch_mult)):
        raise ValueError(
            f'model_config.num_heads={m.num_heads} and num_head_channels={m.num_head_channels}: '
            'set exactly one of them > 0 and the other to 0.')
    validate_context_fields(m)
    resolutions = level_resolutions(m.image_size, m.ch_mult)
    for res in m.attn_resolutions:
        if res not in resolutions:
            raise ValueError(
                f'model_config.attn_resolutions contains {res}, which is not a resolution of this '
                f'UNet ({resolutions}): use only those values.')
    head_counts = {'num_heads': per_level(m.num_heads, m.ch_mult)}
    if getattr(m, 'num_heads_upsample', 0):
        head_counts['num_heads_upsample'] = per_level(m.num_heads_upsample, m.ch_mult)
    for field, counts in head_counts.items():
        for level_ch, num_heads in zip([m.ch * mult for mult in m.ch_mult], counts):
            heads = layers.resolve_num_heads(level_ch, num_heads, m.num_head_channels)
            head_ch = m.num_head_channels or level_ch // max(heads, 1)
            if heads < 1 or level_ch % heads or level_ch % head_ch:
                raise ValueError(
                    f'model_config.{field}={num_heads} / num_head_channels='
                    f'{m.num_head_channels} do not divide the {level_ch} channels of a level: '
                    'pick a divisor.')
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f'model_config.dropout={m.dropout} is outside [0, 1): pick a rate in it.')


def per_level(value, ch_mult) -> tuple:
    """A per-level field (one number for all levels, or one per level) as a tuple per level."""
    return tuple(value) if isinstance(value, tuple) else (value,) * len(ch_mult)


def validate_context_fields(m) -> None:
    context_dim = getattr(m, 'context_dim', 0)
    if context_dim < 0:
        raise ValueError(f'model_config.context_dim={context_dim} must be >= 0 (0: no text '
                         'conditioning).')
    if context_dim and getattr(m, 'transformer_depth', 1) < 1:
        raise ValueError(f'model_config.transformer_depth={m.transformer_depth} must be >= 1 '
                         'when context_dim is set.')
    if context_dim and m.num_classes:
        raise ValueError(f'model_config.num_classes={m.num_classes} with context_dim='
                         f'{context_dim}: condition on labels or on a context, not both.')


def split_condition(m, y):
    """(labels, context, mask) from the condition y: labels [B] or a {'context', 'mask'} dict."""
    context_dim = getattr(m, 'context_dim', 0)
    if isinstance(y, dict):
        if not context_dim:
            raise ValueError('a context condition was passed but model_config.context_dim=0: '
                             'set context_dim to the text encoder width to condition on text.')
        context, mask = y.get('context'), y.get('mask')
        if context is None or context.ndim != 3 or context.shape[-1] != context_dim:
            shape = None if context is None else context.shape
            raise ValueError(f"cond['context'] of shape {shape}: pass [B, L, {context_dim}] "
                             f'(model_config.context_dim={context_dim}).')
        return None, context, mask
    if context_dim:
        raise ValueError(f"model_config.context_dim={context_dim}: pass the condition as "
                         "{'context': [B, L, D], 'mask': [B, L]} where labels go.")
    return y, None, None


def check_input(m, x) -> None:
    """Shape check at trace time, so a wrong input fails with a readable message."""
    factor = 2 ** (len(m.ch_mult) - 1)
    if x.ndim != 4 or x.shape[-1] != m.in_channels or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f'input of shape {x.shape} does not fit model_config.in_channels={m.in_channels} and '
            f'{len(m.ch_mult)} levels: pass NHWC images with H, W divisible by {factor}.')


# model.remat: the blocks under jax.checkpoint (flax's lifted nn.remat), so the backward pass
# recomputes each block's activations from its input instead of keeping them: the same
# parameters (names and shapes) and the same function, less memory, about one more forward
# pass of compute. ResBlock's `train` (argument 3, self being 0) selects dropout: static.
_REMAT_RES_BLOCK = nn.remat(layers.ResBlock, static_argnums=(3,))
_REMAT_ATTENTION = nn.remat(layers.AttentionBlock)
_REMAT_TRANSFORMER = nn.remat(layers.SpatialTransformer)


def res_block(m, out_ch: int, name: str, resample: str | None = None) -> layers.ResBlock:
    cls = _REMAT_RES_BLOCK if getattr(m, 'remat', False) else layers.ResBlock
    return cls(out_ch, m.dropout, m.use_scale_shift_norm, m.rescale_skip, resample,
               m.num_groups, layers.compute_dtype(m.dtype), norm_epsilon=m.norm_epsilon, name=name)


def attn_block(m, channels: int, name: str, upsample: bool = False, level: int = -1):
    """Attention with num_heads (num_heads_upsample on the up path, when set) or num_head_channels,
    either per level; a SpatialTransformer reading the context when context_dim is set.
    Returns a function h, context, mask -> h."""
    num_heads = m.num_heads
    if upsample and getattr(m, 'num_heads_upsample', 0):
        num_heads = m.num_heads_upsample
    num_heads = per_level(num_heads, m.ch_mult)[level]
    heads = layers.resolve_num_heads(channels, num_heads, m.num_head_channels)
    dtype = layers.compute_dtype(m.dtype)
    remat = getattr(m, 'remat', False)
    if getattr(m, 'context_dim', 0):
        cls = _REMAT_TRANSFORMER if remat else layers.SpatialTransformer
        return cls(heads, m.transformer_depth, m.num_groups, dtype, m.attention_implementation,
                   name=name)
    cls = _REMAT_ATTENTION if remat else layers.AttentionBlock
    block = cls(heads, m.rescale_skip, m.num_groups, m.attention_implementation, dtype,
                qkv_order=m.qkv_order, norm_epsilon=m.norm_epsilon, name=name)
    return lambda h, context=None, mask=None: block(h)


def time_embedding(m, t):
    """The conditioning embedding [B, 4·ch] of the integer timesteps t [B]."""
    dtype = layers.compute_dtype(m.dtype)
    return layers.TimeEmbedding(m.ch, EMB_MULT * m.ch, m.timestep_embedding, dtype,
                                timestep_scale=m.timestep_scale, name='temb')(t)


def encode(m, x, emb, train: bool, context=None, mask=None):
    """Down path of m (a UNet or Classifier), built inside its compact call: returns (h, hs)."""
    dtype = layers.compute_dtype(m.dtype)
    attn_levels = {lvl for lvl, res in enumerate(level_resolutions(m.image_size, m.ch_mult))
                   if res in m.attn_resolutions}
    h = layers.conv3x3(m.ch * m.ch_mult[0], dtype, 'conv_in')(x.astype(dtype))
    hs = [h]
    for level, mult in enumerate(m.ch_mult):
        for i in range(m.num_res_blocks):
            h = res_block(m, m.ch * mult, f'down_{level}_block_{i}')(h, emb, train)
            if level in attn_levels:
                h = attn_block(m, m.ch * mult, f'down_{level}_attn_{i}', level=level)(
                    h, context, mask)
            hs.append(h)
        if level != len(m.ch_mult) - 1:
            if m.resblock_updown:
                h = res_block(m, h.shape[-1], f'down_{level}_downsample', 'down')(h, emb, train)
            else:
                h = layers.Downsample(dtype, m.downsample_padding,
                                      name=f'down_{level}_downsample')(h)
            hs.append(h)
    return h, hs


def middle(m, h, emb, train: bool, context=None, mask=None):
    """ResBlock, attention (with the last level's heads), ResBlock at the lowest resolution."""
    h = res_block(m, h.shape[-1], 'mid_block_1')(h, emb, train)
    h = attn_block(m, h.shape[-1], 'mid_attn')(h, context, mask)
    return res_block(m, h.shape[-1], 'mid_block_2')(h, emb, train)


def decode(m, h, hs, emb, train: bool, context=None, mask=None):
    """Up path: consumes the skip stack hs in reverse, num_res_blocks + 1 blocks per level."""
    dtype = layers.compute_dtype(m.dtype)
    attn_levels = {lvl for lvl, res in enumerate(level_resolutions(m.image_size, m.ch_mult))
                   if res in m.attn_resolutions}
    for level in reversed(range(len(m.ch_mult))):
        out_ch = m.ch * m.ch_mult[level]
        for i in range(m.num_res_blocks + 1):
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = res_block(m, out_ch, f'up_{level}_block_{i}')(h, emb, train)
            if level in attn_levels:
                h = attn_block(m, out_ch, f'up_{level}_attn_{i}', upsample=True, level=level)(
                    h, context, mask)
        if level != 0:
            if m.resblock_updown:
                h = res_block(m, out_ch, f'up_{level}_upsample', 'up')(h, emb, train)
            else:
                h = layers.Upsample(dtype, name=f'up_{level}_upsample')(h)
    return h


class UNet(nn.Module):
    """Noise-prediction UNet; fields are those of configs/model_configs.py (see there).

    num_heads / num_head_channels: exactly one > 0 (0 means unset).
    attn_resolutions: spatial sizes (pixels, e.g. 16 for 16x16) that get attention; for
      non-square images (image_width > 0) the height of the level.
    num_heads / num_heads_upsample: one count, or a tuple of one per level.
    context_dim > 0: spatial transformers (transformer_depth blocks) with cross-attention to
    y = {'context': [B, L, context_dim], 'mask': [B, L]} at attn_resolutions and the middle.
    """
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    num_heads: int | tuple[int, ...] = 1
    num_head_channels: int = 0
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    rescale_skip: bool = False
    timestep_embedding: str = 'ddpm'
    num_classes: int = 0
    num_groups: int = 32
    attention_implementation: str = 'auto'
    dtype: str = 'float32'
    norm_epsilon: float = layers.GROUPNORM_EPSILON
    downsample_padding: str = 'symmetric'
    timestep_scale: float = 1.0
    num_heads_upsample: int | tuple[int, ...] = 0
    qkv_order: str = 'new'
    context_dim: int = 0
    transformer_depth: int = 1
    use_linear_projection: bool = False
    image_width: int = 0  # 0: square images; else W of H x W images (H = image_size)
    remat: bool = False

    def __post_init__(self):
        validate_unet_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        """x [B, H, W, in_channels], t [B], y [B] int, None, or (context_dim > 0) the dict
        {'context': [B, L, context_dim], 'mask': [B, L]} -> [B, H, W, out_channels] float32."""
        check_input(self, x)
        y, context, mask = split_condition(self, y)
        dtype = layers.compute_dtype(self.dtype)
        t = jnp.broadcast_to(t, x.shape[:1])
        emb = time_embedding(self, t)
        emb = layers.add_label_embedding(emb, y, self.num_classes, dtype)
        h, hs = encode(self, x, emb, train, context, mask)
        h = middle(self, h, emb, train, context, mask)
        h = decode(self, h, hs, emb, train, context, mask)
        h = nn.swish(layers.GroupNorm(self.num_groups, dtype, self.norm_epsilon,
                                      name='norm_out')(h))
        # Zero init: the untrained model predicts 0, a safe start for eps- or x0-prediction.
        h = layers.conv3x3(self.out_channels, dtype, 'conv_out', init_scale=0.0)(h)
        return h.astype(jnp.float32)
