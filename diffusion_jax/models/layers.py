"""Building blocks shared by the UNet, the noisy-image classifier and the MLP denoiser.

Shapes are NHWC throughout: feature maps h are [B, H, W, C]; the conditioning embedding `emb`
is [B, E] with E = 4·ch.

Timestep embedding (Ho et al. 2020, after Vaswani et al. 2017), d = dim, half = d // 2,
i = 0..half-1, P = max_period = 10000 (a zero column is appended when d is odd):
    'ddpm':     f_i = exp(-ln(P)·i/(half-1)),  emb(t) = [sin(t·f), cos(t·f)]
    'improved': f_i = exp(-ln(P)·i/half),      emb(t) = [cos(t·f), sin(t·f)]   (improved DDPM)

Residual block (Ho et al. 2020; the options from Dhariwal & Nichol 2021):
    h = conv3x3(swish(GN(x)))                 (h and x resampled before the conv when up/down)
    e = dense(swish(emb))
    h = GN(h + e)                             plain
    h = GN(h)·(1 + scale) + shift             use_scale_shift_norm, (scale, shift) = split(e)
    h = conv3x3_zero_init(dropout(swish(h)))
    out = skip(x) + h                         divided by √2 when rescale
Self-attention block: out = x + proj_zero_init(MHA(qkv(GN(x)))), divided by √2 when rescale.
The 3C qkv channels are ordered (3, heads, C/heads) ('new': guided-diffusion's QKVAttention,
diffusers' to_q/to_k/to_v) or (heads, 3, C/heads) ('legacy': improved-diffusion and
guided-diffusion's QKVAttentionLegacy); the two orders are the same network up to a permutation of
the qkv weights, and the option exists so that checkpoints load with a plain transpose.

Options that differ between the reference codebases (each a model config field):
    GroupNorm ε:          1e-6 (Ho et al.'s tf.contrib group_norm) | 1e-5 (PyTorch GroupNorm32)
    downsample padding:   'symmetric' (1, 1) (OpenAI's conv padding=1) | 'same' (0, 1) (TF's
                          'SAME' for a stride-2 3x3 conv on even sizes: Ho et al., diffusers
                          downsample_padding=0)
    timestep_scale:       the sinusoid sees t·timestep_scale (improved-diffusion's
                          rescale_timesteps feeds t·1000/T), so callers pass the integer t.

Precision: parameters are always float32; matmuls and convolutions run in the compute dtype;
GroupNorm statistics and the attention softmax are computed in float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TIMESTEP_EMBEDDINGS = ('ddpm', 'improved')
# Vaswani et al. 2017, Sec. 3.5: the longest sinusoid period of the position encoding.
MAX_PERIOD = 10000.0
# tf.contrib.layers.group_norm's default, used by Ho et al.'s reference code.
GROUPNORM_EPSILON = 1e-6


def default_init(scale: float = 1.0):
    """Ho et al.'s initialiser (variance scaling, fan_avg, uniform); scale 0 gives zeros."""
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def check_choice(field: str, value, choices) -> None:
    """Raises a ValueError naming model_config.<field> when value is not one of choices."""
    if value not in choices:
        raise ValueError(f'model_config.{field}={value!r} is not supported: '
                         f'use one of {tuple(choices)}.')


def compute_dtype(name: str) -> Dtype:
    """Maps the config string 'float32' | 'bfloat16' to a jnp dtype."""
    check_choice('dtype', name, COMPUTE_DTYPES)
    return COMPUTE_DTYPES[name]


