"""Text runs end to end (issue 21): the digit-pairs data, the word-level tokenizer stored in the
run, the jointly trained small text encoder (against torch's TransformerEncoder), caption
dropout in the train step, and `--mode=sample` with sampling.prompt / prompts_file /
negative_prompt equal to sampling at the explicitly encoded contexts."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from diffusion_jax import config_validation, guidance, input_pipeline, models, run, samplers
from diffusion_jax import text
from diffusion_jax import diffusion as dl
from diffusion_jax.models import text_encoder as te

pytestmark = pytest.mark.usefixtures('fast_compiles')


def tiny_config(kind='small', caption_dropout=0.1):
    from configs import digit_pairs_text
    config = digit_pairs_text.get_config()
    config.model.update(ch=8, num_groups=4, num_heads=2, context_dim=16)
    config.model.text = digit_pairs_text.text_section(hidden_size=16, num_layers=1,
                                                      num_heads=2)
    if kind == 'clip':
        config.model.text_encoder = 'clip'
        config.model.text.hidden_act = 'quick_gelu'
        config.model.text.eos_token_id = text.EOS_ID
    config.diffusion.update(num_timesteps=10, beta_start=0.01, beta_end=0.5)
    config.data.num_train_examples, config.data.num_test_examples = 64, 32
    t = config.training
    t.update(batch_size=16, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2,
             sample_every_steps=0, caption_dropout=caption_dropout)
    config.sampling.update(method='ddim', num_steps='ddim5', batch_size=8, num_samples=8)
    return config


def perturbed(params, seed=5, scale=0.3):
    """Random weights everywhere (zero-initialised output layers would hide the condition)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def rel_err(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


# -- the data -------------------------------------------------------------------------------------


def test_digit_pairs_are_deterministic_and_held_out_pairs_never_train():
    config = tiny_config()
    config.data.num_train_examples = 4000
    train_pairs, held_out = input_pipeline.pair_split(config.data.split_seed)
    assert len(train_pairs) == 80 and len(held_out) == 20
    assert sorted(np.concatenate([train_pairs, held_out])) == list(range(100))
    ds = input_pipeline.get_dataset(config.data, 'train')
    again = input_pipeline.get_dataset(config.data, 'train')
    everything = np.arange(len(ds))
    a, b = ds.get(everything), again.get(everything)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert ds.captions == again.captions
    assert a['image'].shape == (4000, 8, 16, 1)
    # Every training pair and no held-out pair is used; captions name (left, right).
    assert set(a['label']) == set(train_pairs)
    assert ds.captions[0] == (f'{input_pipeline.DIGIT_WORDS[a["label"][0] // 10]} and '
                              f'{input_pipeline.DIGIT_WORDS[a["label"][0] % 10]}')
    assert all(c == input_pipeline.pair_caption(int(p)) for c, p in zip(ds.captions, a['label']))
    # Each half is a digits scan of the named class, from the digits' own train split.
    digits_cfg = ml_collections.ConfigDict(dict(config.data.to_dict(), dataset='digits'))
    scans = input_pipeline.get_dataset(digits_cfg, 'train').get(np.arange(1438))
    for i in range(0, 4000, 97):
        for half, cls in ((a['image'][i, :, :8], a['label'][i] // 10),
                          (a['image'][i, :, 8:], a['label'][i] % 10)):
            match = np.flatnonzero(np.all(scans['image'] == half, axis=(1, 2, 3)))
            assert len(match) and set(scans['label'][match]) == {cls}
    # The training batches of many epochs never hold a held-out pair.
    seen = set()
    for step, batch in zip(range(600), input_pipeline.train_iterator(ds, 16, seed=3)):
        seen |= set(batch['label'].tolist())
    assert seen == set(train_pairs) and not seen & set(held_out)
    test = input_pipeline.get_dataset(config.data, 'test').get(np.arange(32))
    assert set(test['label']) <= set(held_out)
    other = input_pipeline.get_dataset(ml_collections.ConfigDict(
        dict(config.data.to_dict(), split_seed=1)), 'train')
    assert set(other.get(everything)['label']) != set(train_pairs)


# -- the tokenizer and the small encoder ----------------------------------------------------------


def test_word_tokenizer_built_from_captions(tmp_path):
    captions = ['three and seven', 'one and two', 'three and one']
    tok = text.build_tokenizer(captions, 32, 8)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in text.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert set(vocab) == set(text.SPECIAL_TOKENS) | {'three', 'and', 'seven', 'one', 'two'}
    ids, mask = text.tokenize(tok, ['three and seven', 'Seven AND nine', ''])
    want = [[2, vocab['three'], vocab['and'], vocab['seven'], 3, 0, 0, 0],
            [2, vocab['seven'], vocab['and'], text.UNK_ID, 3, 0, 0, 0],
            [2, 3, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(mask, (np.asarray(want) != 0).astype(np.int32))
    empty_ids, empty_mask = text.empty_prompt(8)
    np.testing.assert_array_equal(empty_ids, ids[2:])
    np.testing.assert_array_equal(empty_mask, mask[2:])
    text.save_tokenizer(str(tmp_path), tok)
    again = text.load_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(text.tokenize(again, ['one and two'])[0],
                                  text.tokenize(tok, ['one and two'])[0])
    with pytest.raises(ValueError, match='tokenizer.json does not exist'):
        text.load_tokenizer(str(tmp_path / 'nothing'))


def test_small_text_encoder_equals_torch_transformer_encoder():
    """SmallTextEncoder = torch.nn.TransformerEncoder(norm_first, GELU) + final LayerNorm with
    src_key_padding_mask, random weights copied over; every position compared."""
    d, heads, ff, layers_, vocab, length = 16, 2, 40, 2, 11, 6
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation='gelu',
                                             batch_first=True, norm_first=True)
    ref = torch.nn.TransformerEncoder(layer, layers_, norm=torch.nn.LayerNorm(d),
                                      enable_nested_tensor=False).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    emb, pos = rng.normal(size=(vocab, d)), rng.normal(size=(length, d))
    ids = np.array([[2, 5, 4, 7, 3, 0], [2, 9, 4, 8, 6, 3]])
    mask = (ids != 0).astype(np.int32)
    x = torch.tensor(emb[ids] + pos[None], dtype=torch.float32)
    with torch.no_grad():
        want = ref(x, src_key_padding_mask=torch.tensor(mask == 0)).numpy()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = {'token_embedding': {'embedding': emb}, 'position_embedding': pos,
              'final_layer_norm': {'scale': sd['norm.weight'], 'bias': sd['norm.bias']}}
    for i in range(layers_):
        p = f'layers.{i}.'
        w, b = np.split(sd[p + 'self_attn.in_proj_weight'], 3), np.split(
            sd[p + 'self_attn.in_proj_bias'], 3)
        dense = lambda wt, bias: {'kernel': wt.T, 'bias': bias}
        params[f'layers_{i}'] = {
            'self_attn': {'q_proj': dense(w[0], b[0]), 'k_proj': dense(w[1], b[1]),
                          'v_proj': dense(w[2], b[2]),
                          'out_proj': dense(sd[p + 'self_attn.out_proj.weight'],
                                            sd[p + 'self_attn.out_proj.bias'])},
            'fc1': dense(sd[p + 'linear1.weight'], sd[p + 'linear1.bias']),
            'fc2': dense(sd[p + 'linear2.weight'], sd[p + 'linear2.bias']),
            'layer_norm1': {'scale': sd[p + 'norm1.weight'], 'bias': sd[p + 'norm1.bias']},
            'layer_norm2': {'scale': sd[p + 'norm2.weight'], 'bias': sd[p + 'norm2.bias']}}
    module = te.SmallTextEncoder(vocab_size=vocab, hidden_size=d, intermediate_size=ff,
                                 num_layers=layers_, num_heads=heads, max_length=length)
    out = module.apply({'params': jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids),
                       jnp.asarray(mask))['last_hidden_state']
    assert rel_err(out, want) <= 1e-5
    # The padding is excluded: changing a padded token changes no other position.
    ids2 = ids.copy()
    ids2[0, 5] = 9
    out2 = module.apply({'params': jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids2),
                        jnp.asarray(mask))['last_hidden_state']
    np.testing.assert_allclose(out2[0, :5], out[0, :5], atol=1e-6)


# -- the train step -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def step_setup():
    from diffusion_jax import train
    config = tiny_config(caption_dropout=1.0 - 1e-7)
    config.optim.warmup_steps = 0  # the first step's learning rate is not 0
    config = config_validation.resolve(config, 'train')
    assert config.model.context_dim == 16 and config.model.image_width == 16  # derived
    model = models.get_model(config.model)
    diffusion = dl.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    state = train.create_train_state(config, model, optimizer, jax.random.key(0))
    state = state.replace(params=perturbed(state.params))
    ds = input_pipeline.get_dataset(config.data, 'train')
    tok = text.build_tokenizer(ds.captions, 32, 8)
    batch = next(input_pipeline.train_iterator(text.with_tokens(ds, tok, 8), 16, seed=0))
    return config, model, diffusion, optimizer, schedule, state, batch


def test_caption_dropout_and_the_joint_encoder_in_the_train_step(step_setup):
    """The step's loss is the ε loss of the UNet at the encoded captions, each replaced by the
    empty prompt's encoding where drop_condition's coin says so: with the rate ~1, the
    hand-written loss at the empty prompt's context, not the captions'; the gradient reaches
    the encoder (its parameters move)."""
    from diffusion_jax import timestep_sampling, train
    config, model, diffusion, optimizer, schedule, state, batch = step_setup
    step = jax.jit(train.make_train_step(config, model, diffusion, optimizer, schedule))
    key = jax.random.key(1)
    new_state, metrics = step(state, batch, key)
    # The hand-written loss: the step's t and ε (its key stream), the UNet at a context.
    t_rng, noise_rng, _, _ = jax.random.split(jax.random.fold_in(key, 0), 4)
    t, _ = timestep_sampling.sample(state.sampler_state, t_rng, 16)
    x0 = jnp.asarray(batch['image'])
    noise = jax.random.normal(noise_rng, x0.shape)
    x_t = diffusion.q_sample(x0, t, noise)
    variables = {'params': state.params}

    def loss_at(ids, mask):
        cond = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method='encode')
        cond = {k: jnp.broadcast_to(v, (16,) + v.shape[1:]) for k, v in cond.items()}
        return float(jnp.mean((model.apply(variables, x_t, t, cond) - noise) ** 2))

    empty = loss_at(*text.empty_prompt(8))
    captioned = loss_at(batch['input_ids'], batch['attention_mask'])
    np.testing.assert_allclose(float(metrics['loss']), empty, rtol=1e-5)
    assert abs(captioned - empty) > 1e-3  # the text matters: the test can tell them apart
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         new_state.params['encoder'], state.params['encoder'])
    assert min(jax.tree.leaves(moved)) > 0  # every encoder parameter got a gradient step


# -- a text run on disk, sampled through the CLI --------------------------------------------------


@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
    """A text run made with run.create (random weights) and its tokenizer, as training leaves
    it: config.json, a checkpoint and tokenizer.json."""
    workdir = str(tmp_path_factory.mktemp('text_run'))
    config = config_validation.resolve(tiny_config(), 'train')
    model = models.get_model(config.model)
    params = perturbed(models.init_params(model, jax.random.key(0))['params'])
    run.create(workdir, config, params)
    ds = input_pipeline.get_dataset(config.data, 'train')
    text.save_tokenizer(workdir, text.build_tokenizer(ds.captions, 32, 8))
    return workdir, model, params


def _cli_sample(workdir, **typed):
    """What `--mode=sample --config.sampling.<k>=<v>` runs (main: resolve_config, then the
    mode's run_resolved), in this process."""
    from diffusion_jax import generate
    typed = {f'sampling.{k}': v for k, v in dict(
        method='ddim', num_steps='ddim5', num_samples=8, batch_size=8, **typed).items()}
    generate.run_resolved(run.resolve_config(workdir, None, typed, mode='sample'), workdir)
    with np.load(os.path.join(workdir, 'samples', '0', 'samples.npz')) as f:
        images, labels = f['images'], f['labels']
    with open(os.path.join(workdir, 'samples', '0', 'sampling_config.json')) as f:
        meta = json.load(f)
    return images, labels, meta


def _explicit(workdir, model, params, prompts, w=0.0, negative=''):
    """The same sampler run by hand: samplers.sample over the respaced chain with the model_fn
    of the explicitly encoded contexts (first batch, the CLI's key)."""
    config = run.Run(workdir).config
    tok = text.load_tokenizer(workdir)
    variables = {'params': params}
    ids, mask = text.tokenize(tok, prompts, 8)
    cond = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method='encode')
    cond = {k: jnp.asarray(np.resize(np.asarray(v), (8,) + v.shape[1:])) for k, v in cond.items()}
    if w:
        ids, mask = text.tokenize(tok, [negative], 8)
        uncond = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method='encode')
        model_fn = guidance.classifier_free_model_fn(model.apply, variables, cond, w,
                                                     uncond=uncond)
    else:
        model_fn = guidance.bind_model(model.apply, variables, cond)
    from diffusion_jax.respace import respaced
    d = respaced(dl.create_diffusion(config.diffusion), 'ddim5')
    key = jax.random.fold_in(jax.random.split(jax.random.key(0), 3)[0], 0)
    out = samplers.sample(d, model_fn, key, (8, 8, 16, 1), method='ddim')['samples']
    return np.clip(np.round((np.asarray(out) + 1) * 127.5), 0, 255).astype(np.uint8)


