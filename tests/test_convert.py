"""The checkpoint converters (diffusion_jax.convert) against reference networks with random weights.

Truths: (1) the key names and shapes of Ho et al.'s checkpoint from diffusers' own UNet2DModel
(google/ddpm-cifar10-32's config); (2) its forward outputs against the converted weights, with
random non-zero weights everywhere; (3) every malformed checkpoint is refused with one line per
problem; (4) a converted run samples and evaluates through the command line's own functions, and
its NLL is the library's full_bpd on the same batch and key. The OpenAI layouts (improved- and
guided-diffusion) are checked against openai's own guided_diffusion package in
tests/test_convert_upstream.py.
"""
import pathlib
import sys

import jax
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)

from diffusion_jax import convert, models  # noqa: E402
from diffusion_jax.convert import torch_reference  # noqa: E402

try:
    from configs import pretrained
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import pretrained

# Programs here are compiled once each: XLA's optimisation passes cost more than they save.
pytestmark = pytest.mark.usefixtures('fast_compiles')
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
PARAM_COUNTS = {'ddpm_cifar10_32': 35_746_307}  # Ho et al. 2020: 35.7M


def _diffusers_ddpm_cifar10(**overrides):
    """UNet2DModel with the published google/ddpm-cifar10-32 config.json values."""
    from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
    kwargs = dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, act_fn='silu', center_input_sample=False,
        mid_block_scale_factor=1, time_embedding_type='positional')
    kwargs.update(overrides)
    return UNet2DModel(**kwargs).eval()


def test_diffusers_preset_keys_and_param_count():
    config = pretrained.preset_config('ddpm_cifar10_32')
    with torch.device('meta'):
        net = _diffusers_ddpm_cifar10()
    reference = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert convert.expected_source_shapes('diffusers', config.model) == reference
    assert sum(int(np.prod(s)) for s in reference.values()) == PARAM_COUNTS['ddpm_cifar10_32']


# --- forward equivalence ---------------------------------------------------------------------

def _small(**fields):
    base = {'model.ch': 32, 'model.image_size': 8, 'model.ch_mult': (1, 2),
            'model.num_res_blocks': 1, 'model.attn_resolutions': (8, 4)}
    base.update({f'model.{k}': v for k, v in fields.items()})
    return base


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    m = config.model
    x = rng.standard_normal((batch, m.image_size, m.image_size, m.in_channels)).astype(np.float32)
    t = np.array([3, config.diffusion.num_timesteps - 7][:batch], np.int32)
    y = np.array([1, 4][:batch], np.int32) if m.name == 'unet' and m.num_classes else None
    return x, t, y


def _ours(config, params, x, t, y):
    model = models.get_model(config.model)
    if config.model.name == 'classifier':
        fn = lambda p, x, t: model.apply({'params': p}, x, t)
        return np.asarray(jax.jit(fn).lower(params, x, t).compile(FAST_COMPILE)(params, x, t))
    fn = lambda p, x, t, y: model.apply({'params': p}, x, t, y)
    return np.asarray(jax.jit(fn).lower(params, x, t, y).compile(FAST_COMPILE)(params, x, t, y))


def _reference(net, config, x, t, y):
    """The torch network called as its diffusion calls it: t·1000/T with rescale_timesteps."""
    with torch.no_grad():
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
        tt = torch.from_numpy(t.astype(np.float32) * config.model.timestep_scale)
        if config.model.name == 'classifier':
            return net(tx, tt).numpy()
        ty = None if y is None else torch.from_numpy(y.astype(np.int64))
        return net(tx, tt, ty).numpy().transpose(0, 2, 3, 1)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def improved_small():
    config = convert.preset_config('cifar10_uncond_50M_500K',
                                   _small(num_heads=2, num_heads_upsample=4))
    net = torch_reference.randomize_(torch_reference.build(config.model), seed=1)
    return config, net, {k: v.clone() for k, v in net.state_dict().items()}


