"""Text-to-image on CPU: digit pairs captioned "three and seven", with a small text encoder
trained jointly with the UNet (issue 21's offline prompt-following benchmark).

    python -m diffusion_jax.main --config=configs/digit_pairs_text.py --workdir=runs/digit_pairs_text
    python -m diffusion_jax.main --workdir=runs/digit_pairs_text --mode=sample \
        --config.sampling.prompt="three and seven" --config.sampling.guidance_scale=1
    python experiments/digit_pairs.py --workdir=runs/digit_pairs_text   # prompt accuracy

Data (data.dataset='digit_pairs', input_pipeline): two of scikit-learn's 8x8 digits side by side,
8x16, captioned "<left> and <right>"; 80 of the 100 ordered pairs train, 20 are held out, so a
held-out prompt is followed only by composing words seen in other pairs. The tokenizer is
word-level, built from the training captions and stored in the run (workdir/tokenizer.json).

Model: configs/digits.py's UNet (8x16 here) with cross-attention (a spatial transformer) at the
4x8 level and the middle, reading the states of a 2-layer, 64-wide bidirectional text
transformer (model.text_encoder='small'), both trained together. Captions are dropped to the
empty prompt 10% of the time (training.caption_dropout, Rombach et al. 2022 / Ho & Salimans
2021's p_uncond = 0.1), for classifier-free guidance. Diffusion and optimisation: digits'.
Not from a paper: configs/digits.py's budget (1,500 steps of 64) on twice its pixels; 1.1M
parameters. Measured only on the shared 2-core CPU under a load of ~30: 0.15 steps/s, so the
benchmark run in experiments/README.md was stopped at step 500.
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
from configs import digits

OPTIONS = ('runlocal',)


def text_section(vocab_size: int = 32, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, max_length: int = 8) -> ml_collections.ConfigDict:
    """model.text: the jointly trained encoder's fields (models.text_encoder)."""
    t = ml_collections.ConfigDict()
    t.vocab_size = vocab_size  # >= the 11 caption words + 4 special tokens
    t.hidden_size = hidden_size  # = model.context_dim (derived)
    t.intermediate_size = 4 * hidden_size  # the transformer's usual 4x MLP
    t.num_layers = num_layers
    t.num_heads = num_heads
    t.max_length = max_length  # [BOS] left and right [EOS] = 5 tokens, padded to 8
    return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = configs.parse_arg(arg, OPTIONS, 'digit_pairs_text')
    config = digits.get_config('runlocal' if 'runlocal' in options else None)
    config.name = 'digit_pairs_text'

    d = config.data
    d.dataset = 'digit_pairs'  # embedded: two sklearn digits side by side, captioned
    d.image_size = 8  # height
    d.image_width = 16  # two 8x8 digits side by side (model.image_width derived)
    d.num_classes = 100  # pair ids 10·left + right (the model reads captions, not labels)
    d.num_train_examples = 20_000  # pairs of training pairs x train digits (fixed by split_seed)
    d.num_test_examples = 2_000  # held-out pairs x test digits

    m = config.model
    m.text_encoder = 'small'  # models.text_encoder.SmallTextEncoder, trained with the UNet
    m.text = text_section()
    m.context_dim = m.text.hidden_size  # the cross-attention reads the encoder's states
    m.image_width = d.image_width  # the UNet's W (H = image_size)
    m.transformer_depth = 1  # one transformer block per attention site (4x8 and the middle)
    m.num_heads = 4  # 4 heads of 16 channels at the 64-channel level

    config.training.caption_dropout = 0.1  # p_uncond (Ho & Salimans 2021; LDM's 10%)
    # --mode=sample's default prompt (the training grids cycle through the training captions)
    config.sampling.prompt = 'three and seven'
    config.eval.nll = False  # --mode=eval of text runs is not wired; experiments/digit_pairs.py
    return config
