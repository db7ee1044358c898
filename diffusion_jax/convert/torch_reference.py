"""PyTorch reference networks in OpenAI's layout (improved-/guided-diffusion), written here from
the papers (Nichol & Dhariwal 2021 Sec. 3 and App. A; Dhariwal & Nichol 2021 Sec. 3) and the
released module structure, so that their state dicts carry the published checkpoints' key names.

They exist to test the converter independently of our Flax code (random weights through both
networks must agree) and to make random-weight checkpoints of small preset variants. NCHW.

    net = OpenAIUNet(**openai_kwargs(config.model)); net(x_nchw, t_model, y)
where t_model is what the reference diffusion feeds the network (t·1000/T with
rescale_timesteps). Requires torch (`pip install -e ".[torch]"`).
"""
from __future__ import annotations

import math

try:
    import torch
    from torch import nn
    import torch.nn.functional as F
except ImportError as err:  # pragma: no cover - torch is an optional extra
    raise ImportError('diffusion_jax.convert.torch_reference needs PyTorch: '
                      'pip install -e ".[torch]"') from err

# torch.nn.GroupNorm's default ε (OpenAI's GroupNorm32) and their 32 groups.
GROUPS = 32


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


def sinusoid(t, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)], f_i = P^(-i/half): improved-diffusion's timestep_embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def qkv_attention(qkv, heads: int, new_order: bool):
    """[B, 3·H·c, T] -> [B, H·c, T]; 'new': (3, heads, c) channels, legacy: (heads, 3, c)."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (a.reshape(batch * heads, ch, length) for a in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(batch * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1.0 / math.sqrt(math.sqrt(ch))  # on q and k: 1/√c on the logits, stable in fp16
    weight = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum('bts,bcs->bct', weight, v).reshape(batch, -1, length)


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch, dropout, out_ch, scale_shift, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)
        self.scale_shift, self.up, self.down = scale_shift, up, down

    def forward(self, x, emb):
        if self.up or self.down:
            h = self.in_layers[:-1](x)
            resample = (lambda a: F.interpolate(a, scale_factor=2, mode='nearest')) if self.up \
                else (lambda a: F.avg_pool2d(a, 2))
            h, x = resample(h), resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch, num_heads, num_head_channels, new_order):
        super().__init__()
        self.heads = num_heads if num_head_channels == -1 else ch // num_head_channels
        self.new_order = new_order
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, height, width = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.heads, self.new_order)
        return (x + self.proj_out(h)).reshape(b, c, height, width)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class Seq(nn.Sequential):
    def forward(self, x, emb):  # pylint: disable=arguments-differ
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class _Encoder(nn.Module):
    """time_embed, input_blocks and middle_block, shared by the UNet and the classifier."""

    def __init__(self, image_size, in_channels, model_channels, num_res_blocks,
                 attention_resolutions, dropout=0.0, channel_mult=(1, 2, 4, 8), num_heads=1,
                 num_head_channels=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        emb = 4 * model_channels
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))
        attn = lambda c, heads: AttentionBlock(c, heads, num_head_channels,
                                               use_new_attention_order)
        res = lambda c, out, **kw: ResBlock(c, emb, dropout, out, use_scale_shift_norm, **kw)
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(Seq(*layers))
                self.chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Seq(res(ch, ch, down=True) if resblock_updown
                                             else Downsample(ch)))
                self.chans.append(ch)
                ds *= 2
        self.middle_block = Seq(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.ch, self.ds, self.attn, self.res = ch, ds, attn, res

    def encode(self, x, timesteps):
        emb = self.time_embed(sinusoid(timesteps, self.model_channels))
        return emb


class OpenAIUNet(_Encoder):
    """improved-/guided-diffusion's UNetModel."""

    def __init__(self, out_channels, num_classes=None, num_heads_upsample=-1, **kw):
        super().__init__(**kw)
        mc, mult_list = kw['model_channels'], kw.get('channel_mult', (1, 2, 4, 8))
        nrb, attn_res = kw['num_res_blocks'], kw['attention_resolutions']
        heads_up = kw.get('num_heads', 1) if num_heads_upsample == -1 else num_heads_upsample
        self.num_classes = num_classes
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, 4 * mc)
        ch, ds, chans = self.ch, self.ds, list(self.chans)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mult_list))[::-1]:
            for i in range(nrb + 1):
                layers = [self.res(ch + chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attn_res:
                    layers.append(self.attn(ch, heads_up))
                if level and i == nrb:
                    layers.append(self.res(ch, ch, up=True) if kw.get('resblock_updown')
                                  else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.encode(x, timesteps)
        if self.num_classes:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling as ADM uses it: the mean token attends over all positions."""

    def __init__(self, spatial, ch, head_channels, out_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(ch, spatial ** 2 + 1) / ch ** 0.5)
        self.qkv_proj = nn.Conv1d(ch, 3 * ch, 1)
        self.c_proj = nn.Conv1d(ch, out_dim, 1)
        self.heads = ch // head_channels

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None]
        x = self.c_proj(qkv_attention(self.qkv_proj(x), self.heads, new_order=True))
        return x[:, :, 0]


class OpenAIClassifier(_Encoder):
    """guided-diffusion's EncoderUNetModel with the 'attention', 'adaptive' or 'spatial' head."""

    def __init__(self, out_channels, pool='attention', **kw):
        super().__init__(**kw)
        ch, self.pool = self.ch, pool
        if pool == 'attention':
            self.out = nn.Sequential(norm(ch), nn.SiLU(), AttentionPool2d(
                kw['image_size'] // self.ds, ch, kw['num_head_channels'], out_channels))
        elif pool == 'adaptive':
            self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     nn.Conv2d(ch, out_channels, 1), nn.Flatten())
        else:  # 'spatial': means of every input block and the middle block
            self.out = nn.Sequential(nn.Linear(sum(self.chans) + ch, 2048), nn.ReLU(),
                                     nn.Linear(2048, out_channels))

    def forward(self, x, timesteps):
        emb = self.encode(x, timesteps)
        means, h = [], x
        for module in self.input_blocks:
            h = module(h, emb)
            means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool == 'spatial':
            return self.out(torch.cat(means + [h.mean(dim=(2, 3))], dim=-1))
        return self.out(h)


def openai_kwargs(model_config) -> dict:
    """Constructor arguments of OpenAIUNet / OpenAIClassifier for one of our model configs."""
    m = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    sizes = [m['image_size'] // 2 ** level for level in range(len(m['ch_mult']))]
    kw = dict(
        image_size=m['image_size'], in_channels=m['in_channels'], model_channels=m['ch'],
        num_res_blocks=m['num_res_blocks'],
        attention_resolutions={m['image_size'] // r for r in m['attn_resolutions'] if r in sizes},
        dropout=m['dropout'], channel_mult=tuple(m['ch_mult']),
        num_heads=m['num_heads'] or 1, num_head_channels=m['num_head_channels'] or -1,
        use_scale_shift_norm=m['use_scale_shift_norm'], resblock_updown=m['resblock_updown'],
        use_new_attention_order=m['qkv_order'] == 'new')
    if m['name'] == 'classifier':
        return dict(kw, out_channels=m['num_classes'], pool=m['pool'])
    return dict(kw, out_channels=m['out_channels'], num_classes=m['num_classes'] or None,
                num_heads_upsample=m.get('num_heads_upsample', 0) or -1)


def build(model_config):
    """The reference network of a UNet or classifier model config, in eval mode."""
    kw = openai_kwargs(model_config)
    name = model_config['name']
    net = OpenAIClassifier(**kw) if name == 'classifier' else OpenAIUNet(**kw)
    return net.eval()


def randomize_(net, seed: int = 0):
    """Sets every parameter to random values of a sensible size, so that zero-initialised layers
    and identity GroupNorms carry signal too: weights N(0, 1/fan_in), GroupNorm scales
    1 + N(0, 0.1²), biases N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith('weight'):  # GroupNorm scale
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return net