def test_sample_mode_with_prompt_prompts_file_and_negative_prompt(text_run, tmp_path):
    workdir, model, params = text_run
    one, labels, meta = _cli_sample(workdir, prompt='three and seven')
    assert one.shape == (8, 8, 16, 1) and meta['prompts'] == ['three and seven']
    np.testing.assert_array_equal(labels, np.zeros(8))
    want = _explicit(workdir, model, params, ['three and seven'])
    assert np.max(np.abs(one.astype(int) - want)) <= 1  # float rounding at a level boundary
    # A file of two prompts is cycled: samples 0, 2, ... keep the first prompt's x_T and image.
    path = tmp_path / 'prompts.txt'
    path.write_text('three and seven\n\none and two\n')
    two, labels, meta = _cli_sample(workdir, prompt='', prompts_file=str(path))
    assert meta['prompts'] == ['three and seven', 'one and two']
    np.testing.assert_array_equal(labels, [0, 1] * 4)
    np.testing.assert_array_equal(two[0::2], one[0::2])
    assert np.mean(np.abs(two[1::2].astype(int) - one[1::2])) > 1.0
    want = _explicit(workdir, model, params, ['three and seven', 'one and two'])
    assert np.max(np.abs(two.astype(int) - want)) <= 1
    # Classifier-free guidance away from a negative prompt instead of the empty one.
    neg, _, _ = _cli_sample(workdir, prompt='three and seven', guidance_scale=2.0,
                            negative_prompt='one and one')
    want = _explicit(workdir, model, params, ['three and seven'], 2.0, 'one and one')
    assert np.max(np.abs(neg.astype(int) - want)) <= 1
    plain, _, _ = _cli_sample(workdir, prompt='three and seven', guidance_scale=2.0)
    assert np.mean(np.abs(plain.astype(int) - neg)) > 1.0
    want = _explicit(workdir, model, params, ['three and seven'], 2.0, '')
    assert np.max(np.abs(plain.astype(int) - want)) <= 1


