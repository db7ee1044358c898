"""Time-conditioned MLP denoiser for low-dimensional data (e.g. the 2-D swiss roll).

    x [B, D], t [B] (, y [B]) -> [B, out_dim] float32, out_dim = D (or 2D for learned variance);
    a self-conditioned MLP takes in_dim = 2D inputs [x_t, x̂_0] (0: in_dim = data_dim)

    emb = dense(swish(dense(sinusoid(t, hidden_dim))))      (+ label embedding, num_classes > 0)
    h_0 = dense(x)
    h_l = dropout(swish(dense(h_{l-1}) + dense(swish(emb))))   l = 1..num_layers
    out = dense_zero_init(h_L)

The zero-initialised output makes a fresh model predict 0, as the UNet does.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers


class MLP(nn.Module):
    """Fields as in configs/model_configs.swissroll_mlp(); out_dim 0 means data_dim."""
    data_dim: int = 2
    out_dim: int = 0
    in_dim: int = 0  # 0: data_dim; 2·data_dim for training.self_condition (derived)
    hidden_dim: int = 128
    num_layers: int = 3
    dropout: float = 0.0
    timestep_embedding: str = 'ddpm'
    num_classes: int = 0
    dtype: str = 'float32'

    def __post_init__(self):
        layers.compute_dtype(self.dtype)
        layers.check_choice('timestep_embedding', self.timestep_embedding,
                            layers.TIMESTEP_EMBEDDINGS)
        for field in ('data_dim', 'hidden_dim', 'num_layers'):
            if getattr(self, field) < 1:
                raise ValueError(f'model_config.{field}={getattr(self, field)} must be >= 1.')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'model_config.dropout={self.dropout} is outside [0, 1): '
                             'pick a rate in it.')
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        """x [B, data_dim], t [B], y [B] or None -> [B, out_dim or data_dim] float32."""
        in_dim = self.in_dim or self.data_dim
        if x.ndim != 2 or x.shape[-1] != in_dim:
            raise ValueError(f'input of shape {x.shape} does not fit model_config.in_dim='
                             f'{in_dim}: pass [B, in_dim] points (in_dim 0 = data_dim).')
        dtype = layers.compute_dtype(self.dtype)
        t = jnp.broadcast_to(t, x.shape[:1])
        emb = layers.TimeEmbedding(self.hidden_dim, self.hidden_dim, self.timestep_embedding,
                                   dtype, name='temb')(t)
        emb = nn.swish(layers.add_label_embedding(emb, y, self.num_classes, dtype))
        h = layers.dense(self.hidden_dim, dtype, 'dense_in')(x.astype(dtype))
        for i in range(self.num_layers):
            h = layers.dense(self.hidden_dim, dtype, f'layer_{i}')(h)
            h = nn.swish(h + layers.dense(self.hidden_dim, dtype, f'temb_proj_{i}')(emb))
            if self.dropout > 0:
                h = nn.Dropout(self.dropout)(h, deterministic=not train)
        out = layers.dense(self.out_dim or self.data_dim, dtype, 'dense_out', init_scale=0.0)(h)
        return out.astype(jnp.float32)
