"""CLIP's text transformer (Radford et al. 2021), laid out as transformers' `CLIPTextModel`.

    out = CLIPTextEncoder(...).apply({'params': p}, input_ids [B, L] int, attention_mask [B, L])
    out['last_hidden_state'] [B, L, D]   final LayerNorm of the last block's output
    out['pooler_output']     [B, D]      last_hidden_state at the EOS token of each row
    out['hidden_states']     tuple of num_layers + 1 [B, L, D]: the embeddings, then each
                             block's output (before the final LayerNorm), as transformers'
                             output_hidden_states=True returns them

Structure (D = hidden_size, pre-LN blocks):
    h_0 = token_embedding[input_ids] + position_embedding[0:L]
    h_i = h' + fc2(act(fc1(LN2(h')))),  h' = h_{i-1} + out_proj(MHA(LN1(h_{i-1})))
    MHA: softmax(q k^T / sqrt(D/heads) + causal mask [+ padding mask]) v per head
    act: quick_gelu(x) = x · sigmoid(1.702 x) (OpenAI CLIP) or the exact erf GELU (OpenCLIP-H)

Pooling follows transformers (modeling_clip.CLIPTextTransformer): with the legacy
eos_token_id == 2 of old configs (the one openai/clip-vit-large-patch14 ships) the EOS position
is argmax(input_ids) (the EOS id is the largest id of CLIP's vocabulary); otherwise it is the
first position where input_ids == eos_token_id.

Stable Diffusion passes no padding mask to the encoder (attention_mask=None): the padding tokens
then attend causally like any other, and their states are part of the context.

Parameters are named after transformers' modules; `convert_transformers_state_dict` maps a
CLIPTextModel state dict onto them and refuses any missing, unexpected or
misshapen key. Keys are taken with or without the `text_model.` prefix: the checkpoint files
(e.g. a diffusers pipeline's text_encoder/model.safetensors) carry it, transformers >= 5's
in-memory CLIPTextModel.state_dict() does not. Tokenisation (`load_clip_tokenizer`, `tokenize`)
is transformers' CLIPTokenizer (the `tokenizers` package) from a local folder's vocab.json and
merges.txt; nothing is downloaded. `prompt_condition` turns prompts into the UNet's condition.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers

ACTIVATIONS = ('quick_gelu', 'gelu')
# transformers' CLIPTextConfig: the legacy eos_token_id that selects argmax pooling.
LEGACY_EOS_TOKEN_ID = 2
# OpenAI CLIP's quick-GELU constant (Radford et al. 2021, released code: x * sigmoid(1.702 x)).
QUICK_GELU_ALPHA = 1.702
# transformers' CLIPTextConfig fields and ours (for from_transformers_config).
_HF_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
              'intermediate_size': 'intermediate_size', 'num_hidden_layers': 'num_layers',
              'num_attention_heads': 'num_heads', 'max_position_embeddings': 'max_length',
              'hidden_act': 'hidden_act', 'layer_norm_eps': 'layer_norm_eps',
              'eos_token_id': 'eos_token_id'}
# The non-persistent buffer older transformers exports still carry: positions 0..max_length-1.
TEXT_MODEL_PREFIX = 'text_model.'
_POSITION_IDS_KEY = 'embeddings.position_ids'


def activation(name: str):
    if name == 'quick_gelu':
        return lambda x: x * jax.nn.sigmoid(QUICK_GELU_ALPHA * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


def eos_positions(input_ids, eos_token_id: int):
    """[B] index of each row's EOS token, as transformers' CLIPTextTransformer picks it."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def attention_bias(length: int, attention_mask=None):
    """Additive mask [B or 1, 1, L, L]: causal, and keys with attention_mask == 0 excluded."""
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def embed_tokens(module: nn.Module, input_ids, field: str, fix: str):
    """h_0 = token_embedding[input_ids] + position_embedding[0:L] [B, L, D], the parameters
    created in `module` (a text encoder's compact __call__: vocab_size, hidden_size,
    max_length); input_ids longer than max_length are refused in one line naming `field`."""
    length = input_ids.shape[1]
    if length > module.max_length:
        raise ValueError(f'input_ids of length {length} exceed {field}={module.max_length}: '
                         f'{fix}.')
    tokens = nn.Embed(module.vocab_size, module.hidden_size, name='token_embedding')(input_ids)
    positions = module.param('position_embedding', nn.initializers.normal(0.01),
                             (module.max_length, module.hidden_size))
    return tokens + positions[None, :length]


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        b, length, d = h.shape
        head_dim = d // self.num_heads
        proj = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
        split = lambda a: a.reshape(b, length, self.num_heads, head_dim)
        q, k, v = (split(proj(n)(h)) for n in ('q_proj', 'k_proj', 'v_proj'))
        logits = jnp.einsum('bqhc,bkhc->bhqk', q, k,
                            preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
        a = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, length, d)
        return proj('out_proj')(a)


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, bias):
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name=name)
        h = h + CLIPAttention(self.num_heads, self.dtype, name='self_attn')(
            norm('layer_norm1')(h).astype(self.dtype), bias).astype(h.dtype)
        m = norm('layer_norm2')(h).astype(self.dtype)
        m = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(m)
        m = nn.Dense(h.shape[-1], dtype=self.dtype, name='fc2')(activation(self.hidden_act)(m))
        return h + m.astype(h.dtype)