def test_text_config_errors_are_one_line(tmp_path):
    from configs import digits

    def refused(config, mode, match):
        with pytest.raises(ValueError, match=match):
            config_validation.resolve(config, mode)

    plain = digits.get_config()
    plain.sampling.prompt = 'three and seven'
    refused(plain, 'sample', r"sampling.prompt='three and seven' needs a text run")
    plain = digits.get_config()
    plain.training.caption_dropout = 0.1
    refused(plain, 'train', 'training.caption_dropout=0.1 needs a text run')
    c = tiny_config()
    c.sampling.update(prompt='', prompts_file=str(tmp_path / 'missing.txt'))
    refused(c, 'sample', 'sampling.prompts_file=.*does not exist')
    c = tiny_config()
    c.sampling.update(prompt='a', prompts_file=str(tmp_path / 'p.txt'))
    refused(c, 'sample', 'give one of them')
    c = tiny_config()
    c.sampling.prompt = ''
    refused(c, 'sample', "sampling.prompt='' and sampling.prompts_file=''")
    c = tiny_config(caption_dropout=0.0)
    c.sampling.update(prompt='one and two', guidance_scale=1.0)
    refused(c, 'sample', 'training.caption_dropout > 0')
    c = tiny_config()
    c.data.dataset = 'digits'
    refused(c, 'train', "needs captions, but data.dataset='digits'")
    c = tiny_config()
    c.model.text_encoder = 'bert'
    refused(c, 'train', "model.text_encoder='bert' is not a trained text encoder")
    c = tiny_config()
    c.model.context_dim = 12
    refused(c, 'train', 'model.context_dim=12 does not fit model.text.hidden_size=16')
    c = tiny_config(caption_dropout=1.0)
    refused(c, 'train', r'training.caption_dropout=1.0 must lie in \[0, 1\)')
    c = tiny_config()
    refused(c, 'edit', r"model.text_encoder='small': --mode=edit of a text run is not wired")