def test_diffusers_ddpm_cifar10_32_forward_equals_unet2dmodel():
    """The full 35.7M ddpm-cifar10-32 network, random weights: <= 1e-4 relative."""
    net = torch_reference.randomize_(_diffusers_ddpm_cifar10(), seed=2)
    config = pretrained.preset_config('ddpm_cifar10_32')
    params = convert.convert_state_dict(net.state_dict(), 'diffusers', config.model)
    x, t, _ = _inputs(config)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                  torch.from_numpy(t.astype(np.int64))).sample.numpy().transpose(0, 2, 3, 1)
    out = _ours(config, params, x, t, None)
    assert np.abs(ref).mean() > 0.05
    assert _rel(out, ref) < 1e-4, _rel(out, ref)


# --- malformed checkpoints, file formats, dtypes ---------------------------------------------

def _problem_lines(err):
    return str(err.value).splitlines()[1:]


def test_missing_extra_and_misshapen_keys_each_one_line(improved_small):
    config, _, state = improved_small
    key = 'input_blocks.1.0.in_layers.2.weight'
    cases = {
        'missing key input_blocks.1.0.in_layers.2.weight':
            {k: v for k, v in state.items() if k != key},
        'unexpected key decoder.extra.weight': {**state, 'decoder.extra.weight': torch.ones(3)},
        'shape mismatch input_blocks.1.0.in_layers.2.weight':
            {**state, key: torch.ones(state[key].shape[0], 1, 3, 3)},
    }
    for expected, bad in cases.items():
        with pytest.raises(ValueError, match='1 problem') as err:
            convert.convert_state_dict(bad, 'improved-diffusion', config.model)
        lines = _problem_lines(err)
        assert len(lines) == 1 and lines[0].startswith(expected), lines
    both = {k: v for k, v in state.items() if k != key}
    both['stray'] = torch.zeros(2)
    with pytest.raises(ValueError, match='2 problem') as err:
        convert.convert_state_dict(both, 'improved-diffusion', config.model)
    assert sorted(line.split()[0] for line in _problem_lines(err)) == ['missing', 'unexpected']


def test_fp16_checkpoint_is_cast_and_files_read(improved_small, tmp_path):
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    config, _, state = improved_small
    half = {k: v.half() for k, v in state.items()}
    torch.save(half, tmp_path / 'model.pt')
    save_file(half, str(tmp_path / 'model.safetensors'))
    from_pt = convert.read_state_dict(tmp_path / 'model.pt')
    from_st = convert.read_state_dict(tmp_path / 'model.safetensors')
    params_pt = convert.convert_state_dict(from_pt, 'improved-diffusion', config.model)
    params_st = convert.convert_state_dict(from_st, 'improved-diffusion', config.model)
    direct = convert.convert_state_dict({k: v.float() for k, v in half.items()},
                                        'improved-diffusion', config.model)
    for a, b, c in zip(*(jax.tree.leaves(p) for p in (params_pt, params_st, direct))):
        assert a.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_wrong_source_or_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match='--from=diffusers'):
        convert.load_torch_checkpoint(tmp_path / 'x.pt', 'improved-diffusion', 'ddpm_cifar10_32')
    with pytest.raises(ValueError, match='--preset='):
        convert.load_torch_checkpoint(tmp_path / 'x.pt', 'diffusers', 'cifar10_50M')
    with pytest.raises(ValueError, match='does not exist'):
        convert.load_torch_checkpoint(tmp_path / 'x.pt', 'diffusers', 'ddpm_cifar10_32')


def test_cli_prints_one_error_line_per_problem_and_writes_nothing(tmp_path, capsys):
    from diffusion_jax.convert import __main__ as cli  # pylint: disable=import-outside-toplevel
    torch.save({'not.a.unet.key': torch.zeros(1)}, tmp_path / 'bad.pt')
    code = cli.main(['--from=guided-diffusion', '--preset=64x64_classifier',
                     f'--src={tmp_path / "bad.pt"}', f'--workdir={tmp_path / "out"}'])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith('error: the guided-diffusion checkpoint')
    assert any(line.startswith('missing key input_blocks.0.0.weight') for line in err)
    assert any(line.startswith('unexpected key not.a.unet.key') for line in err)
    assert not (tmp_path / 'out').exists()


# --- end to end: convert, then --mode=sample and --mode=eval ----------------------------------

