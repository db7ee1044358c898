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

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

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


class GroupNormParams(nn.Module):
    """The affine parameters of a GroupNorm over `features` channels: 'scale' (1), 'bias' (0).

    Named 'norm' inside GroupNorm, so the parameter tree is the one flax's nn.GroupNorm makes
    ({'norm': {'scale', 'bias'}}): checkpoints and the PyTorch converters depend on it.
    """
    features: int

    @nn.compact
    def __call__(self):
        return (self.param('scale', nn.initializers.ones, (self.features,), jnp.float32),
                self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32))


def group_norm(x, gamma, beta, num_groups: int, epsilon: float, scale=None, shift=None):
    """GroupNorm of x [B, ..., C] (groups of C/G consecutive channels) in float32.

    The same function as flax's nn.GroupNorm (one-pass statistics: var = max(0, E[x²] - E[x]²))
    followed by h·(1 + scale) + shift, up to float32 rounding; written for XLA:CPU, where it is
    faster (experiments/profile_cpu.py): the statistics are per-channel sums over the positions
    (a reduction over a major axis, vectorised across C) reduced over each group's C/G channels
    afterwards, instead of a reduction over [B, H, W, G, C/G]'s axes (1, 2, 4); and the
    normalisation, the affine parameters and the adaptive (scale, shift) are folded into one
    per-(sample, channel) multiply-add y = x·a + d, with a = γ·rsqrt(var + ε)·(1 + scale) and
    d = (β - mean·γ·rsqrt(var + ε))·(1 + scale) + shift.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f'GroupNorm: {c} channels are not divisible by {num_groups} groups.')
    per_group = c // num_groups
    x = x.astype(jnp.float32)
    x3 = x.reshape(b, -1, c)
    count = x3.shape[1] * per_group
    mean = jnp.sum(x3, axis=1).reshape(b, num_groups, per_group).sum(-1) / count
    mean2 = jnp.sum(jnp.square(x3), axis=1).reshape(b, num_groups, per_group).sum(-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(0.0, mean2 - jnp.square(mean)) + epsilon)   # [B, G]
    a = jnp.repeat(inv, per_group, axis=-1) * gamma                              # [B, C]
    d = beta - jnp.repeat(mean, per_group, axis=-1) * a
    spatial = (1,) * (x.ndim - 2)
    a, d = a.reshape(b, *spatial, c), d.reshape(b, *spatial, c)
    if scale is not None:
        scale = 1.0 + scale.astype(jnp.float32)
        a, d = a * scale, d * scale + shift.astype(jnp.float32)
    return x * a + d


class GroupNorm(nn.Module):
    """GroupNorm with float32 statistics and optional adaptive (scale, shift); returns `dtype`.

    Parameters {'norm': {'scale', 'bias'}} as flax's nn.GroupNorm; computed by group_norm.
    """
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    epsilon: float = GROUPNORM_EPSILON

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        # bfloat16 keeps ~3 significant digits: too few for means and variances over H·W·C/G.
        gamma, beta = GroupNormParams(x.shape[-1], name='norm')()
        h = group_norm(x, gamma, beta, self.num_groups, self.epsilon, scale, shift)
        return h.astype(self.dtype)


def _fold_upsample_kernel(kernel):
    """3x3 kernel [3, 3, I, O] -> the 2x2 kernels [2, 2, I, 4·O] of the four output phases.

    After a nearest x2, output row 2i+a of a (1, 1)-padded 3x3 conv sees input rows (i-1, i, i)
    for a = 0 and (i, i, i+1) for a = 1, so along each axis the taps fold to (k0, k1 + k2) on the
    rows (i-1, i) and (k0 + k1, k2) on the rows (i, i+1). The O-blocks are the phases (a, b) in
    the order (0, 0), (0, 1), (1, 0), (1, 1). Folded in float32, then cast back.
    """
    k = kernel.astype(jnp.float32)

    def fold(k, axis):
        k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return (jnp.stack([k0, k1 + k2], axis=axis), jnp.stack([k0 + k1, k2], axis=axis))

    phases = [kab for ka in fold(k, 0) for kab in fold(ka, 1)]
    return jnp.concatenate(phases, axis=-1).astype(kernel.dtype)


def _conv_nhwc(x, kernel, padding, precision=None):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, precision=precision,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _upsample_conv3x3_folded(x, kernel, precision=None):
    b, height, width, _ = x.shape
    out_ch = kernel.shape[-1]
    y = _conv_nhwc(x, _fold_upsample_kernel(kernel), ((1, 1), (1, 1)), precision)
    y = y.reshape(b, height + 1, width + 1, 2, 2, out_ch)       # [B, H+1, W+1, a, b, O]
    rows = [jnp.stack([y[:, a:a + height, c:c + width, a, c] for c in range(2)], axis=3)
            for a in range(2)]                                  # each [B, H, W, b, O]
    return jnp.stack(rows, axis=2).reshape(b, 2 * height, 2 * width, out_ch)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def upsample_conv3x3(x, kernel, precision=None):
    """conv3x3(upsample_nearest(x), kernel), (1, 1) padding, no bias: [B,H,W,I] -> [B,2H,2W,O].

    Computed as one 2x2 conv on the low-resolution x with the four phases' folded kernels
    (_fold_upsample_kernel) and an interleave: 16·(H+1)(W+1) instead of 36·HW multiply-adds per
    (I, O) pair, the same function up to float32 rounding. Differentiation: the tangents (in x
    and in the kernel) are those of the plain path, the 3x3 conv of the upsampled input, so the
    backward pass is the one of upsample-then-conv: XLA:CPU's kernel gradient of the 2x2 conv is
    ~50x slower than that of the 3x3 one, and its input gradient slower too. custom_jvp (not
    custom_vjp), so that forward mode (the likelihood's jax.jvp) works too.
    """
    return _upsample_conv3x3_folded(x, kernel, precision)


def _upsample_conv3x3_jvp(precision, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    out = _upsample_conv3x3_folded(x, kernel, precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        # The plain path, not the folded conv: reverse mode transposes this term, and XLA:CPU's
        # transpose of the folded 2x2 conv (4·C input channels) is slower than that of the 3x3
        # conv (profile: +14% conv-backward time in the training step).
        terms.append(_conv_nhwc(upsample_nearest(dx), kernel, ((1, 1), (1, 1)), precision))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(_conv_nhwc(upsample_nearest(x), dkernel, ((1, 1), (1, 1)), precision))
    return out, (sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out))


upsample_conv3x3.defjvp(_upsample_conv3x3_jvp, symbolic_zeros=True)


def upsample_then_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None):
    """lax.conv_general_dilated's signature, for nn.Conv(conv_general_dilated=...): the conv of
    upsample_nearest(lhs) by upsample_conv3x3. Only the case Upsample uses (3x3 NHWC kernel,
    stride 1, (1, 1) padding, no dilation or groups) is accepted."""
    expected = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    if (tuple(window_strides) != (1, 1) or tuple(map(tuple, padding)) != ((1, 1), (1, 1))
            or rhs.shape[:2] != (3, 3) or tuple(lhs_dilation or (1, 1)) != (1, 1)
            or tuple(rhs_dilation or (1, 1)) != (1, 1) or feature_group_count != 1
            or dimension_numbers != expected):
        raise ValueError('upsample_then_conv only computes a stride-1 3x3 NHWC conv with '
                         '(1, 1) padding.')
    return upsample_conv3x3(lhs, rhs, precision)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (no transposed conv, which makes checkerboards).

    The conv is flax's nn.Conv named 'conv' (parameters 'kernel' [3, 3, C, C], 'bias'), fed the
    low-resolution x: its conv_general_dilated is upsample_then_conv, which upsamples and
    convolves in one folded conv (upsample_conv3x3).
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(x.shape[-1], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=jnp.float32, kernel_init=default_init(1.0), name='conv',
                       conv_general_dilated=upsample_then_conv)(x)


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


# -- latent diffusion's spatial transformer (Rombach et al. 2022) --------------------------------
# CompVis' ldm Normalize and diffusers' Transformer2DModel: GroupNorm ε = 1e-6 before proj_in;
# the blocks' LayerNorms keep PyTorch's default ε = 1e-5.
SPATIAL_TRANSFORMER_GN_EPSILON = 1e-6
TRANSFORMER_LN_EPSILON = 1e-5
# BasicTransformerBlock's feed-forward: GEGLU with an inner width of 4·C (Shazeer 2020).
GEGLU_MULT = 4


def context_mask(mask, num_queries: int):
    """[B, L] keep (1/True) / drop (0) over the context -> [B, 1, Q, L] bool, or None."""
    if mask is None:
        return None
    keep = jnp.asarray(mask) > 0
    return jnp.broadcast_to(keep[:, None, None, :], (keep.shape[0], 1, num_queries,
                                                     keep.shape[1]))


class CrossAttention(nn.Module):
    """softmax(q k^T/√d + mask) v over heads; q = to_q(x), k, v = to_k(c), to_v(c), c = context
    (x itself when None); to_q/to_k/to_v have no bias, to_out has one (diffusers' Attention
    with bias=False). x [B, Q, C], context [B, L, D], mask [B, L] -> [B, Q, C]."""
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = 'auto'

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        b, n, c = x.shape
        context = x if context is None else context.astype(self.dtype)
        proj = lambda name, bias=False: nn.Dense(c, use_bias=bias, dtype=self.dtype,
                                                 param_dtype=jnp.float32, name=name)
        q = proj('to_q')(x).reshape(b, n, self.num_heads, -1)
        k = proj('to_k')(context).reshape(b, context.shape[1], self.num_heads, -1)
        v = proj('to_v')(context).reshape(b, context.shape[1], self.num_heads, -1)
        # A mask is only taken by the XLA kernel here; so is float32.
        impl = ('xla' if mask is not None else
                select_attention_implementation(self.implementation, self.dtype, q.shape[-1]))
        a = jax.nn.dot_product_attention(q, k, v, mask=context_mask(mask, n), implementation=impl)
        return proj('to_out', True)(a.reshape(b, n, c))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (norm_type='layer_norm', activation_fn='geglu'):
        h = h + attn1(LN1(h));  h = h + attn2(LN2(h), context, mask)
        h = h + ff_out(a · gelu(g)),  (a, g) = split(ff_proj(LN3(h)))   GEGLU, 4·C inner."""
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = 'auto'

    @nn.compact
    def __call__(self, h, context, mask=None):
        c = h.shape[-1]
        norm = lambda name: nn.LayerNorm(TRANSFORMER_LN_EPSILON, dtype=jnp.float32, name=name)
        attn = lambda name: CrossAttention(self.num_heads, self.dtype, self.implementation,
                                           name=name)
        h = h + attn('attn1')(norm('norm1')(h).astype(self.dtype)).astype(h.dtype)
        h = h + attn('attn2')(norm('norm2')(h).astype(self.dtype), context, mask).astype(h.dtype)
        a, gate = jnp.split(dense(2 * GEGLU_MULT * c, self.dtype, 'ff_proj')(
            norm('norm3')(h).astype(self.dtype)), 2, axis=-1)
        ff = dense(c, self.dtype, 'ff_out')(a * jax.nn.gelu(gate, approximate=False))
        return h + ff.astype(h.dtype)


class SpatialTransformer(nn.Module):
    """Latent diffusion's spatial transformer (diffusers' Transformer2DModel, continuous input):
        h = proj_in(GN(x)) as [B, H·W, C];  depth × TransformerBlock(h, context, mask)
        out = x + proj_out_zero_init(h)
    proj_in / proj_out act on the channels at each position: a 1x1 conv (SD 1.x) and a linear
    layer (SD 2.x, use_linear_projection) are the same map, so both are dense layers here and
    the choice only decides the checkpoint's key shapes. proj_out starts at zero, as CompVis'
    zero_module(proj_out), so a fresh block is the identity.
    x [B, H, W, C], context [B, L, D], mask [B, L] or None -> [B, H, W, C]."""
    num_heads: int
    depth: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    implementation: str = 'auto'

    @nn.compact
    def __call__(self, x, context, mask=None):
        b, height, width, c = x.shape
        h = GroupNorm(self.num_groups, self.dtype, SPATIAL_TRANSFORMER_GN_EPSILON, name='norm')(x)
        h = dense(c, self.dtype, 'proj_in')(h).reshape(b, height * width, c)
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.dtype, self.implementation,
                                 name=f'block_{i}')(h, context, mask)
        h = dense(c, self.dtype, 'proj_out', init_scale=0.0)(h).reshape(b, height, width, c)
        return x + h
