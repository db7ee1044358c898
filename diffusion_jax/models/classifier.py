"""Noisy-image classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

    logits = head(middle(encode(x_t, emb(t))))   x_t [B, H, W, C], t [B] -> [B, num_classes] float32

The trunk is the UNet's down path and middle block (same fields, same blocks); the head is
    'attention': GN -> swish -> attention pooling (ADM's AttentionPool2d, from CLIP): the spatial
                 mean is prepended as an extra token, a learned positional embedding is added, and
                 the mean token's multi-head attention output is projected to the logits;
    'adaptive':  GN -> swish -> mean over H, W -> zero-initialised dense to the logits (ADM's
                 'adaptive' head: AdaptiveAvgPool2d then a 1x1 conv);
    'spatial':   the spatial means of every down-path output (conv_in included) and of the middle
                 block, concatenated -> dense(2048) -> ReLU -> dense to the logits (ADM's
                 'spatial' head).

Classifier guidance needs ∇_{x_t} log p_phi(y | x_t, t), which `classifier_log_prob_grad` returns.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models import unet

POOLS = ('attention', 'adaptive', 'spatial')
# Hidden width of ADM's 'spatial' head (guided-diffusion unet.py, EncoderUNetModel).
SPATIAL_HEAD_WIDTH = 2048


class AttentionPool(nn.Module):
    """[B, H, W, C] -> [B, out_dim]: the mean token attends over itself and all H·W positions."""
    num_heads: int
    out_dim: int
    implementation: str = 'auto'
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        tokens = x.reshape(b, height * width, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        # CLIP's scale 1/√C keeps the positional term the size of a unit-variance feature.
        pos = self.param('positional_embedding', nn.initializers.normal(c ** -0.5),
                         (height * width + 1, c), jnp.float32)
        tokens = tokens + pos.astype(self.dtype)
        qkv = layers.dense(3 * c, self.dtype, 'qkv')(tokens)
        # ADM's AttentionPool2d always uses the 'new' (3, heads, C/heads) channel order.
        q, k, v = layers.split_qkv(qkv, self.num_heads, 'new')
        # Only the mean token's output is read, so only its query is needed.
        q = q[:, :1]
        impl = layers.select_attention_implementation(self.implementation, self.dtype,
                                                      q.shape[-1])
        a = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return layers.dense(self.out_dim, self.dtype, 'c_proj')(a.reshape(b, c))


class Classifier(nn.Module):
    """ADM's EncoderUNetModel. num_classes is the number of logits (>= 2 makes sense)."""
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16, 8)
    dropout: float = 0.0
    num_heads: int = 0
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    rescale_skip: bool = False
    timestep_embedding: str = 'improved'
    pool: str = 'attention'
    num_groups: int = 32
    attention_implementation: str = 'auto'
    dtype: str = 'float32'
    norm_epsilon: float = layers.GROUPNORM_EPSILON
    downsample_padding: str = 'symmetric'
    timestep_scale: float = 1.0
    qkv_order: str = 'new'

    def __post_init__(self):
        unet.validate_unet_fields(self)
        layers.check_choice('pool', self.pool, POOLS)
        if self.num_classes < 1:
            raise ValueError(f'model_config.num_classes={self.num_classes}: a classifier needs '
                             'num_classes >= 1 logits; set it to the number of data classes.')
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t, train: bool = False):
        """x [B, H, W, in_channels], t [B] -> logits [B, num_classes] float32."""
        unet.check_input(self, x)
        dtype = layers.compute_dtype(self.dtype)
        t = jnp.broadcast_to(t, x.shape[:1])
        emb = unet.time_embedding(self, t)
        h, hs = unet.encode(self, x, emb, train)
        h = unet.middle(self, h, emb, train)
        if self.pool == 'spatial':
            means = [a.astype(jnp.float32).mean(axis=(1, 2)) for a in (*hs, h)]
            feats = jnp.concatenate(means, axis=-1).astype(dtype)
            feats = nn.relu(layers.dense(SPATIAL_HEAD_WIDTH, dtype, 'head_0')(feats))
            return layers.dense(self.num_classes, dtype, 'head_1')(feats).astype(jnp.float32)
        h = nn.swish(layers.GroupNorm(self.num_groups, dtype, self.norm_epsilon,
                                      name='norm_out')(h))
        if self.pool == 'attention':
            heads = layers.resolve_num_heads(h.shape[-1], self.num_heads, self.num_head_channels)
            logits = AttentionPool(heads, self.num_classes, self.attention_implementation, dtype,
                                   name='pool')(h)
        else:
            pooled = h.astype(jnp.float32).mean(axis=(1, 2)).astype(dtype)
            # Zero init as ADM's zero_module: a fresh classifier is uniform over the classes.
            logits = layers.dense(self.num_classes, dtype, 'head', init_scale=0.0)(pooled)
        return logits.astype(jnp.float32)


def classifier_log_prob_grad(model: nn.Module, params, x_t, t, y):
    """log p(y | x_t, t) [B] and its gradient with respect to x_t (same shape as x_t).

    The examples are independent, so the gradient of Σ_b log p(y_b | x_t,b) gives every example's
    own gradient in one backward pass. Pure: jit it with `model` closed over or static.
    """
    def total_log_prob(x):
        logits = model.apply(params, x, t, train=False)
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        return log_probs.sum(), log_probs

    (_, log_probs), grad = jax.value_and_grad(total_log_prob, has_aux=True)(x_t)
    return log_probs, grad
