"""Name tables: every source (PyTorch) key of a checkpoint -> our parameter path and transform.

A table is a list of `Entry(sources, path, transform)`. It is built by walking the source
network's module layout in the order its constructor creates modules, beside the names our
UNet / Classifier give the same layers; which optional layers exist (a residual block's 1x1 skip,
the label embedding) is read from our parameter tree, so a layer one side has and the other lacks
shows up as a missing or an unexpected key, never as a silent partial load.

Layouts:
  'openai':    improved-diffusion's and guided-diffusion's UNetModel / EncoderUNetModel
               (input_blocks.K.J, middle_block.J, output_blocks.K.J, out.J, time_embed.J).
  'diffusers': diffusers' UNet2DModel with DownBlock2D / AttnDownBlock2D blocks (the DDPM port).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# -- transforms: (to_ours(arrays) -> array, source_shapes(our_shape) -> list of shapes) ---------


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_ours: Callable[..., np.ndarray]
    source_shapes: Callable[[tuple], list[tuple]]


COPY = Transform('copy', lambda a: a, lambda s: [tuple(s)])
# torch Conv2d [O, I, kh, kw] -> flax Conv [kh, kw, I, O]
CONV = Transform('conv', lambda a: a.transpose(2, 3, 1, 0), lambda s: [(s[3], s[2], s[0], s[1])])
# torch Linear [O, I] -> flax Dense [I, O]
LINEAR = Transform('linear', lambda a: a.T, lambda s: [(s[1], s[0])])
# a 1x1 Conv2d [O, I, 1, 1] / Conv1d [O, I, 1] used as a dense layer -> [I, O]
CONV1X1 = Transform('conv1x1', lambda a: a[:, :, 0, 0].T, lambda s: [(s[1], s[0], 1, 1)])
CONV1D = Transform('conv1d', lambda a: a[:, :, 0].T, lambda s: [(s[1], s[0], 1)])
# [C, T] -> [T, C] (AttentionPool2d's positional embedding is stored channels first)
TRANSPOSE = Transform('transpose', lambda a: a.T, lambda s: [(s[1], s[0])])
# nn.Embedding [N, E] -> our table [N + 1, E]: the appended zero row is the null label of
# classifier-free guidance, which the source model was never trained with.
EMBED_NULL_ROW = Transform(
    'embed+null', lambda a: np.concatenate([a, np.zeros_like(a[:1])], 0),
    lambda s: [(s[0] - 1, s[1])])
# diffusers' separate to_q / to_k / to_v Linear layers -> one qkv Dense [C, 3C] ('new' order)
QKV_LINEARS = Transform('q,k,v', lambda q, k, v: np.concatenate([q.T, k.T, v.T], 1),
                        lambda s: [(s[1] // 3, s[0])] * 3)
QKV_BIASES = Transform('q,k,v', lambda q, k, v: np.concatenate([q, k, v]),
                       lambda s: [(s[0] // 3,)] * 3)


@dataclasses.dataclass(frozen=True)
class Entry:
    sources: tuple[str, ...]
    path: tuple[str, ...]
    transform: Transform


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split('/'))


def conv(src: str, ours: str, kind: Transform = CONV) -> list[Entry]:
    return [Entry((f'{src}.weight',), _split(ours) + ('kernel',), kind),
            Entry((f'{src}.bias',), _split(ours) + ('bias',), COPY)]


def linear(src: str, ours: str) -> list[Entry]:
    return conv(src, ours, LINEAR)


def group_norm(src: str, ours: str) -> list[Entry]:
    """Our GroupNorm wrapper holds flax's GroupNorm as 'norm' (scale, bias)."""
    return [Entry((f'{src}.weight',), _split(ours) + ('norm', 'scale'), COPY),
            Entry((f'{src}.bias',), _split(ours) + ('norm', 'bias'), COPY)]


def _has(tree, path: str) -> bool:
    node = tree
    for part in path.split('/'):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# -- OpenAI (improved-diffusion / guided-diffusion) ---------------------------------------------

def _openai_resblock(src: str, ours: str, tree) -> list[Entry]:
    entries = (group_norm(f'{src}.in_layers.0', f'{ours}/norm1')
               + conv(f'{src}.in_layers.2', f'{ours}/conv1')
               + linear(f'{src}.emb_layers.1', f'{ours}/temb_proj')
               + group_norm(f'{src}.out_layers.0', f'{ours}/norm2')
               + conv(f'{src}.out_layers.3', f'{ours}/conv2'))
    if _has(tree, f'{ours}/skip'):  # in != out channels: a 1x1 conv, else the identity
        entries += conv(f'{src}.skip_connection', f'{ours}/skip', CONV1X1)
    return entries