def validate_text_fields(m) -> None:
    layers.compute_dtype(m.dtype)
    layers.check_choice('text_encoder.hidden_act', m.hidden_act, ACTIVATIONS)
    if m.num_heads < 1 or m.hidden_size % m.num_heads:
        raise ValueError(f'model_config.text_encoder.num_heads={m.num_heads} does not divide '
                         f'hidden_size={m.hidden_size}: pick a divisor.')
    for field in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'max_length'):
        if getattr(m, field) < 1:
            raise ValueError(f'model_config.text_encoder.{field}={getattr(m, field)} must be '
                             '>= 1.')


class CLIPTextEncoder(nn.Module):
    """transformers' CLIPTextModel; the defaults are CLIP ViT-L/14's text tower (SD 1.x)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = 'float32'

    def __post_init__(self):
        validate_text_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, L] int (L <= max_length), attention_mask [B, L] 1/0 or None."""
        b, length = input_ids.shape
        h = embed_tokens(self, input_ids, 'model_config.text_encoder.max_length', 'truncate the '
                         'tokens')
        dtype = layers.compute_dtype(self.dtype)
        bias = attention_bias(length, attention_mask)
        hidden_states = [h]
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, dtype, name=f'layers_{i}')(h, bias)
            hidden_states.append(h)
        last = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name='final_layer_norm')(h)
        pooled = last[jnp.arange(b), eos_positions(input_ids, self.eos_token_id)]
        return {'last_hidden_state': last.astype(jnp.float32),
                'pooler_output': pooled.astype(jnp.float32),
                'hidden_states': tuple(s.astype(jnp.float32) for s in hidden_states)}


