"""The KL autoencoder (models/autoencoder.py) and --from=diffusers --preset=sd_vae against
diffusers' AutoencoderKL.

Truths: (1) diffusers' AutoencoderKL with random weights everywhere, converted through the
converter's table: encode (mean, clamped logvar) and decode agree on the same inputs; (2) the
SD VAE's key names, shapes and parameter count from diffusers' module with the published
config, built on torch's 'meta' device; (3) a diffusers folder and a .safetensors file load
through convert.load_torch_checkpoint; malformed ones are refused one line per problem.
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)

from diffusion_jax import convert, models  # noqa: E402

try:
    from configs import model_configs, pretrained
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs, pretrained

pytestmark = pytest.mark.usefixtures('fast_compiles')

TINY = {'model.image_size': 16, 'model.block_out_channels': (8, 16),
        'model.layers_per_block': 1, 'model.norm_num_groups': 4, 'data.image_size': 16}
# diffusers' AutoencoderKL with stabilityai/sd-vae-ft-ema's config.json: 83,653,863 parameters.
SD_VAE_PARAMS = 83_653_863


def _diffusers_vae(m):
    from diffusers import AutoencoderKL  # pylint: disable=import-outside-toplevel
    levels = len(m.block_out_channels)
    return AutoencoderKL(
        in_channels=m.in_channels, out_channels=m.out_channels,
        down_block_types=('DownEncoderBlock2D',) * levels,
        up_block_types=('UpDecoderBlock2D',) * levels,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, norm_num_groups=m.norm_num_groups,
        sample_size=m.image_size, scaling_factor=m.scaling_factor).eval()


@pytest.fixture(scope='module')
def tiny():
    config = convert.preset_config('sd_vae', TINY)
    torch.manual_seed(0)
    net = _diffusers_vae(config.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # GroupNorm scales near 1
            else:
                p.copy_(torch.randn_like(p) * 0.3 / np.sqrt(max(p[0].numel(), 1)))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = convert.convert_state_dict(state, 'diffusers', config.model)
    return config, net, state, params


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_encode_and_decode_equal_diffusers(tiny):
    config, net, _, params = tiny
    model = models.get_model(config.model)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        dist = net.encode(_nchw(x)).latent_dist
        ref_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
        ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
    mean, logvar = model.apply({'params': params}, jnp.asarray(x), method='encode')
    assert mean.shape == (2, 8, 8, 4) and np.abs(ref_mean).mean() > 0.05
    assert _max_rel(np.asarray(mean), ref_mean) < 1e-4
    assert _max_rel(np.asarray(logvar), ref_logvar) < 1e-4

    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref_x = net.decode(_nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(model.apply({'params': params}, jnp.asarray(z), method='decode'))
    assert out.shape == (2, 16, 16, 3) and np.abs(ref_x).mean() > 0.05
    assert _max_rel(out, ref_x) < 1e-4
    # __call__ without rng reconstructs from the mean (diffusers' forward, no posterior sample).
    with torch.no_grad():
        ref_rec = net(_nchw(x)).sample.numpy().transpose(0, 2, 3, 1)
    rec = np.asarray(model.apply({'params': params}, jnp.asarray(x)))
    assert _max_rel(rec, ref_rec) < 1e-4


def test_logvar_is_clamped_like_diffusers(tiny):
    config, net, state, _ = tiny
    c = config.model.latent_channels
    shifted = dict(state)
    bias = state['quant_conv.bias'].clone()
    bias[c:c + 2] += 100.0  # two logvar channels far above 20
    bias[c + 2:] -= 100.0  # the others far below -30
    shifted['quant_conv.bias'] = bias
    params = convert.convert_state_dict(shifted, 'diffusers', config.model)
    net.load_state_dict(shifted)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    try:
        with torch.no_grad():
            ref = net.encode(_nchw(x)).latent_dist.logvar.numpy().transpose(0, 2, 3, 1)
    finally:
        net.load_state_dict(state)
    _, logvar = models.get_model(config.model).apply({'params': params}, x, method='encode')
    logvar = np.asarray(logvar)
    np.testing.assert_array_equal(logvar[..., :2], 20.0)
    np.testing.assert_array_equal(logvar[..., 2:], -30.0)
    np.testing.assert_array_equal(logvar, ref)


def test_sd_vae_keys_shapes_and_count_are_diffusers():
    config = pretrained.preset_config('sd_vae')
    with torch.device('meta'):
        net = _diffusers_vae(config.model)
    reference = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert convert.expected_source_shapes('diffusers', config.model) == reference
    ours = models.count_params(models.param_shapes(models.get_model(config.model)))
    assert ours == sum(int(np.prod(s)) for s in reference.values()) == SD_VAE_PARAMS
    assert config.model.scaling_factor == 0.18215
    with pytest.raises(ValueError, match='--from=dit has no autoencoders|--from=diffusers'):
        convert.load_torch_checkpoint('x.pt', 'dit', 'sd_vae')


def test_folder_and_safetensors_load_and_bad_keys_one_line_each(tiny, tmp_path):
    config, net, state, params = tiny
    net.save_pretrained(tmp_path / 'vae')  # a diffusers folder (safetensors inside)
    _, from_folder = convert.load_torch_checkpoint(tmp_path / 'vae', 'diffusers', 'sd_vae',
                                                   overrides=TINY)
    weights = tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors'
    _, from_file = convert.load_torch_checkpoint(weights, 'diffusers', 'sd_vae', overrides=TINY)
    for a, b, c in zip(*(jax.tree.leaves(p) for p in (from_folder, from_file, params))):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    key = 'decoder.up_blocks.1.resnets.0.conv_shortcut.weight'
    cases = {f'missing key {key}': {k: v for k, v in state.items() if k != key},
             'unexpected key encoder.extra': {**state, 'encoder.extra': torch.ones(2)},
             f'shape mismatch {key}': {**state, key: torch.ones(8, 16, 3, 3)}}
    for expected, bad in cases.items():
        with pytest.raises(ValueError, match='1 problem') as err:
            convert.convert_state_dict(bad, 'diffusers', config.model)
        lines = str(err.value).splitlines()[1:]
        assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_cli_sd_vae_refuses_a_unet_file_and_writes_nothing(tmp_path, capsys):
    from diffusion_jax.convert import __main__ as cli  # pylint: disable=import-outside-toplevel
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file({'conv_in.weight': torch.zeros(128, 3, 3, 3)}, str(tmp_path / 'unet.safetensors'))
    code = cli.main(['--from=diffusers', '--preset=sd_vae',
                     f'--src={tmp_path / "unet.safetensors"}', f'--workdir={tmp_path / "out"}'])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith('error: the diffusers checkpoint')
    assert any(line.startswith('unexpected key conv_in.weight') for line in err)
    assert any(line.startswith('missing key encoder.conv_in.weight') for line in err)
    assert not (tmp_path / 'out').exists()


def test_vae_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r'model_config.block_out_channels=\(8, 12\)'):
        models.get_model(model_configs.sd_vae(16, block_out_channels=(8, 12),
                                              norm_num_groups=8))
    with pytest.raises(ValueError, match='model_config.image_size=20 is not divisible'):
        models.get_model(model_configs.sd_vae(20))
