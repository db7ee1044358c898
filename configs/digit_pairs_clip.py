"""Digit pairs with CLIP's text-transformer architecture trained from scratch on the captions
(model.text_encoder='clip'): causal self-attention, quick-GELU, EOS pooling available, and, as
the Stable Diffusion pipelines call a pretrained CLIP, no padding mask in the encoder or the
cross-attention (the padding states are part of the context). The path a pretrained encoder
takes, at the size of configs/digit_pairs_text.py's small encoder; the rest is that config's.

    python -m diffusion_jax.main --config=configs/digit_pairs_clip.py --workdir=runs/digit_pairs_clip
"""
from __future__ import annotations

import pathlib
import sys

import ml_collections

try:
    import configs
except ImportError:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import configs
from configs import digit_pairs_text
from diffusion_jax import text

OPTIONS = ('runlocal',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digit_pairs_clip')
    config = digit_pairs_text.get_config('runlocal' if 'runlocal' in options else None)
    config.name = 'digit_pairs_clip'
    m = config.model
    m.text_encoder = 'clip'  # models.text_encoder.CLIPTextEncoder, trained from scratch
    m.text.hidden_act = 'quick_gelu'  # OpenAI CLIP's activation (Radford et al. 2021)
    m.text.eos_token_id = text.EOS_ID  # the run's tokenizer's [EOS] (pooling; not the context)
    return config