def _openai_attention(src: str, ours: str) -> list[Entry]:
    return (group_norm(f'{src}.norm', f'{ours}/norm') + conv(f'{src}.qkv', f'{ours}/qkv', CONV1D)
            + conv(f'{src}.proj_out', f'{ours}/proj_out', CONV1D))


def _levels(m):
    from diffusion_jax.models import unet  # pylint: disable=import-outside-toplevel
    resolutions = unet.level_resolutions(m['image_size'], m['ch_mult'])
    return [(level, resolutions[level] in tuple(m['attn_resolutions']))
            for level in range(len(m['ch_mult']))]


def _openai_encoder(m, tree) -> list[Entry]:
    entries = linear('time_embed.0', 'temb/dense0') + linear('time_embed.2', 'temb/dense1')
    entries += conv('input_blocks.0.0', 'conv_in')
    k, last = 1, len(m['ch_mult']) - 1
    for level, attn in _levels(m):
        for i in range(m['num_res_blocks']):
            entries += _openai_resblock(f'input_blocks.{k}.0', f'down_{level}_block_{i}', tree)
            if attn:
                entries += _openai_attention(f'input_blocks.{k}.1', f'down_{level}_attn_{i}')
            k += 1
        if level != last:
            if m['resblock_updown']:
                entries += _openai_resblock(f'input_blocks.{k}.0', f'down_{level}_downsample',
                                            tree)
            else:
                entries += conv(f'input_blocks.{k}.0.op', f'down_{level}_downsample/conv')
            k += 1
    entries += _openai_resblock('middle_block.0', 'mid_block_1', tree)
    entries += _openai_attention('middle_block.1', 'mid_attn')
    entries += _openai_resblock('middle_block.2', 'mid_block_2', tree)
    return entries


def openai_unet_table(m, tree) -> list[Entry]:
    """improved-/guided-diffusion UNetModel keys for our UNet of model config m (a dict)."""
    entries = _openai_encoder(m, tree)
    if m.get('num_classes', 0):
        entries.append(Entry(('label_emb.weight',), ('label_emb', 'embedding'), EMBED_NULL_ROW))
    k = 0
    for level, attn in reversed(_levels(m)):
        for i in range(m['num_res_blocks'] + 1):
            entries += _openai_resblock(f'output_blocks.{k}.0', f'up_{level}_block_{i}', tree)
            j = 1
            if attn:
                entries += _openai_attention(f'output_blocks.{k}.1', f'up_{level}_attn_{i}')
                j = 2
            if level and i == m['num_res_blocks']:
                if m['resblock_updown']:
                    entries += _openai_resblock(f'output_blocks.{k}.{j}', f'up_{level}_upsample',
                                                tree)
                else:
                    entries += conv(f'output_blocks.{k}.{j}.conv', f'up_{level}_upsample/conv')
            k += 1
    return entries + group_norm('out.0', 'norm_out') + conv('out.2', 'conv_out')


def openai_classifier_table(m, tree) -> list[Entry]:
    """guided-diffusion EncoderUNetModel keys for our Classifier of model config m (a dict)."""
    entries = _openai_encoder(m, tree)
    if m['pool'] == 'attention':
        return entries + group_norm('out.0', 'norm_out') + [
            Entry(('out.2.positional_embedding',), ('pool', 'positional_embedding'), TRANSPOSE),
            *conv('out.2.qkv_proj', 'pool/qkv', CONV1D), *conv('out.2.c_proj', 'pool/c_proj',
                                                              CONV1D)]
    if m['pool'] == 'adaptive':
        return entries + group_norm('out.0', 'norm_out') + conv('out.3', 'head', CONV1X1)
    return entries + linear('out.0', 'head_0') + linear('out.2', 'head_1')  # 'spatial'


# -- diffusers UNet2DModel ------------------------------------------------------------------------

def _diffusers_resnet(src: str, ours: str, tree) -> list[Entry]:
    entries = (group_norm(f'{src}.norm1', f'{ours}/norm1') + conv(f'{src}.conv1', f'{ours}/conv1')
               + linear(f'{src}.time_emb_proj', f'{ours}/temb_proj')
               + group_norm(f'{src}.norm2', f'{ours}/norm2') + conv(f'{src}.conv2', f'{ours}/conv2'))
    if _has(tree, f'{ours}/skip'):
        entries += conv(f'{src}.conv_shortcut', f'{ours}/skip', CONV1X1)
    return entries


