"""The CLIP text encoder against transformers' CLIPTextModel with random weights (tiny config),
the converter's refusals, the published parameter counts, and CLIP tokenisation from a local
vocabulary."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import text_encoder as te

import torch  # noqa: E402  (the test extra installs it)
import transformers  # noqa: E402  (the test extra installs it)

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16)
RTOL = 1e-4


def reference(eos_token_id, hidden_act='quick_gelu', seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, eos_token_id=eos_token_id,
                                         bos_token_id=97, pad_token_id=1)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # layer norms start at 1/0: randomise them so the test sees them
        for name, p in model.named_parameters():
            if 'layer_norm' in name:
                p.add_(0.1 * torch.randn_like(p))
    return config, model


def ids_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, size=(3, 12)).astype(np.int64)
    ids[:, 0] = 97
    # EOS at different places, padding (pad id 1) after it; row 2 has EOS = the largest id 98
    # twice, so the first occurrence and argmax (the first maximum) agree on it.
    ids[0, 5], ids[0, 6:] = 98, 1
    ids[1, 11] = 98
    ids[2, 3], ids[2, 4:8], ids[2, 8] = 98, 1, 98
    mask = (np.arange(12)[None] <= np.array([5, 11, 8])[:, None]).astype(np.int64)
    return ids, mask


def rel_err(ours, theirs):
    theirs = np.asarray(theirs)
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def run_both(eos_token_id, hidden_act='quick_gelu', with_mask=False):
    config, ref = reference(eos_token_id, hidden_act)
    module = te.from_transformers_config(config)
    # The file layout (text_model.* keys, as saved checkpoints hold them) for one case.
    state = ref.state_dict()
    if eos_token_id == 2:
        state = {f'text_model.{k}': v for k, v in state.items()}
    params = te.convert_transformers_state_dict(state, module)
    ids, mask = ids_batch()
    mask_t = torch.tensor(mask) if with_mask else None
    with torch.no_grad():
        out_t = ref(torch.tensor(ids), attention_mask=mask_t, output_hidden_states=True)
    out = module.apply({'params': params}, jnp.asarray(ids, jnp.int32),
                       jnp.asarray(mask) if with_mask else None)
    return out, out_t


@pytest.mark.parametrize('eos_token_id,hidden_act,with_mask', [
    (98, 'quick_gelu', False), (2, 'quick_gelu', True), (98, 'gelu', True)])
def test_equals_transformers(eos_token_id, hidden_act, with_mask):
    out, out_t = run_both(eos_token_id, hidden_act, with_mask)
    ids, mask = ids_batch()
    err = rel_err(out['last_hidden_state'], out_t.last_hidden_state)
    assert err <= RTOL, err
    if with_mask:  # padded query rows attend only to kept keys; compare the kept positions
        keep = mask.astype(bool)
        assert rel_err(np.asarray(out['last_hidden_state'])[keep],
                       out_t.last_hidden_state.numpy()[keep]) <= RTOL
    assert rel_err(out['pooler_output'], out_t.pooler_output) <= RTOL
    assert len(out['hidden_states']) == len(out_t.hidden_states) == TINY['num_hidden_layers'] + 1
    for ours, theirs in zip(out['hidden_states'], out_t.hidden_states):
        assert rel_err(ours, theirs) <= RTOL


def test_pooling_picks_transformers_eos_rule():
    ids = jnp.asarray([[5, 98, 1, 98], [5, 6, 98, 120]])
    # New configs: the first EOS; legacy eos_token_id=2: the largest id.
    np.testing.assert_array_equal(te.eos_positions(ids, 98), [1, 2])
    np.testing.assert_array_equal(te.eos_positions(ids, 2), [1, 3])


def test_mask_changes_output_and_padding_does_not_leak():
    config, ref = reference(98)
    module = te.from_transformers_config(config)
    params = {'params': te.convert_transformers_state_dict(ref.state_dict(), module)}
    ids, mask = ids_batch()
    a = module.apply(params, jnp.asarray(ids), jnp.asarray(mask))['last_hidden_state']
    other = ids.copy()
    other[0, 6:] = 50  # different tokens behind row 0's mask
    b = module.apply(params, jnp.asarray(other), jnp.asarray(mask))['last_hidden_state']
    np.testing.assert_allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[0, 7:] - b[0, 7:]))) > 1e-3


def test_converter_refuses_bad_state_dict():
    config, ref = reference(98)
    module = te.from_transformers_config(config)
    state = dict(ref.state_dict())
    state.pop('final_layer_norm.bias')
    state['extra.weight'] = torch.zeros(3)
    state['encoder.layers.0.mlp.fc1.weight'] = torch.zeros(5, 32)
    with pytest.raises(ValueError) as err:
        te.convert_transformers_state_dict(state, module)
    msg = str(err.value)
    assert 'missing key final_layer_norm.bias' in msg
    assert 'unexpected key extra.weight' in msg
    assert 'shape mismatch encoder.layers.0.mlp.fc1.weight: (5, 32)' in msg


# CLIP ViT-L/14's text tower (SD 1.x) and OpenCLIP ViT-H/14's in transformers format (SD 2.x:
# 23 of OpenCLIP's 24 layers, GELU), as issue 21 states their parameter counts.
FULL = {'clip_vit_l14_text': (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12), 123_060_480),
        'openclip_h14_text': (dict(hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=23, num_attention_heads=16,
                                   hidden_act='gelu'), 340_387_840)}


@pytest.mark.parametrize('name', sorted(FULL))
def test_full_config_parameter_counts_and_keys(name):
    fields, count = FULL[name]
    config = transformers.CLIPTextConfig(**fields)
    with torch.device('meta'):
        ref = transformers.CLIPTextModel(config)
    assert sum(p.numel() for p in ref.parameters()) == count
    module = te.from_transformers_config(config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    assert models.count_params(shapes) == count
    table = te.transformers_table(module)
    assert set(table) == set(ref.state_dict()) - {'embeddings.position_ids'}


def write_tiny_vocab(folder):
    # Byte-level BPE over the characters of 'a cat sat'; '</w>' ends a word.
    tokens = ['a', 'c', 's', 't', 'a</w>', 't</w>', 'ca', 'sa', 'cat</w>', 'sat</w>',
              '<|startoftext|>', '<|endoftext|>']
    (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / 'merges.txt').write_text('#version: 0.2\nc a\ns a\nca t</w>\nsa t</w>\n')
    return {t: i for i, t in enumerate(tokens)}


def test_tokenize_pads_and_truncates_like_the_pipelines(tmp_path):
    vocab = write_tiny_vocab(tmp_path)
    tok = te.load_clip_tokenizer(tmp_path)
    bos, eos = vocab['<|startoftext|>'], vocab['<|endoftext|>']
    ids = te.tokenize(tok, ['a cat sat', 'cat'], max_length=7)
    expected = [[bos, vocab['a</w>'], vocab['cat</w>'], vocab['sat</w>'], eos, eos, eos],
                [bos, vocab['cat</w>'], eos, eos, eos, eos, eos]]
    np.testing.assert_array_equal(ids, expected)
    short = te.tokenize(tok, 'a cat sat cat', max_length=4)
    np.testing.assert_array_equal(short, [[bos, vocab['a</w>'], vocab['cat</w>'], eos]])


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(ValueError, match='lacks vocab.json and merges.txt'):
        te.load_clip_tokenizer(tmp_path)


def test_saved_folder_and_prompts_equal_the_reference_pipeline(tmp_path):
    """A saved CLIPTextModel folder loads through convert.load_text_encoder, and
    prompt_condition equals tokenizer -> CLIPTextModel(ids).last_hidden_state (the SD pipelines'
    prompt encoding, no padding mask)."""
    from diffusion_jax import convert
    vocab = write_tiny_vocab(tmp_path)
    config = transformers.CLIPTextConfig(**{**TINY, 'vocab_size': len(vocab)},
                                         eos_token_id=vocab['<|endoftext|>'],
                                         bos_token_id=vocab['<|startoftext|>'],
                                         pad_token_id=vocab['<|endoftext|>'])
    torch.manual_seed(3)
    ref = transformers.CLIPTextModel(config).eval()
    ref.save_pretrained(tmp_path / 'text_encoder')
    module, params = convert.load_text_encoder(tmp_path / 'text_encoder')
    assert module.num_layers == TINY['num_hidden_layers'] and module.max_length == 16
    tok = te.load_clip_tokenizer(tmp_path)
    prompts = ['a cat sat', '']
    cond = te.prompt_condition(module, params, tok, prompts)
    ids = tok(prompts, padding='max_length', truncation=True, max_length=16,
              return_tensors='pt').input_ids
    with torch.no_grad():
        want = ref(ids).last_hidden_state.numpy()
    assert cond['context'].shape == (2, 16, TINY['hidden_size'])
    assert rel_err(cond['context'], want) <= RTOL
    with pytest.raises(ValueError, match='not a transformers CLIPTextModel folder'):
        convert.load_text_encoder(tmp_path)