def test_text_conditioned_model_is_its_unet_and_its_encoder():
    """model.text_encoder='clip' (configs/digit_pairs_clip.py's path): encode is CLIP's
    last_hidden_state without any padding mask (as SD calls it), and the denoiser is the plain
    context UNet on the same parameters; one parameter tree holds both."""
    config = config_validation.resolve(tiny_config('clip'), 'train')
    model = models.get_model(config.model)
    assert isinstance(model.encoder, te.CLIPTextEncoder) and model.encoder.eos_token_id == 3
    params = perturbed(models.init_params(model, jax.random.key(0))['params'])
    assert set(params) == {'denoiser', 'encoder'}
    ids = jnp.asarray([[2, 5, 4, 6, 3, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0]])
    cond = model.apply({'params': params}, ids, (ids > 0).astype(jnp.int32), method='encode')
    assert set(cond) == {'context'}
    want = model.encoder.apply({'params': params['encoder']}, ids)['last_hidden_state']
    np.testing.assert_array_equal(cond['context'], want)
    unet_config = {k: v for k, v in config.model.to_dict().items()
                   if k not in ('text_encoder', 'text')}
    unet = models.get_model(unet_config)
    x = jax.random.normal(jax.random.key(1), (2, 8, 16, 1))
    t = jnp.asarray([3, 7])
    np.testing.assert_array_equal(model.apply({'params': params}, x, t, cond),
                                  unet.apply({'params': params['denoiser']}, x, t, cond))


@pytest.mark.parametrize('name, count', [('sd15_unet', 859_520_964), ('sd21_unet', 865_910_724)])
def test_stable_diffusion_unet_configs_have_the_published_parameter_counts(name, count):
    """configs/model_configs' SD 1.5 / 2.1 UNets, traced with jax.eval_shape (no weights): the
    parameter counts of diffusers' UNet2DConditionModel for those configs (issue 21)."""
    from configs import model_configs
    model = models.get_model(getattr(model_configs, name)())
    assert models.count_params(models.param_shapes(model)) == count
