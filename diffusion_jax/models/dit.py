"""DiT: the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers"), with adaLN-Zero conditioning.

    eps_theta(x_t, t, y):  x_t [B, H, W, C], t [B], y [B] int (or None) -> [B, H, W, C_out] float32
    C_out = 2·C when learn_sigma (ε and the improved-DDPM variance interpolation v), else C.

Structure (D = hidden_size, p = patch_size, T = (H/p)·(W/p) tokens in row-major order):
    tokens = conv_{p×p, stride p}(x) + pos                   [B, T, D]
        pos: fixed 2-D sin-cos table (a constant, not a parameter): for the token at (row i,
        column j), pos = [e(j), e(i)] with e(u) = [sin(u·ω), cos(u·ω)], ω_k = 10000^(-k/(D/4)),
        k = 0..D/4-1 (MAE's table, which DiT uses; the first half encodes the column).
    c = MLP(sinusoid_256(t)) + E[y]                           [B, D]
        sinusoid: 128 frequencies f_k = exp(-ln(10000)·k/128), [cos(t f), sin(t f)];
        MLP = Linear(256, D), SiLU, Linear(D, D); E has num_classes + 1 rows, the last the null
        label of classifier-free guidance (y=None selects it for the whole batch).
    depth × adaLN-Zero block:
        (β1, γ1, α1, β2, γ2, α2) = Linear_zero(SiLU(c))       each [B, D]
        h = h + α1 · Attn(LN(h)·(1 + γ1) + β1)
        h = h + α2 · MLP_gelu-tanh(LN(h)·(1 + γ2) + β2)       hidden width mlp_ratio·D
    final: (β, γ) = Linear_zero(SiLU(c)); out = Linear_zero(LN(h)·(1 + γ) + β)  [B, T, p·p·C_out]
    unpatchify: [B, H/p, W/p, p, p, C_out] -> [B, H, W, C_out]
LN is a LayerNorm without affine parameters (ε = 1e-6). The modulation and output layers start
at zero, so every block starts as the identity and the untrained model predicts 0.

Parameter names follow facebookresearch/DiT's state dict with '.' -> '_' (x_embedder,
t_embedder_mlp_0, t_embedder_mlp_2, y_embedder, blocks_N/{attn_qkv, attn_proj, mlp_fc1, mlp_fc2,
adaLN_modulation}, final_layer_linear, final_layer_adaLN_modulation), so that the converter's
table (convert/tables.py) reads one to one.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers

# Peebles & Xie 2023, Sec. 3.2 (DiT's TimestepEmbedder): a 256-dimensional frequency embedding.
FREQUENCY_EMBEDDING_SIZE = 256
# DiT's LayerNorms: nn.LayerNorm(elementwise_affine=False, eps=1e-6).
LAYERNORM_EPSILON = 1e-6
# DiT's initialize_weights: N(0, 0.02) for the label table and the timestep MLP.
EMBEDDING_INIT_STD = 0.02


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table [grid_h·grid_w, dim] (float32; see module docstring).

    Row n = i·grid_w + j is the token at row i, column j; its first dim/2 entries encode j and
    the last dim/2 encode i, each as [sin(u·ω), cos(u·ω)] with ω_k = 10000^(-k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f'model_config.hidden_size={dim}: the 2-D sin-cos position embedding '
                         'needs a multiple of 4.')
    quarter = dim // 4
    omega = 1.0 / layers.MAX_PERIOD ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing='ij')

    def embed(u):
        arg = u.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)

    return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def modulate(h, shift, scale):
    """h [B, T, D]·(1 + scale) + shift, with shift, scale [B, D] broadcast over the tokens."""
    return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(h, epsilon: float):
    """LayerNorm over the last axis without affine parameters, statistics in float32."""
    x = h.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + epsilon)).astype(h.dtype)


def _dense(features: int, dtype, name: str, zero: bool = False):
    # DiT initialises every Linear xavier-uniform with zero bias (_basic_init); adaLN-Zero zeros.
    init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                    bias_init=nn.initializers.zeros, name=name)


def patch_embed_init(key, shape, dtype=jnp.float32):
    """DiT initialises the patch conv [p, p, C, D] like a Linear of p·p·C inputs and D outputs
    (xavier-uniform of the flattened kernel), not with the conv's receptive-field fan-out."""
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block: h [B, T, D], c [B, D] -> [B, T, D]."""
    num_heads: int
    mlp_ratio: float = 4.0
    attention_implementation: str = 'auto'
    dtype: layers.Dtype = jnp.float32
    norm_epsilon: float = LAYERNORM_EPSILON

    @nn.compact
    def __call__(self, h, c):
        b, n, d = h.shape
        mod = _dense(6 * d, self.dtype, 'adaLN_modulation', zero=True)(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

        a = modulate(layer_norm(h, self.norm_epsilon), shift1, scale1)
        qkv = _dense(3 * d, self.dtype, 'attn_qkv')(a)
        # timm's Attention: qkv channels as (3, heads, D/heads), the 'new' order.
        q, k, v = layers.split_qkv(qkv, self.num_heads, 'new')
        impl = layers.select_attention_implementation(self.attention_implementation, self.dtype,
                                                      q.shape[-1])
        a = jax.nn.dot_product_attention(q, k, v, implementation=impl).reshape(b, n, d)
        h = h + gate1[:, None, :] * _dense(d, self.dtype, 'attn_proj')(a)

        m = modulate(layer_norm(h, self.norm_epsilon), shift2, scale2)
        m = _dense(int(d * self.mlp_ratio), self.dtype, 'mlp_fc1')(m)
        m = _dense(d, self.dtype, 'mlp_fc2')(nn.gelu(m, approximate=True))
        return h + gate2[:, None, :] * m


def validate_dit_fields(m) -> None:
    """Raises one ValueError naming the offending model_config field and the fix."""
    layers.compute_dtype(m.dtype)
    layers.check_choice('attention_implementation', m.attention_implementation,
                        layers.ATTENTION_IMPLEMENTATIONS)
    for field in ('image_size', 'in_channels', 'patch_size', 'hidden_size', 'depth',
                  'num_heads'):
        if getattr(m, field) < 1:
            raise ValueError(f'model_config.{field}={getattr(m, field)} must be >= 1.')
    if m.image_size % m.patch_size:
        raise ValueError(f'model_config.image_size={m.image_size} is not divisible by '
                         f'patch_size={m.patch_size}: use a patch size that divides it.')
    if m.hidden_size % m.num_heads:
        raise ValueError(f'model_config.num_heads={m.num_heads} does not divide hidden_size='
                         f'{m.hidden_size}: pick a divisor.')
    if m.hidden_size % 4:
        raise ValueError(f'model_config.hidden_size={m.hidden_size} must be a multiple of 4 '
                         '(the 2-D sin-cos position embedding).')
    if m.num_classes < 0:
        raise ValueError(f'model_config.num_classes={m.num_classes} must be >= 0 (0: '
                         'unconditional).')
    if not m.mlp_ratio > 0:
        raise ValueError(f'model_config.mlp_ratio={m.mlp_ratio} must be > 0 (DiT: 4).')


class DiT(nn.Module):
    """Diffusion transformer; fields are those of configs/model_configs.dit (see there)."""
    image_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    norm_epsilon: float = LAYERNORM_EPSILON
    attention_implementation: str = 'auto'
    dtype: str = 'float32'
    remat: bool = False

    def __post_init__(self):
        validate_dit_fields(self)
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def check_input(self, x) -> None:
        p = self.patch_size
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f'input of shape {x.shape} does not fit model_config.in_channels='
                             f'{self.in_channels}, patch_size={p}: pass NHWC inputs with H, W '
                             f'divisible by {p}.')

    def condition(self, t, y, dtype):
        """c = MLP(sinusoid(t)) + E[y]: [B] -> [B, D]."""
        d = self.hidden_size
        init = nn.initializers.normal(EMBEDDING_INIT_STD)
        freq = layers.timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, 'improved').astype(dtype)
        mlp = [nn.Dense(d, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                        name=f't_embedder_mlp_{i}') for i in (0, 2)]
        c = mlp[1](nn.silu(mlp[0](freq)))
        if self.num_classes == 0:
            if y is not None:
                raise ValueError('a label y was passed to an unconditional model: set '
                                 'model_config.num_classes > 0 or call the model with y=None.')
            return c
        if y is None:
            y = jnp.full(t.shape, self.num_classes, jnp.int32)
        table = nn.Embed(self.num_classes + 1, d, dtype=dtype, param_dtype=jnp.float32,
                         embedding_init=init, name='y_embedder')
        return c + table(y)

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        """x [B, H, W, in_channels], t [B], y [B] int or None -> [B, H, W, out_channels]."""
        del train  # DiT has no dropout; label dropout happens in the train step
        self.check_input(x)
        dtype = layers.compute_dtype(self.dtype)
        b, height, width, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        gh, gw = height // p, width // p
        t = jnp.broadcast_to(t, (b,))
        h = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=patch_embed_init,
                    name='x_embedder')(x.astype(dtype))
        pos = jnp.asarray(sincos_pos_embed_2d(d, gh, gw), dtype)
        h = h.reshape(b, gh * gw, d) + pos[None]
        c = self.condition(t, y, dtype)

        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            h = block_cls(self.num_heads, self.mlp_ratio, self.attention_implementation, dtype,
                          self.norm_epsilon, name=f'blocks_{i}')(h, c)

        shift, scale = jnp.split(
            _dense(2 * d, dtype, 'final_layer_adaLN_modulation', zero=True)(nn.silu(c)), 2, -1)
        h = modulate(layer_norm(h, self.norm_epsilon), shift, scale)
        h = _dense(p * p * self.out_channels, dtype, 'final_layer_linear', zero=True)(h)
        h = h.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, self.out_channels).astype(jnp.float32)