def from_transformers_config(config, **overrides) -> CLIPTextEncoder:
    """Our module for a transformers CLIPTextConfig (or its dict, e.g. a config.json)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    kwargs = {ours: get(theirs) for theirs, ours in _HF_FIELDS.items() if get(theirs) is not None}
    return CLIPTextEncoder(**{**kwargs, **overrides})


def init_text_params(module: CLIPTextEncoder, rng) -> dict:
    ids = jnp.zeros((1, module.max_length), jnp.int32)
    return jax.jit(module.init)(rng, ids)


def transformers_table(module: CLIPTextEncoder) -> dict[str, tuple[tuple[str, ...], str]]:
    """{transformers key (without `text_model.`): (our param path, 'copy' | 'linear')}."""
    table = {'embeddings.token_embedding.weight': (('token_embedding', 'embedding'), 'copy'),
             'embeddings.position_embedding.weight': (('position_embedding',), 'copy')}

    def add(src, ours, linear):
        table[f'{src}.weight'] = (ours + (('kernel',) if linear else ('scale',)),
                                  'linear' if linear else 'copy')
        table[f'{src}.bias'] = (ours + ('bias',), 'copy')
    for i in range(module.num_layers):
        src, ours = f'encoder.layers.{i}', (f'layers_{i}',)
        for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
            add(f'{src}.self_attn.{proj}', ours + ('self_attn', proj), True)
        add(f'{src}.mlp.fc1', ours + ('fc1',), True)
        add(f'{src}.mlp.fc2', ours + ('fc2',), True)
        add(f'{src}.layer_norm1', ours + ('layer_norm1',), False)
        add(f'{src}.layer_norm2', ours + ('layer_norm2',), False)
    add('final_layer_norm', ('final_layer_norm',), False)
    return table


def _numpy(value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor (bfloat16 has no numpy dtype: .float() first)
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def convert_transformers_state_dict(state_dict: Mapping[str, Any],
                                    module: CLIPTextEncoder) -> dict:
    """Our params (float32 numpy) from a CLIPTextModel state dict; raises one ValueError that
    lists every missing key, unexpected key and shape mismatch (nothing is loaded then)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, module.max_length), jnp.int32))['params']
    table = transformers_table(module)
    state_dict = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in state_dict.items()}
    params, problems = {}, []
    for key in state_dict:
        if key not in table and key != _POSITION_IDS_KEY:
            problems.append(f'unexpected key {key}: no parameter of this text encoder takes it')
    for key, (path, kind) in table.items():
        target = shapes
        for part in path:
            target = target[part]
        want = tuple(target.shape[::-1]) if kind == 'linear' else tuple(target.shape)
        if key not in state_dict:
            problems.append(f'missing key {key} (shape {want})')
            continue
        array = _numpy(state_dict[key]).astype(np.float32)
        if array.shape != want:
            problems.append(f'shape mismatch {key}: {array.shape} in the checkpoint, {want} '
                            'expected')
            continue
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(array.T if kind == 'linear' else array)
    if problems:
        raise ValueError(f'the transformers CLIPTextModel state dict does not fit the text encoder '
                         f'({len(problems)} problem(s)); nothing was loaded:\n'
                         + '\n'.join(problems))
    return params


# -- tokenisation --------------------------------------------------------------------------------


def load_clip_tokenizer(folder):
    """transformers' CLIPTokenizer from a local folder holding vocab.json and merges.txt (a
    diffusers pipeline's tokenizer/); nothing is downloaded."""
    folder = pathlib.Path(folder)
    missing = [f for f in ('vocab.json', 'merges.txt') if not (folder / f).exists()]
    if missing:
        raise ValueError(f'tokenizer folder {folder} lacks {" and ".join(missing)}: pass the '
                         "pipeline's tokenizer/ folder.")
    try:
        from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError('CLIP tokenisation needs transformers: '
                          'pip install -e ".[torch]"') from err
    # from_pretrained on the folder reads its tokenizer_config / special_tokens_map too (SD 2.x
    # pads with '!' rather than the EOS token), and local_files_only keeps it off the network.
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts, max_length: int = 77) -> np.ndarray:
    """[len(prompts), max_length] int32 ids: BOS, the BPE tokens, EOS, padded and truncated to
    max_length as the Stable Diffusion pipelines call the tokenizer."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = tokenizer(prompts, padding='max_length', truncation=True, max_length=max_length,
                    return_tensors='np')
    return np.asarray(out['input_ids'], np.int32)


def prompt_condition(module: CLIPTextEncoder, params, tokenizer, prompts) -> dict:
    """{'context': [N, max_length, D]} for the UNet from prompts, as the Stable Diffusion
    pipelines encode them: tokenised to max_length, encoded without a padding mask, the context
    being last_hidden_state. The empty prompt '' gives classifier-free guidance's ∅."""
    ids = tokenize(tokenizer, prompts, module.max_length)
    out = module.apply({'params': params}, jnp.asarray(ids))
    return {'context': out['last_hidden_state']}



# -- text encoders trained jointly with the diffusion model --------------------------------------
TEXT_ENCODERS = ('small', 'clip')


def padding_bias(attention_mask):
    """Additive mask [B, 1, 1, L]: keys with attention_mask == 0 excluded (no causal mask)."""
    keep = jnp.asarray(attention_mask)[:, None, None, :] > 0
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)