def _diffusers_attention(src: str, ours: str) -> list[Entry]:
    return group_norm(f'{src}.group_norm', f'{ours}/norm') + [
        Entry(tuple(f'{src}.to_{n}.weight' for n in 'qkv'), _split(ours) + ('qkv', 'kernel'),
              QKV_LINEARS),
        Entry(tuple(f'{src}.to_{n}.bias' for n in 'qkv'), _split(ours) + ('qkv', 'bias'),
              QKV_BIASES),
        *linear(f'{src}.to_out.0', f'{ours}/proj_out')]


def layer_norm(src: str, ours: str) -> list[Entry]:
    return [Entry((f'{src}.weight',), _split(ours) + ('scale',), COPY),
            Entry((f'{src}.bias',), _split(ours) + ('bias',), COPY)]


def diffusers_spatial_transformer(src: str, ours: str, depth: int,
                                  use_linear_projection: bool) -> list[Entry]:
    """diffusers' Transformer2DModel keys for layers.SpatialTransformer: proj_in / proj_out are
    Linear layers (use_linear_projection, SD 2.x) or 1x1 convs (SD 1.x); q, k, v have no bias."""
    proj = (lambda a, b: linear(a, b)) if use_linear_projection else (
        lambda a, b: conv(a, b, CONV1X1))
    entries = group_norm(f'{src}.norm', f'{ours}/norm') + proj(f'{src}.proj_in', f'{ours}/proj_in')
    for i in range(depth):
        s, o = f'{src}.transformer_blocks.{i}', f'{ours}/block_{i}'
        for attn in ('attn1', 'attn2'):
            entries += [Entry((f'{s}.{attn}.to_{n}.weight',), _split(f'{o}/{attn}/to_{n}')
                              + ('kernel',), LINEAR) for n in 'qkv']
            entries += linear(f'{s}.{attn}.to_out.0', f'{o}/{attn}/to_out')
        for n in ('norm1', 'norm2', 'norm3'):
            entries += layer_norm(f'{s}.{n}', f'{o}/{n}')
        entries += linear(f'{s}.ff.net.0.proj', f'{o}/ff_proj') + linear(f'{s}.ff.net.2',
                                                                           f'{o}/ff_out')
    return entries + proj(f'{src}.proj_out', f'{ours}/proj_out')


def diffusers_unet_table(m, tree) -> list[Entry]:
    """diffusers UNet2DModel keys (DDPM-style blocks, no class embedding) for our UNet; with
    model.context_dim, UNet2DConditionModel's (CrossAttn*Block2D: Transformer2DModel attentions)."""
    if m.get('context_dim'):
        attention = lambda src, ours: diffusers_spatial_transformer(
            src, ours, m['transformer_depth'], m['use_linear_projection'])
    else:
        attention = _diffusers_attention
    entries = (linear('time_embedding.linear_1', 'temb/dense0')
               + linear('time_embedding.linear_2', 'temb/dense1') + conv('conv_in', 'conv_in'))
    levels = _levels(m)
    last = len(levels) - 1
    for level, attn in levels:
        for i in range(m['num_res_blocks']):
            entries += _diffusers_resnet(f'down_blocks.{level}.resnets.{i}',
                                         f'down_{level}_block_{i}', tree)
            if attn:
                entries += attention(f'down_blocks.{level}.attentions.{i}',
                                     f'down_{level}_attn_{i}')
        if level != last:
            entries += conv(f'down_blocks.{level}.downsamplers.0.conv',
                            f'down_{level}_downsample/conv')
    entries += _diffusers_resnet('mid_block.resnets.0', 'mid_block_1', tree)
    entries += attention('mid_block.attentions.0', 'mid_attn')
    entries += _diffusers_resnet('mid_block.resnets.1', 'mid_block_2', tree)
    for j, (level, attn) in enumerate(reversed(levels)):
        for i in range(m['num_res_blocks'] + 1):
            entries += _diffusers_resnet(f'up_blocks.{j}.resnets.{i}', f'up_{level}_block_{i}',
                                         tree)
            if attn:
                entries += attention(f'up_blocks.{j}.attentions.{i}', f'up_{level}_attn_{i}')
        if level:
            entries += conv(f'up_blocks.{j}.upsamplers.0.conv', f'up_{level}_upsample/conv')
    return entries + group_norm('conv_norm_out', 'norm_out') + conv('conv_out', 'conv_out')


# -- facebookresearch/DiT -------------------------------------------------------------------------

