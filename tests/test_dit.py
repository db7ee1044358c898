"""DiT (models/dit.py) and its converter (--from=dit) against published counts and diffusers.

Truths: (1) Peebles & Xie 2023's parameter counts (traced with jax.eval_shape, nothing
allocated); (2) diffusers' DiTTransformer2DModel with random weights, its state dict renamed to
facebookresearch/DiT's key layout here (so the same rename serves the released .pt files), run
through convert_state_dict('dit') and compared on the same inputs; (3) its key names and shapes
at the DiT-XL/2 preset, from diffusers' module built on torch's 'meta' device; (4) malformed
checkpoints refused with one line per problem, exit 2 and nothing written.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)

from diffusion_jax import models  # noqa: E402
from diffusion_jax.models import dit  # noqa: E402

try:
    from configs import model_configs, pretrained
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs, pretrained

pytestmark = pytest.mark.usefixtures('fast_compiles')

# Peebles & Xie 2023 / facebookresearch/DiT at 32x32x4 latents, 1000 classes, learned Σ; the
# reference counts its frozen pos_embed too (XL/2: 675,129,632 = ours + 256·1152).
PARAM_COUNTS = {'DiT-XL/2': 674_834_720, 'DiT-S/2': 32_865_056, 'DiT-B/4': 130_426_496}
TINY = dict(image_size=8, in_channels=4, num_classes=10, learn_sigma=True)


def _count(config):
    return models.count_params(models.param_shapes(models.get_model(config)))


@pytest.mark.parametrize('preset', list(PARAM_COUNTS))
def test_preset_parameter_counts_are_the_papers(preset):
    assert _count(model_configs.dit(preset)) == PARAM_COUNTS[preset]


def test_pos_embed_table_and_preset_names():
    # MAE / DiT's table for a 2x3 grid, D = 8 (ω = 1, 1/100), written out: first half the column.
    table = dit.sincos_pos_embed_2d(8, 2, 3)
    row, col = 1, 2
    expect = [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100),
              np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)]
    np.testing.assert_allclose(table[row * 3 + col], expect, rtol=1e-6)
    assert model_configs.DIT_PRESETS == tuple(
        f'DiT-{v}/{p}' for v in ('S', 'B', 'L', 'XL') for p in (2, 4, 8))
    assert model_configs.dit('DiT-L-4').to_dict() == model_configs.dit('DiT-L/4').to_dict()
    with pytest.raises(ValueError, match='DiT-XL/3'):
        model_configs.dit('DiT-XL/3')
    with pytest.raises(ValueError, match='model_config.image_size=10 is not divisible'):
        models.get_model(model_configs.tiny_dit(image_size=10, patch_size=4))


# --- diffusers' DiTTransformer2DModel -> DiT's key layout -> ours -----------------------------

def dit_keys_from_diffusers(state, depth: int, pos_embed) -> dict:
    """diffusers' DiTTransformer2DModel state dict in facebookresearch/DiT's key names.

    diffusers repeats the timestep/label embedder in every block (its DiT port copies DiT's one
    embedder into each); block 0's is DiT's. pos_embed (a non-persistent buffer there) is added.
    """
    cat = lambda *names: torch.cat([state[n] for n in names], 0)
    b0 = 'transformer_blocks.0.norm1.emb.'
    out = {'x_embedder.proj.weight': state['pos_embed.proj.weight'],
           'x_embedder.proj.bias': state['pos_embed.proj.bias'],
           'pos_embed': pos_embed,
           'y_embedder.embedding_table.weight': state[b0 + 'class_embedder.embedding_table.weight'],
           'final_layer.adaLN_modulation.1.weight': state['proj_out_1.weight'],
           'final_layer.adaLN_modulation.1.bias': state['proj_out_1.bias'],
           'final_layer.linear.weight': state['proj_out_2.weight'],
           'final_layer.linear.bias': state['proj_out_2.bias']}
    for ours, theirs in (('0', 'linear_1'), ('2', 'linear_2')):
        for kind in ('weight', 'bias'):
            out[f't_embedder.mlp.{ours}.{kind}'] = state[f'{b0}timestep_embedder.{theirs}.{kind}']
    for i in range(depth):
        src = f'transformer_blocks.{i}.'
        for kind in ('weight', 'bias'):
            out[f'blocks.{i}.attn.qkv.{kind}'] = cat(*(f'{src}attn1.to_{n}.{kind}' for n in 'qkv'))
            for ours, theirs in (('attn.proj', 'attn1.to_out.0'), ('mlp.fc1', 'ff.net.0.proj'),
                                 ('mlp.fc2', 'ff.net.2'), ('adaLN_modulation.1', 'norm1.linear')):
                out[f'blocks.{i}.{ours}.{kind}'] = state[f'{src}{theirs}.{kind}']
    return out


def _diffusers_dit(config):
    from diffusers import DiTTransformer2DModel  # pylint: disable=import-outside-toplevel
    m = config
    return DiTTransformer2DModel(
        num_attention_heads=m.num_heads, attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=m.in_channels, out_channels=m.in_channels * (2 if m.learn_sigma else 1),
        num_layers=m.depth, sample_size=m.image_size, patch_size=m.patch_size,
        num_embeds_ada_norm=m.num_classes, norm_eps=m.norm_epsilon).eval()


@pytest.fixture(scope='module')
def tiny_reference():
    """A tiny diffusers DiT with random weights everywhere (its zero-initialised layers too)."""
    config = model_configs.tiny_dit(**TINY)
    torch.manual_seed(0)
    net = _diffusers_dit(config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        # One embedder, as in DiT (and in diffusers' converted checkpoints): every block's copy
        # equals block 0's.
        first = net.transformer_blocks[0].norm1.emb.state_dict()
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    for block in net.transformer_blocks:
        # DiT's sinusoid divides by half (f_k = 10000^(-k/128)); diffusers' DiT port shifts it
        # by one (k/127). Set diffusers to DiT's, the network the checkpoints were trained as.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    state = dit_keys_from_diffusers(net.state_dict(), config.depth,
                                    net.pos_embed.pos_embed.detach().clone())
    return config, net, state


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_forward_equals_diffusers_dit(tiny_reference):
    from diffusion_jax import convert  # pylint: disable=import-outside-toplevel
    config, net, state = tiny_reference
    params = convert.convert_state_dict(state, 'dit', config)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 17, 500, 999], np.int64)
    y = np.array([3, 0, 9, 10], np.int64)  # 10: the null row of classifier-free guidance
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    model = models.get_model(config)
    out = np.asarray(model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t),
                                 jnp.asarray(y)))
    assert out.shape == (4, 8, 8, 8) and np.abs(ref).mean() > 0.1
    assert _rel(out, ref) < 1e-4, _rel(out, ref)
    # y=None is the null label for the whole batch; remat is the same function.
    null = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t), None)
    again = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t), jnp.full((4,), 10))
    np.testing.assert_allclose(null, again, rtol=0, atol=0)
    remat = models.get_model(model_configs.tiny_dit(**TINY, remat=True))
    np.testing.assert_allclose(remat.apply({'params': params}, x, t, y), out, rtol=1e-6,
                               atol=1e-6)


def test_fresh_dit_predicts_zero_and_blocks_start_as_identity():
    config = model_configs.tiny_dit(**TINY)
    model = models.get_model(config)
    params = models.init_params(model, jax.random.key(0))['params']
    zeros = [p for n in ('final_layer_linear', 'final_layer_adaLN_modulation', 'blocks_0')
             for p in jax.tree.leaves(params[n]['adaLN_modulation'] if n == 'blocks_0'
                                      else params[n])]
    assert all(not np.any(np.asarray(p)) for p in zeros)
    out = model.apply({'params': params}, jnp.ones((2, 8, 8, 4)), jnp.array([1, 2]),
                      jnp.array([0, 1]))
    assert not np.any(np.asarray(out))


def test_dit_xl_2_key_names_and_shapes_are_the_references():
    """diffusers' DiT-XL/2 (on 'meta', no memory) renamed to DiT's layout = what we expect."""
    from diffusion_jax import convert  # pylint: disable=import-outside-toplevel
    for preset in ('DiT-XL-2-256', 'DiT-XL-2-512'):
        config = pretrained.preset_config(preset)
        with torch.device('meta'):
            net = _diffusers_dit(config.model)
        state = dit_keys_from_diffusers(net.state_dict(), config.model.depth,
                                        net.pos_embed.pos_embed)
        reference = {k: tuple(v.shape) for k, v in state.items()}
        assert convert.expected_source_shapes('dit', config.model) == reference
    # facebookresearch/DiT's own count of DiT-XL/2 at 256, pos_embed included.
    assert sum(int(np.prod(s)) for s in convert.expected_source_shapes(
        'dit', pretrained.preset_config('DiT-XL-2-256').model).values()) == 675_129_632


def _problem_lines(err):
    return str(err.value).splitlines()[1:]


def test_missing_extra_misshapen_and_wrong_pos_embed_each_one_line(tiny_reference):
    from diffusion_jax import convert  # pylint: disable=import-outside-toplevel
    config, _, state = tiny_reference
    key = 'blocks.1.mlp.fc1.weight'
    cases = {
        f'missing key {key}': {k: v for k, v in state.items() if k != key},
        'missing key pos_embed': {k: v for k, v in state.items() if k != 'pos_embed'},
        'unexpected key blocks.2.attn.qkv.weight':
            {**state, 'blocks.2.attn.qkv.weight': torch.ones(3)},
        f'shape mismatch {key}': {**state, key: torch.ones(5, 64)},
        'value mismatch pos_embed': {**state, 'pos_embed': state['pos_embed'] + 1e-3},
    }
    for expected, bad in cases.items():
        with pytest.raises(ValueError, match='1 problem') as err:
            convert.convert_state_dict(bad, 'dit', config)
        lines = _problem_lines(err)
        assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_converted_tiny_dit_file_loads_and_cli_refuses_bad_file(tiny_reference, tmp_path,
                                                                 capsys):
    from diffusion_jax import convert, run  # pylint: disable=import-outside-toplevel
    from diffusion_jax.convert import __main__ as cli  # pylint: disable=import-outside-toplevel
    config, _, state = tiny_reference
    torch.save(state, tmp_path / 'tiny.pt')
    overrides = {f'model.{k}': v for k, v in model_configs.tiny_dit(**TINY).items()}
    overrides.update({'data.image_size': 8, 'data.num_classes': 10})
    loaded_config, params = convert.load_torch_checkpoint(tmp_path / 'tiny.pt', 'dit',
                                                          'DiT-XL-2-256', overrides=overrides)
    direct = convert.convert_state_dict(state, 'dit', config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)
    on_disk = convert.convert(tmp_path / 'tiny.pt', 'dit', 'DiT-XL-2-256', tmp_path / 'run',
                              overrides=overrides)
    restored = run.load(str(on_disk.workdir))
    assert restored.config.model.name == 'dit'
    for a, b in zip(jax.tree.leaves(restored.variables['params']), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)

    bad = {k: v for k, v in state.items() if k != 'pos_embed'}
    torch.save(bad, tmp_path / 'bad.pt')
    code = cli.main(['--from=dit', '--preset=DiT-XL-2-256', f'--src={tmp_path / "bad.pt"}',
                     f'--workdir={tmp_path / "out"}'])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith('error: the dit checkpoint')
    assert any(line.startswith('missing key pos_embed (shape (1, 256, 1152)') for line in err)
    assert any(line.startswith('shape mismatch x_embedder.proj.weight') for line in err)
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match='--from=dit'):
        convert.load_torch_checkpoint(tmp_path / 'tiny.pt', 'guided-diffusion', 'DiT-XL-2-256')


def test_learn_sigma_follows_the_variance_type():
    from diffusion_jax import config_validation  # pylint: disable=import-outside-toplevel
    config = pretrained.preset_config('DiT-XL-2-256')
    assert config_validation.resolve(config, 'train').model.learn_sigma is True
    config.diffusion.model_var_type, config.diffusion.loss_type = 'fixed_small', 'mse'
    derived = config_validation.resolve(config, 'train', typed={'diffusion.model_var_type'})
    assert derived.model.learn_sigma is False
    with pytest.raises(ValueError, match=r'^model.learn_sigma=True does not fit diffusion.'
                                         r"model_var_type='fixed_small'"):
        config_validation.resolve(config, 'train')


def test_dit_trains_and_samples_on_digits(tmp_path):
    """model.name='dit' through the train loop: class-conditional, learned Σ (L_hybrid),
    label dropout for guidance; the loss falls and the sample grid is written."""
    import json  # pylint: disable=import-outside-toplevel
    from configs import digits  # pylint: disable=import-outside-toplevel
    from diffusion_jax import train  # pylint: disable=import-outside-toplevel
    c = digits.get_config()
    c.model = model_configs.tiny_dit(8, 1, num_classes=10, learn_sigma=True)
    c.diffusion.update(num_timesteps=20, beta_start=5e-3, beta_end=0.3,
                       model_var_type='learned_range', loss_type='hybrid')
    c.training.update(batch_size=16, num_train_steps=8, log_every_steps=2, label_dropout=0.1,
                      checkpoint_every_steps=8, sample_every_steps=8, num_sample_images=8)
    c.optim.update(learning_rate=2e-3, warmup_steps=0)
    state = train.train_and_evaluate(c, str(tmp_path))
    assert int(state.step) == 8
    with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
        losses = [json.loads(line)['loss'] for line in f]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert list((tmp_path / 'samples').glob('*/*.png'))
