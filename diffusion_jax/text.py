"""Text conditioning of a run: its word-level tokenizer (stored in the run), the captions of
its data as token ids, and the prompts of `--mode=sample` as the condition {'context', 'mask'}.

    tok, new = text.tokenizer_for_training(config, workdir, train_ds.captions)  # built once
    text.save_tokenizer(workdir, tok)                              # workdir/tokenizer.json
    tok = text.load_tokenizer(workdir)                             # what sampling reads
    ids, mask = text.tokenize(tok, ['three and seven', ''], max_length=8)
    table = text.prompt_table(model, variables, tok, prompts, negative_prompt='')

The tokenizer of a jointly trained encoder (model.text_encoder = 'small' | 'clip') is a
`tokenizers` WordLevel model built from the training captions: lower-cased, split on
whitespace and punctuation, one id per word (the model.text.vocab_size - 4 most frequent words;
others are [UNK]), every caption framed as [BOS] words [EOS] and padded with [PAD] to
model.text.max_length (mask 0 on the padding). The special ids are fixed (SPECIAL_TOKENS), so
the empty prompt, classifier-free guidance's ∅, is [BOS] [EOS] [PAD]...; it never needs an
external vocabulary, and a run's samples read the very vocabulary it was trained with.

Part of the run layer: it reads and writes workdir/tokenizer.json.
"""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from diffusion_jax import image_utils

TOKENIZER_FILE = 'tokenizer.json'
PAD, UNK, BOS, EOS = '[PAD]', '[UNK]', '[BOS]', '[EOS]'
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def is_text(config) -> bool:
    """Whether the run conditions on text (a jointly trained model.text_encoder)."""
    return bool(config.get('model', {}).get('text_encoder', ''))


def _tokenizers():
    try:
        import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError('text runs need the tokenizers package: pip install -e ".[text]"'
                          ) from err
    return tokenizers


def build_tokenizer(captions, vocab_size: int, max_length: int):
    """A WordLevel `tokenizers.Tokenizer` trained on captions (see the module docstring)."""
    tokenizers = _tokenizers()
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=import-outside-toplevel
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=int(vocab_size),
                                        special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(list(captions), trainer)
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise AssertionError('the special tokens did not get ids 0..3')  # tokenizers' contract
    tok.post_processor = processors.TemplateProcessing(
        single=f'{BOS} $A {EOS}', special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=int(max_length))
    tok.enable_truncation(int(max_length))
    return tok


def save_tokenizer(workdir: str, tok) -> str:
    """Writes workdir/tokenizer.json (process 0); returns its path."""
    import jax  # pylint: disable=import-outside-toplevel
    path = os.path.join(workdir, TOKENIZER_FILE)
    if jax.process_index() != 0:
        return path
    os.makedirs(workdir, exist_ok=True)
    image_utils.atomic_write(path, tok.to_str().encode())
    return path


def load_tokenizer(workdir: str):
    """The tokenizer stored in the run (workdir/tokenizer.json); one ValueError line if absent."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise ValueError(f'{path} does not exist: a text run (model.text_encoder) keeps its '
                         'tokenizer there from its first training step; train the run first.')
    return _tokenizers().Tokenizer.from_file(path)


def tokenize(tok, prompts, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, L] int32, mask [N, L] int32) of prompts: [BOS] words [EOS] then [PAD]s (mask 0);
    longer prompts are truncated to L (the tokenizer's padding length, or max_length)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encodings = tok.encode_batch(prompts)
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    if max_length is not None and ids.shape[1] != max_length:
        raise ValueError(f'the run\'s tokenizer pads to {ids.shape[1]} tokens, '
                         f'model.text.max_length={max_length}: they must agree.')
    return ids, mask


def empty_prompt(max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [1, L], mask [1, L]) of the empty prompt '' (∅ of caption dropout): [BOS] [EOS]
    then [PAD]s, as `tokenize` gives it for any tokenizer built here."""
    ids = np.full((1, max_length), PAD_ID, np.int32)
    ids[0, :2] = BOS_ID, EOS_ID
    return ids, (ids != PAD_ID).astype(np.int32)


def tokenizer_for_training(config, workdir: str, captions):
    """(the run's tokenizer, whether it is new): workdir/tokenizer.json when the run has one (a
    resumed run keeps its vocabulary), else one built from the training captions, which the
    train loop writes there (`save_tokenizer`) with config.json. Writes nothing itself."""
    text = config.model.text
    if os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
        return load_tokenizer(workdir), False
    if captions is None:
        raise ValueError(f'data.dataset={config.data.dataset!r} has no captions: a text run '
                         "(model.text_encoder) needs a captioned dataset, e.g. 'digit_pairs'.")
    return build_tokenizer(captions, text.vocab_size, text.max_length), True


def with_tokens(ds, tok, max_length: int):
    """The dataset with 'input_ids' and 'attention_mask' [n, L] int32 of each example's caption
    (ds.captions: one string per example), tokenised once here."""
    from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
    if ds.captions is None:
        raise ValueError(f'data.dataset={ds.name!r} has no captions: a text run '
                         "(model.text_encoder) needs a captioned dataset, e.g. 'digit_pairs'.")
    ids, mask = tokenize(tok, ds.captions, max_length)
    get = ds.get

    def get_with_tokens(indices):
        return dict(get(indices), input_ids=ids[indices], attention_mask=mask[indices])

    return input_pipeline.Dataset(ds.name, ds.split, ds.num_examples, ds.example_shape,
                                  ds.num_classes, get_with_tokens, ds.captions)


def sampling_prompts(config, default=()) -> list[str]:
    """The prompts of config.sampling: [sampling.prompt], the lines of sampling.prompts_file
    (cycled over the samples by the caller), or `default` when neither is set."""
    s = config.sampling
    if s.get('prompts_file', ''):
        return read_prompts_file(s.prompts_file)
    if s.get('prompt', ''):
        return [s.prompt]
    return list(default)


def read_prompts_file(path: str) -> list[str]:
    """The non-empty lines of sampling.prompts_file, stripped; one ValueError line otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f'sampling.prompts_file={path!r} does not exist: give a text file with '
                         'one prompt per line.')
    with open(path, encoding='utf-8') as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f'sampling.prompts_file={path!r} holds no prompt: write one per line.')
    return prompts


@dataclasses.dataclass
class PromptTable:
    """Encoded prompts: cond {'context': [P, L, D], ('mask': [P, L])} and uncond (the negative
    prompt's, '' by default, batch 1): what the sampler gathers per sample (prompt indices)."""
    prompts: list
    cond: dict
    uncond: dict

    def condition(self, indices):
        """The condition of prompt indices [B]: each entry of cond gathered by row."""
        indices = jnp.asarray(indices, jnp.int32)
        return {k: v[indices] for k, v in self.cond.items()}


def encode_prompts(model, variables, tok, prompts) -> dict:
    """model.encode of the tokenised prompts: {'context': [P, L, D](, 'mask')}."""
    ids, mask = tokenize(tok, prompts, model.max_length)
    return model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method='encode')


def prompt_table(model, variables, tok, prompts, negative_prompt: str = '') -> PromptTable:
    """The PromptTable of prompts for the run's TextConditioned model and its variables."""
    if not prompts:
        raise ValueError('a text run samples from prompts: set sampling.prompt="..." or '
                         'sampling.prompts_file=FILE (one prompt per line).')
    cond = encode_prompts(model, variables, tok, list(prompts))
    uncond = encode_prompts(model, variables, tok, [negative_prompt or ''])
    return PromptTable(list(prompts), cond, uncond)