class SmallTextEncoder(nn.Module):
    """A small bidirectional text transformer, trained jointly with the diffusion model
    (model.text_encoder='small'): the blocks of CLIPTextEncoder without the causal mask, the
    padding tokens excluded as keys. It is torch.nn.TransformerEncoder(norm_first=True,
    batch_first=True) with a final LayerNorm and src_key_padding_mask = (attention_mask == 0):

        h_0 = token_embedding[input_ids] + position_embedding[0:L]
        h_i = h' + fc2(act(fc1(LN2(h')))),  h' = h_{i-1} + out_proj(MHA(LN1(h_{i-1}), pad mask))
        last_hidden_state = LN(h_n)   [B, L, D]

    input_ids [B, L] int, attention_mask [B, L] 1/0 (None: every token kept)."""
    vocab_size: int = 32
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 8
    hidden_act: str = 'gelu'
    layer_norm_eps: float = 1e-5
    dtype: str = 'float32'

    def __post_init__(self):
        validate_text_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        b, length = input_ids.shape
        h = embed_tokens(self, input_ids, 'model_config.text.max_length', 'raise it or shorten '
                         'the captions')
        dtype = layers.compute_dtype(self.dtype)
        mask = jnp.ones((b, length), jnp.int32) if attention_mask is None else attention_mask
        bias = padding_bias(mask)
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, dtype, name=f'layers_{i}')(h, bias)
        last = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, name='final_layer_norm')(h)
        return {'last_hidden_state': last.astype(jnp.float32)}


def make_text_encoder(kind: str, fields: Mapping[str, Any]):
    """The jointly trained encoder of model.text_encoder=kind from the model.text fields."""
    if kind not in TEXT_ENCODERS:
        raise ValueError(f'model.text_encoder={kind!r} is not a trained text encoder: use one of '
                         f"{list(TEXT_ENCODERS)} ('' for none).")
    cls = SmallTextEncoder if kind == 'small' else CLIPTextEncoder
    accepted = {f for f in cls.__dataclass_fields__} - {'parent', 'name'}
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ValueError(f'model.text fields {unknown} are not used by the {kind!r} text encoder: '
                         f'remove them (it takes {sorted(accepted)}).')
    return cls(**dict(fields))


class TextConditioned(nn.Module):
    """A denoising network with its own text encoder, both trained together
    (model.text_encoder = 'small' | 'clip'): one parameter tree {'denoiser': ..., 'encoder': ...}.

        apply(v, x_t, t, cond, train=...)              the denoiser (a UNet with context_dim),
                                                       cond = {'context': [B, L, D], 'mask': [B, L]}
        apply(v, input_ids, attention_mask, method='encode') -> cond

    'small' passes the padding mask to the encoder and the cross-attention; 'clip' follows the
    Stable Diffusion pipelines (no padding mask anywhere: the causal encoder's padding states are
    part of the context), the path a pretrained CLIP encoder takes. The condition is encoded once
    per prompt (sampling) or per batch (training, with caption dropout on the encoded context)
    and then flows through guidance and every sampler like any context."""
    denoiser: nn.Module
    encoder: nn.Module
    text_encoder: str = 'small'

    @property
    def image_size(self):
        return self.denoiser.image_size

    @property
    def image_width(self):
        return getattr(self.denoiser, 'image_width', 0)

    @property
    def in_channels(self):
        return self.denoiser.in_channels

    @property
    def context_dim(self):
        return self.denoiser.context_dim

    @property
    def max_length(self):
        return self.encoder.max_length

    def encode(self, input_ids, attention_mask=None):
        """input_ids [B, L], attention_mask [B, L] -> {'context': [B, L, D](, 'mask': [B, L])}."""
        if self.text_encoder == 'clip':  # as the SD pipelines: no padding mask
            return {'context': self.encoder(input_ids)['last_hidden_state']}
        mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                else jnp.asarray(attention_mask, jnp.int32))
        return {'context': self.encoder(input_ids, mask)['last_hidden_state'], 'mask': mask}

    def __call__(self, x, t, y=None, train: bool = False):
        if self.is_initializing():  # the encoder's parameters are made with the denoiser's
            self.encode(jnp.zeros((1, self.encoder.max_length), jnp.int32))
        return self.denoiser(x, t, y, train=train)