TINY_DIGITS = {  # improved-diffusion's CIFAR-10 architecture shrunk to the 8x8 digits
    'model.image_size': 8, 'model.in_channels': 1, 'model.out_channels': 2, 'model.ch': 32,
    'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'model.attn_resolutions': (4,),
    'model.num_heads': 2, 'model.dropout': 0.0, 'diffusion.num_timesteps': 10,
    'model.timestep_scale': 1000.0 / 10,  # rescale_timesteps for T = 10
}


def test_converted_run_samples_and_evaluates(tmp_path):
    # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp
    from configs import digits
    from diffusion_jax import input_pipeline, main, run
    from diffusion_jax.diffusion import create_diffusion
    from diffusion_jax.evaluation import likelihood
    config = convert.preset_config('cifar10_uncond_50M_500K', TINY_DIGITS)
    net = torch_reference.randomize_(torch_reference.build(config.model), seed=3)
    torch.save(net.state_dict(), tmp_path / 'tiny.pt')
    config, params = convert.load_torch_checkpoint(
        tmp_path / 'tiny.pt', 'improved-diffusion', 'cifar10_uncond_50M_500K',
        overrides=TINY_DIGITS)
    config.data = digits.get_config().data  # real 8x8 data for the bound
    config.training.batch_size = 8
    s, e = config.sampling, config.eval
    s.num_samples, s.batch_size, s.num_steps = 8, 8, '3'
    e.batch_size, e.num_batches, e.split = 8, 1, 'test'
    workdir = str(tmp_path / 'run')
    run.create(workdir, config, {'params': params})

    # The run on disk holds the converted network: same outputs as the torch reference.
    loaded = run.load(workdir)
    x, t, _ = _inputs(loaded.config)
    ref = _reference(net, loaded.config, x, t, None)
    np.testing.assert_allclose(loaded.model.apply(loaded.variables, x, t), ref,
                               rtol=1e-4, atol=1e-5 * np.abs(ref).max())

    for mode in ('sample', 'eval'):
        resolved, wd = main.resolve_command(run.get_config(workdir), workdir, mode, {})
        result = main.run(resolved, wd, mode)
    samples = np.load(next(pathlib.Path(workdir, 'samples').rglob('samples.npz')))
    images = samples[samples.files[0]]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8

    # The NLL is the library's bound, likelihood.full_bpd, of the test split's first 8 images
    # through the converted network, with the eval's key: training.seed + 1 folded with the
    # batch index (evaluate.evaluate_nll).
    batch = next(input_pipeline.eval_iterator(
        input_pipeline.get_dataset(resolved.data, 'test'), 8, 1))
    expected = likelihood.full_bpd(
        create_diffusion(resolved.diffusion),
        lambda x_t, t: loaded.model.apply(loaded.variables, x_t, t), jnp.asarray(batch['image']),
        jax.random.fold_in(jax.random.key(resolved.training.seed + 1), 0))
    nll = result['nll']
    assert nll['num_images'] == 8 and nll['estimator'] == 'full'
    # Measured: equal to 1e-7 relative (8 devices against 1: reduction order only).
    np.testing.assert_allclose(nll['total_bpd'], np.mean(expected['total']), rtol=1e-5)
    assert 1.0 < nll['total_bpd'] < 100.0  # random weights: a finite bound, far from 0


def test_preset_names_are_the_issue_s_api():
    """The preset names and sources are public API (issue #10): spelled exactly so."""
    assert pretrained.SOURCES == {
        'cifar10_uncond_50M_500K': 'improved-diffusion',
        'cifar10_uncond_vlb_50M_500K': 'improved-diffusion',
        'imagenet64_uncond_100M_1500K': 'improved-diffusion',
        '64x64_diffusion': 'guided-diffusion',
        '64x64_classifier': 'guided-diffusion',
        '256x256_diffusion_uncond': 'guided-diffusion',
        '256x256_classifier': 'guided-diffusion',
        '128x128_diffusion': 'guided-diffusion',
        'ddpm_cifar10_32': 'diffusers',
        'DiT-XL-2-256': 'dit',  # issue #20
        'DiT-XL-2-512': 'dit',
        'sd_vae': 'diffusers',
    }