def timestep_embedding(t: jax.Array, dim: int, kind: str = 'ddpm',
                       max_period: float = MAX_PERIOD) -> jax.Array:
    """Sinusoidal embedding of timesteps t [B] (int or float) -> [B, dim] float32."""
    half = dim // 2
    i = jnp.arange(half, dtype=jnp.float32)
    check_choice('timestep_embedding', kind, TIMESTEP_EMBEDDINGS)
    if kind == 'ddpm':
        # Ho et al. divide by half-1, so the lowest frequency is exactly 1/max_period.
        freqs = jnp.exp(-math.log(max_period) * i / max(half - 1, 1))
    else:
        freqs = jnp.exp(-math.log(max_period) * i / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    first, second = (jnp.sin, jnp.cos) if kind == 'ddpm' else (jnp.cos, jnp.sin)
    emb = jnp.concatenate([first(args), second(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an attention layer: num_heads, or channels // num_head_channels when that is set."""
    if num_head_channels > 0:
        return channels // num_head_channels
    return num_heads


# Padding (before, after) of each spatial axis of a stride-2 3x3 conv.
DOWNSAMPLE_PADDINGS = {'symmetric': (1, 1), 'same': (0, 1)}
QKV_ORDERS = ('new', 'legacy')
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
# cuDNN's fused attention (jax._src.cudnn.fused_attention_stablehlo): fp16/bf16 inputs and a head
# dimension that is a multiple of 8 and at most 128 (256 on Hopper; 128 is the safe bound).
CUDNN_ATTENTION_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8


def select_attention_implementation(requested: str, dtype, head_dim: int,
                                    platform: str | None = None) -> str:
    """The `implementation` passed to jax.nn.dot_product_attention: 'cudnn' or 'xla'.

    JAX's `implementation=None` always takes the XLA path (it does not pick cuDNN), so the choice
    is made here: 'auto' gives 'cudnn' on a GPU when the compute dtype and head dimension are ones
    cuDNN's fused kernel accepts, 'xla' otherwise; 'xla' and 'cudnn' are taken as asked, and
    'cudnn' where it cannot run is a ValueError (rather than a failure deep inside compilation).
    platform: jax.default_backend() when None.
    """
    check_choice('attention_implementation', requested, ATTENTION_IMPLEMENTATIONS)
    platform = platform or jax.default_backend()
    reasons = []
    if platform not in ('gpu', 'cuda'):
        reasons.append(f'the backend is {platform!r}, not a GPU')
    if jnp.dtype(dtype).name not in CUDNN_ATTENTION_DTYPES:
        reasons.append(f'the compute dtype is {jnp.dtype(dtype).name}, not one of '
                       f'{CUDNN_ATTENTION_DTYPES}')
    if head_dim % CUDNN_HEAD_DIM_MULTIPLE or head_dim > CUDNN_MAX_HEAD_DIM:
        reasons.append(f'the head dimension {head_dim} is not a multiple of '
                       f'{CUDNN_HEAD_DIM_MULTIPLE} up to {CUDNN_MAX_HEAD_DIM}')
    if requested == 'xla' or (requested == 'auto' and reasons):
        return 'xla'
    if reasons:
        raise ValueError(f"model_config.attention_implementation='cudnn' cannot run here: "
                         f"{'; '.join(reasons)}. Use 'auto' or 'xla'.")
    return 'cudnn'


def conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1, init_scale: float = 1.0,
            padding: tuple[int, int] = (1, 1)):
    """3x3 convolution, `padding` (before, after) on both spatial axes, float32 parameters."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=(padding, padding),
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=default_init(init_scale),
                   name=name)


def dense(features: int, dtype: Dtype, name: str, init_scale: float = 1.0):
    """Dense layer on the last axis (on feature maps: a 1x1 conv, Ho et al.'s 'nin')."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=default_init(init_scale), name=name)


def upsample_nearest(x):
    """[B, H, W, C] -> [B, 2H, 2W, C] by repeating pixels."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x):
    """[B, H, W, C] -> [B, H/2, W/2, C] by 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class TimeEmbedding(nn.Module):
    """emb = dense1(swish(dense0(sinusoid(t·scale)))): t [B] -> [B, dim] (Ho et al.'s 'temb')."""
    base_dim: int
    dim: int
    kind: str = 'ddpm'
    dtype: Dtype = jnp.float32
    timestep_scale: float = 1.0

    @nn.compact
    def __call__(self, t):
        if self.timestep_scale != 1.0:  # skipped at 1 so that t stays exactly as given
            t = jnp.asarray(t, jnp.float32) * self.timestep_scale
        emb = timestep_embedding(t, self.base_dim, self.kind).astype(self.dtype)
        emb = dense(self.dim, self.dtype, 'dense0')(emb)
        return dense(self.dim, self.dtype, 'dense1')(nn.swish(emb))


def add_label_embedding(emb, y, num_classes: int, dtype: Dtype):
    """emb + E[y] with a learned table E of num_classes + 1 rows; call inside a compact method.

    Row num_classes is the "null" label of classifier-free guidance (Ho & Salimans 2021):
    y=None means null for the whole batch. With num_classes == 0 the model is unconditional.
    """
    if num_classes == 0:
        if y is not None:
            raise ValueError('a label y was passed to an unconditional model: set '
                             'model_config.num_classes > 0 or call the model with y=None.')
        return emb
    if y is None:
        y = jnp.full(emb.shape[:1], num_classes, jnp.int32)
    table = nn.Embed(num_classes + 1, emb.shape[-1], dtype=dtype, param_dtype=jnp.float32,
                     name='label_emb')
    return emb + table(y)


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics and optional adaptive (scale, shift); returns `dtype`."""
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    epsilon: float = GROUPNORM_EPSILON

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        # bfloat16 keeps ~3 significant digits: too few for means and variances over H·W·C/G.
        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon,
                         dtype=jnp.float32, param_dtype=jnp.float32,
                         name='norm')(x.astype(jnp.float32))
        if scale is not None:
            h = h * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
        return h.astype(self.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (no transposed conv, which makes checkerboards)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv3x3(x.shape[-1], self.dtype, 'conv')(upsample_nearest(x))


class Downsample(nn.Module):
    """3x3 conv with stride 2: [B, H, W, C] -> [B, H/2, W/2, C]; padding a DOWNSAMPLE_PADDINGS key."""
    dtype: Dtype = jnp.float32
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x):
        return conv3x3(x.shape[-1], self.dtype, 'conv', stride=2,
                       padding=DOWNSAMPLE_PADDINGS[self.padding])(x)


class ResBlock(nn.Module):
    """Time-conditioned residual block; equations in the module docstring.

    resample: None, 'up' (nearest x2) or 'down' (2x2 average pool) applied to both paths
    between the first norm and the first conv: the BigGAN-style up/down-sampling blocks
    of Dhariwal & Nichol 2021 (resblock_updown).
    """
    out_ch: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    rescale: bool = False
    resample: str | None = None
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    norm_epsilon: float = GROUPNORM_EPSILON

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        h = nn.swish(GroupNorm(self.num_groups, self.dtype, self.norm_epsilon, name='norm1')(x))
        if self.resample == 'up':
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == 'down':
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv3x3(self.out_ch, self.dtype, 'conv1')(h)

        emb_ch = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        e = dense(emb_ch, self.dtype, 'temb_proj')(nn.swish(emb))[:, None, None, :]
        norm2 = GroupNorm(self.num_groups, self.dtype, self.norm_epsilon, name='norm2')
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = norm2(h, scale, shift)
        else:
            h = norm2(h + e)
        h = nn.swish(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=not train)
        # Zero init: every block starts as the identity map, so depth does not hurt early training.
        h = conv3x3(self.out_ch, self.dtype, 'conv2', init_scale=0.0)(h)

        if x.shape[-1] != self.out_ch:
            x = dense(self.out_ch, self.dtype, 'skip')(x)
        out = x + h
        return out / math.sqrt(2.0) if self.rescale else out


def split_qkv(qkv, num_heads: int, order: str = 'new'):
    """[..., 3C] -> q, k, v each [..., heads, C/heads] for the channel order 'new' | 'legacy'."""
    check_choice('qkv_order', order, QKV_ORDERS)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    lead = qkv.shape[:-1]
    if order == 'new':
        qkv = qkv.reshape(*lead, 3, num_heads, head_dim)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    qkv = qkv.reshape(*lead, num_heads, 3, head_dim)
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions; residual; zero-initialised output.

    qkv is one dense layer C -> 3C (the parameter count of Ho et al.'s three C -> C nin layers
    and of improved-diffusion's 1x1 conv), its channels in `qkv_order`; the logit scale is
    1/√(C/heads). The kernel of jax.nn.dot_product_attention is chosen by
    select_attention_implementation ('auto': cuDNN's fused attention on a GPU for bf16/fp16 and
    head dimensions it takes, XLA otherwise); the XLA path computes the logits and the softmax
    in float32 even for bfloat16 inputs.
    """
    num_heads: int = 1
    rescale: bool = False
    num_groups: int = 32
    implementation: str = 'auto'
    dtype: Dtype = jnp.float32
    qkv_order: str = 'new'
    norm_epsilon: float = GROUPNORM_EPSILON

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        h = GroupNorm(self.num_groups, self.dtype, self.norm_epsilon, name='norm')(x)
        qkv = dense(3 * c, self.dtype, 'qkv')(h)
        q, k, v = split_qkv(qkv, self.num_heads, self.qkv_order)
        q, k, v = (a.reshape(b, height * width, self.num_heads, -1) for a in (q, k, v))
        impl = select_attention_implementation(self.implementation, self.dtype, q.shape[-1])
        a = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        a = a.reshape(b, height, width, c)
        out = x + dense(c, self.dtype, 'proj_out', init_scale=0.0)(a)
        return out / math.sqrt(2.0) if self.rescale else out