def dit_table(m, tree) -> list[Entry]:
    """facebookresearch/DiT's DiT state dict keys for our DiT (models/dit.py) of model config m.

    The released state dict also holds `pos_embed` [1, T, D], a frozen parameter: it is not
    ours to store (our table is a constant), so it is checked, not mapped (dit_constants).
    The label table keeps its num_classes + 1 rows: DiT trains its null row (class dropout 0.1).
    """
    entries = conv('x_embedder.proj', 'x_embedder')
    entries += linear('t_embedder.mlp.0', 't_embedder_mlp_0')
    entries += linear('t_embedder.mlp.2', 't_embedder_mlp_2')
    if _has(tree, 'y_embedder'):
        entries.append(Entry(('y_embedder.embedding_table.weight',), ('y_embedder', 'embedding'),
                             COPY))
    for i in range(m['depth']):
        for src, ours in (('attn.qkv', 'attn_qkv'), ('attn.proj', 'attn_proj'),
                          ('mlp.fc1', 'mlp_fc1'), ('mlp.fc2', 'mlp_fc2'),
                          ('adaLN_modulation.1', 'adaLN_modulation')):
            entries += linear(f'blocks.{i}.{src}', f'blocks_{i}/{ours}')
    return (entries + linear('final_layer.linear', 'final_layer_linear')
            + linear('final_layer.adaLN_modulation.1', 'final_layer_adaLN_modulation'))


def dit_constants(m) -> dict[str, np.ndarray]:
    """Source keys that hold no parameter of ours but must equal our constant (DiT's pos_embed)."""
    from diffusion_jax.models import dit  # pylint: disable=import-outside-toplevel
    grid = m['image_size'] // m['patch_size']
    return {'pos_embed': dit.sincos_pos_embed_2d(m['hidden_size'], grid, grid)[None]}


# -- diffusers AutoencoderKL (the Stable Diffusion VAE) -------------------------------------------

def _diffusers_vae_resnet(src: str, ours: str, tree) -> list[Entry]:
    entries = (group_norm(f'{src}.norm1', f'{ours}/norm1') + conv(f'{src}.conv1', f'{ours}/conv1')
               + group_norm(f'{src}.norm2', f'{ours}/norm2') + conv(f'{src}.conv2', f'{ours}/conv2'))
    if _has(tree, f'{ours}/skip'):
        entries += conv(f'{src}.conv_shortcut', f'{ours}/skip', CONV1X1)
    return entries


def _diffusers_vae_mid(src: str, ours: str, tree) -> list[Entry]:
    return (_diffusers_vae_resnet(f'{src}.mid_block.resnets.0', f'{ours}/mid_block_1', tree)
            + _diffusers_attention(f'{src}.mid_block.attentions.0', f'{ours}/mid_attn')
            + _diffusers_vae_resnet(f'{src}.mid_block.resnets.1', f'{ours}/mid_block_2', tree))


def diffusers_vae_table(m, tree) -> list[Entry]:
    """diffusers AutoencoderKL keys for our AutoencoderKL (models/autoencoder.py)."""
    levels = len(m['block_out_channels'])
    entries = conv('encoder.conv_in', 'encoder/conv_in')
    for level in range(levels):
        for i in range(m['layers_per_block']):
            entries += _diffusers_vae_resnet(f'encoder.down_blocks.{level}.resnets.{i}',
                                             f'encoder/down_{level}_block_{i}', tree)
        if level != levels - 1:
            entries += conv(f'encoder.down_blocks.{level}.downsamplers.0.conv',
                            f'encoder/down_{level}_downsample/conv')
    entries += _diffusers_vae_mid('encoder', 'encoder', tree)
    entries += group_norm('encoder.conv_norm_out', 'encoder/norm_out')
    entries += conv('encoder.conv_out', 'encoder/conv_out')
    entries += conv('quant_conv', 'quant_conv', CONV1X1)
    entries += conv('post_quant_conv', 'post_quant_conv', CONV1X1)
    entries += conv('decoder.conv_in', 'decoder/conv_in')
    entries += _diffusers_vae_mid('decoder', 'decoder', tree)
    for j in range(levels):
        for i in range(m['layers_per_block'] + 1):
            entries += _diffusers_vae_resnet(f'decoder.up_blocks.{j}.resnets.{i}',
                                             f'decoder/up_{j}_block_{i}', tree)
        if j != levels - 1:
            entries += conv(f'decoder.up_blocks.{j}.upsamplers.0.conv',
                            f'decoder/up_{j}_upsample/conv')
    return (entries + group_norm('decoder.conv_norm_out', 'decoder/norm_out')
            + conv('decoder.conv_out', 'decoder/conv_out'))
