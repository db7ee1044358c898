"""The converters and the EDM samplers against the upstream definitions, installed as test
dependencies (setup.py's `test` extra), never copied into this repository, with random weights.

Upstreams:
  * guided-diffusion-sdk 1.0.0: openai's `guided_diffusion` package (its unet.py is
    guided-diffusion's but for the gradient-checkpoint flag, off here). Its `UNetModel` and
    `EncoderUNetModel` are the truth for both OpenAI layouts:
      - guided-diffusion's (the ADM presets and the noisy classifiers), built by its own
        `script_util.create_model` / `create_classifier` with the README's flags;
      - improved-diffusion's: improved-diffusion's unet.py (openai/improved-diffusion) builds the
        same module tree as guided-diffusion's UNetModel with num_head_channels=-1,
        use_new_attention_order=False and resblock_updown=False (same key names: time_embed,
        label_emb, input_blocks.K.J with in_layers / emb_layers / out_layers / skip_connection,
        Downsample `op`, Upsample `conv`, AttentionBlock norm / qkv / proj_out, out), and its
        QKVAttention (heads split before q, k, v) computes guided-diffusion's
        QKVAttentionLegacy. openai's improved-diffusion has no package on the index, so its
        presets are checked against guided_diffusion's UNetModel with those flags, and its
        `script_util.create_model` rule for 32x32 images (channel_mult (1, 2, 2, 2)) passed
        explicitly.
  * k-diffusion 0.1.1.post1 (`k_diffusion.sampling`: get_sigmas_karras, sample_euler,
    sample_heun) for the EDM process's euler and heun solvers, step for step with the same
    sigmas and the same denoiser.
diffusers' UNet2DModel (Ho et al.'s network, google/ddpm-cifar10-32) is compared in
tests/test_convert.py (test_diffusers_ddpm_cifar10_32_forward_equals_unet2dmodel).
"""
import importlib
import importlib.util
import inspect
import math
import pathlib
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # its nn.py uses torch.cuda.amp's deprecated decorators
    warnings.simplefilter('ignore', FutureWarning)
    from guided_diffusion import script_util as gd_script
    from guided_diffusion import unet as gd_unet

from diffusion_jax import convert, models, processes  # noqa: E402
from diffusion_jax.convert import torch_reference  # noqa: E402
from diffusion_jax.samplers import common, process_solvers  # noqa: E402

try:
    from configs import pretrained
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import pretrained

pytestmark = pytest.mark.usefixtures('fast_compiles')
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
# Relative L2 difference of a converted network's output from the upstream network's.
FORWARD_RTOL = 1e-4

# --- the presets' checkpoints: keys and shapes of the upstream networks ------------------------

# improved-diffusion's script_util.model_and_diffusion_defaults (num_heads 4, attention at 16 and
# 8, scale-shift norm) in guided_diffusion's create_model terms; README flags on top.
IMPROVED = dict(num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
                attention_resolutions='16,8', use_scale_shift_norm=True, resblock_updown=False,
                use_new_attention_order=False, class_cond=False, learn_sigma=True, dropout=0.0)
CIFAR10 = dict(IMPROVED, image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3,
               channel_mult='1,2,2,2')  # improved-diffusion README, CIFAR-10 MODEL_FLAGS
UPSTREAM_FLAGS = {
    'cifar10_uncond_50M_500K': CIFAR10,
    'cifar10_uncond_vlb_50M_500K': CIFAR10,
    'imagenet64_uncond_100M_1500K': dict(IMPROVED, image_size=64, num_channels=128,
                                         num_res_blocks=3, channel_mult=''),
    # guided-diffusion README MODEL_FLAGS (model_and_diffusion_defaults underneath)
    '64x64_diffusion': dict(
        gd_script.model_and_diffusion_defaults(), attention_resolutions='32,16,8',
        class_cond=True, dropout=0.1, image_size=64, learn_sigma=True, num_channels=192,
        num_head_channels=64, num_res_blocks=3, resblock_updown=True,
        use_new_attention_order=True, use_scale_shift_norm=True),
    '128x128_diffusion': dict(
        gd_script.model_and_diffusion_defaults(), attention_resolutions='32,16,8',
        class_cond=True, image_size=128, learn_sigma=True, num_channels=256, num_heads=4,
        num_res_blocks=2, resblock_updown=True, use_scale_shift_norm=True),
    '256x256_diffusion_uncond': dict(
        gd_script.model_and_diffusion_defaults(), attention_resolutions='32,16,8',
        class_cond=False, image_size=256, learn_sigma=True, num_channels=256,
        num_head_channels=64, num_res_blocks=2, resblock_updown=True, use_scale_shift_norm=True),
    # guided-diffusion README CLASSIFIER_FLAGS (classifier_defaults underneath)
    '64x64_classifier': dict(gd_script.classifier_defaults(), image_size=64, classifier_depth=4),
    '256x256_classifier': dict(gd_script.classifier_defaults(), image_size=256,
                               classifier_depth=2),
}


PARAM_COUNTS = {  # improved-diffusion's UNetModel with the README's CIFAR-10 flags
    'cifar10_uncond_50M_500K': 52_546_438,
    'cifar10_uncond_vlb_50M_500K': 52_546_438,
}


def _upstream_preset(preset):
    flags = UPSTREAM_FLAGS[preset]
    if 'classifier_depth' in flags:
        return gd_script.create_classifier(**flags)
    names = inspect.signature(gd_script.create_model).parameters  # less the diffusion's flags
    return gd_script.create_model(**{k: v for k, v in flags.items() if k in names})


def test_every_openai_preset_has_upstream_flags():
    assert sorted(UPSTREAM_FLAGS) == sorted(
        p for p, s in pretrained.SOURCES.items() if s in ('improved-diffusion', 'guided-diffusion'))


@pytest.mark.parametrize('preset', sorted(UPSTREAM_FLAGS))
def test_preset_keys_and_shapes_are_upstream_s(preset):
    """Every key and shape the converter expects is the upstream network's state_dict (built on
    torch's 'meta' device: no memory is spent on the 500M models)."""
    with torch.device('meta'):
        net = _upstream_preset(preset)
    upstream = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    config = pretrained.preset_config(preset)
    assert convert.expected_source_shapes(pretrained.SOURCES[preset], config.model) == upstream
    if preset in PARAM_COUNTS:  # ours: the label table has one extra (null) row of 4·ch values
        ours = models.count_params(models.param_shapes(models.get_model(config.model)))
        assert ours == sum(int(np.prod(s)) for s in upstream.values()) == PARAM_COUNTS[preset]


# --- forward outputs of small variants, random weights ----------------------------------------

def _small(**fields):
    base = {'model.ch': 32, 'model.image_size': 8, 'model.ch_mult': (1, 2),
            'model.num_res_blocks': 1, 'model.attn_resolutions': (8, 4)}
    base.update({f'model.{k}': v for k, v in fields.items()})
    return base


# The upstream constructor arguments shared by the small variants: 8x8 RGB, width 32, two
# levels, one block per level, attention at downsample rates 1 and 2 (8x8 and 4x4).
UP_SMALL = dict(image_size=8, in_channels=3, model_channels=32, num_res_blocks=1,
                attention_resolutions=(1, 2), channel_mult=(1, 2))
# variant -> (preset, our overrides, upstream class, upstream kwargs). Two heads or more
# everywhere, t·1000/T != t for improved-diffusion: a wrong qkv order, head split or timestep
# scale changes the output.
VARIANTS = {
    'improved_legacy_heads_upsample': (
        'cifar10_uncond_50M_500K', _small(num_heads=2, num_heads_upsample=4), gd_unet.UNetModel,
        dict(UP_SMALL, out_channels=6, num_heads=2, num_heads_upsample=4,
             use_scale_shift_norm=True)),
    'adm_new_order_head_channels_classes': (
        '64x64_diffusion', _small(num_head_channels=16, num_classes=5), gd_unet.UNetModel,
        dict(UP_SMALL, out_channels=6, num_classes=5, num_head_channels=16,
             use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True)),
    'adm_legacy_num_heads_classes': (
        '128x128_diffusion', _small(num_heads=2, num_classes=3), gd_unet.UNetModel,
        dict(UP_SMALL, out_channels=6, num_classes=3, num_heads=2, use_scale_shift_norm=True,
             resblock_updown=True)),
    'adm_legacy_head_channels_uncond': (
        '256x256_diffusion_uncond', _small(num_head_channels=16), gd_unet.UNetModel,
        dict(UP_SMALL, out_channels=6, num_head_channels=16, use_scale_shift_norm=True,
             resblock_updown=True)),
    **{f'classifier_{pool}': (
        '64x64_classifier', _small(num_head_channels=16, num_classes=7, pool=pool),
        gd_unet.EncoderUNetModel,
        dict(UP_SMALL, out_channels=7, num_head_channels=16, use_scale_shift_norm=True,
             resblock_updown=True, pool=pool)) for pool in ('attention', 'adaptive', 'spatial')},
}


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    m = config.model
    x = rng.standard_normal((batch, m.image_size, m.image_size, m.in_channels)).astype(np.float32)
    t = np.array([3, config.diffusion.num_timesteps - 7][:batch], np.int32)
    y = np.array([1, 2][:batch], np.int32) if m.name == 'unet' and m.num_classes else None
    return x, t, y


def _ours(config, params, x, t, y):
    model = models.get_model(config.model)
    if config.model.name == 'classifier':
        fn = lambda p, x, t: model.apply({'params': p}, x, t)
        return np.asarray(jax.jit(fn).lower(params, x, t).compile(FAST_COMPILE)(params, x, t))
    fn = lambda p, x, t, y: model.apply({'params': p}, x, t, y)
    return np.asarray(jax.jit(fn).lower(params, x, t, y).compile(FAST_COMPILE)(params, x, t, y))


def _upstream_call(net, config, preset, x, t, y):
    """The network as its diffusion calls it: NCHW, and t·1000/T for improved-diffusion's
    presets (rescale_timesteps=True there; guided-diffusion's feed t itself)."""
    improved = pretrained.SOURCES[preset] == 'improved-diffusion'
    scale = np.float32(1000.0 / config.diffusion.num_timesteps if improved else 1.0)
    with torch.no_grad():
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2))
        tt = torch.from_numpy(t.astype(np.float32) * scale)
        if config.model.name == 'classifier':
            return net(tx, tt).numpy()
        ty = None if y is None else torch.from_numpy(y.astype(np.int64))
        return net(tx, tt, ty).numpy().transpose(0, 2, 3, 1)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def upstream_networks():
    """variant -> (our config, its preset, the upstream network with random weights everywhere,
    zero-initialised layers included)."""
    out = {}
    for name, (preset, overrides, cls, kwargs) in VARIANTS.items():
        out[name] = (convert.preset_config(preset, overrides), preset,
                     torch_reference.randomize_(cls(**kwargs).eval(), seed=1))
    return out


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_converted_forward_equals_upstream(variant, upstream_networks):
    config, preset, net = upstream_networks[variant]
    params = convert.convert_state_dict(net.state_dict(), pretrained.SOURCES[preset],
                                        config.model)
    x, t, y = _inputs(config)
    ref = _upstream_call(net, config, preset, x, t, y)
    out = _ours(config, params, x, t, y)
    assert np.abs(ref).mean() > 0.05  # a real signal, not zeros
    assert _rel(out, ref) < FORWARD_RTOL, _rel(out, ref)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_our_torch_port_is_the_upstream_network(variant, upstream_networks):
    """diffusion_jax/convert/torch_reference.py (which the end-to-end conversion test and the
    pretrained notebook use to write random-weight checkpoints) loads the upstream state dict
    strictly and computes the upstream outputs."""
    config, preset, net = upstream_networks[variant]
    port = torch_reference.build(config.model)
    port.load_state_dict(net.state_dict(), strict=True)
    x, t, y = _inputs(config)
    ref = _upstream_call(net, config, preset, x, t, y)
    assert _rel(_upstream_call(port, config, preset, x, t, y), ref) < 1e-6


# --- EDM solvers against k-diffusion ----------------------------------------------------------

def _k_diffusion_sampling():
    """`k_diffusion.sampling` without running k_diffusion/__init__.py: that file imports the
    package's training and evaluation modules, whose requirements (clip-anytorch needs
    pkg_resources, dctorch pins numpy<2) cannot be installed beside jax>=0.7. sampling.py
    itself needs torch, scipy, torchsde, torchdiffeq and k_diffusion.utils."""
    if 'k_diffusion.sampling' in sys.modules:
        return sys.modules['k_diffusion.sampling']
    spec = importlib.util.find_spec('k_diffusion')
    if spec is None:
        raise ImportError('k-diffusion is a test dependency: pip install --no-deps '
                          'k-diffusion==0.1.1.post1 (the README\'s test command)')
    package = types.ModuleType('k_diffusion')
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault('k_diffusion', package)
    return importlib.import_module('k_diffusion.sampling')


K_SAMPLING = _k_diffusion_sampling()
EDM = processes.EDM()  # Table 1: σ_min 0.002, σ_max 80, σ_d 0.5, ρ 7
# The denoiser both samplers call: the exact E[x_0 | x_σ] of a two-component Gaussian mixture per
# coordinate, x_0 ~ ½ N(-M, S²) + ½ N(M, S²), nonlinear in x.
M, S = 0.6, 0.3
SHAPE = (4, 3, 3, 1)


def _torch_denoiser(x, sigma):
    """k-diffusion's model(x, σ[B]) -> D(x; σ), in float64."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    var = S**2 + s**2
    logits = torch.stack([-(x + M) ** 2, -(x - M) ** 2]) / (2 * var)
    w = torch.softmax(logits, dim=0)
    return (w * torch.stack([-M + S**2 / var * (x + M), M + S**2 / var * (x - M)])).sum(0)


def _edm_network(x_in, c_noise):
    """The raw F our EDM process calls as F(c_in x, c_noise), so that c_skip x + c_out F is the
    same D (Karras et al. 2022, Table 1: σ = e^{4 c_noise}, x = x_in √(σ² + σ_d²))."""
    sd = EDM.sigma_data
    sigma = jnp.exp(4.0 * c_noise).reshape(-1, *([1] * (x_in.ndim - 1)))
    x = x_in * jnp.sqrt(sigma**2 + sd**2)
    var = S**2 + sigma**2
    logits = jnp.stack([-(x + M) ** 2, -(x - M) ** 2]) / (2 * var)
    w = jax.nn.softmax(logits, axis=0)
    denoised = (w * jnp.stack([-M + S**2 / var * (x + M), M + S**2 / var * (x - M)])).sum(0)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
    return (denoised - c_skip * x) / c_out


def _x_T():
    return np.asarray(jax.random.normal(jax.random.key(0), SHAPE), np.float32) * EDM.sigma_max


def _k_run(method, sigmas, x_T, **churn):
    """k-diffusion's sampler: the final x and, per step i, (x entering the model, denoised)."""
    steps = []
    sampler = getattr(K_SAMPLING, f'sample_{method}')
    out = sampler(_torch_denoiser, torch.from_numpy(x_T.astype(np.float64)),
                  torch.from_numpy(np.asarray(sigmas, np.float64)), disable=True,
                  callback=lambda d: steps.append((d['x'].numpy(), d['denoised'].numpy())),
                  **churn)
    return out.numpy(), steps


def _our_steps(method, sigmas, x_T, keys, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf):
    """Our solver's step function, one step at a time: per step i (the state entering the
    network: after the churn, which process_solvers.churn computes inside heun's step; x̂_0),
    and the final state."""
    opts = process_solvers.ProcessOptions(method, len(sigmas) - 1)
    ctx = process_solvers.ProcessContext(
        EDM, _edm_network, jnp.asarray(sigmas, jnp.float32), opts,
        jnp.asarray([s_churn, s_tmin, s_tmax, 1.0], jnp.float32))
    spec = process_solvers.METHODS[method]
    step = jax.jit(lambda state, i, key: spec.step(ctx, state, i, key))
    churned = jax.jit(lambda x, i, key: process_solvers.churn(ctx, x, ctx.grid[i], key)[0])
    state, steps = spec.init(jnp.asarray(x_T)), []
    for i in range(opts.num_steps):
        x_in = np.asarray(churned(state['x'], i, keys[i]) if s_churn else state['x'])
        state, x0 = step(state, i, keys[i])
        steps.append((x_in, np.asarray(x0)))
    return np.asarray(state['x']), steps


def _max_rel(a, b):
    """max |a - b| over max |b|: the error at the state's own scale (σ_i for x_i)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _max_abs(a, b):
    """max |a - b|, for x̂_0 (data of scale |M| + S ≈ 1; near σ_max, x̂_0 ≈ E[x_0] ≈ 0)."""
    return float(np.max(np.abs(a - b)))


def test_edm_grid_is_k_diffusion_s_karras_sigmas():
    for k in (2, 10, 18):
        ours = EDM.time_grid(k)
        theirs = K_SAMPLING.get_sigmas_karras(k, EDM.sigma_min, EDM.sigma_max, EDM.rho,
                                              ).numpy().astype(np.float64)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)  # theirs: float32


# Float32 (ours) against float64 (k-diffusion): the states x_i to STEP_RTOL of their largest
# value, x̂_0 to X0_ATOL (data of scale 1). Measured: 4e-7 and 8e-7 at most.
STEP_RTOL = 1e-5
X0_ATOL = 1e-5


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_edm_solver_equals_k_diffusion_step_for_step(method):
    """Deterministic (S_churn = 0, Karras et al. Algorithm 1 / its Euler variant): every step's
    input state and x̂_0, and the final sample, equal k-diffusion's sample_euler / sample_heun
    on the same 10 Karras sigmas; the public sampler (process_solvers.sample with grid=) ends
    at the same sample."""
    sigmas = K_SAMPLING.get_sigmas_karras(10, EDM.sigma_min, EDM.sigma_max, EDM.rho).numpy()
    x_T = _x_T()
    final_k, steps_k = _k_run(method, sigmas, x_T)
    final, steps = _our_steps(method, sigmas, x_T, [jax.random.key(0)] * 10)
    assert len(steps) == len(steps_k) == 10
    for i, ((x, x0), (x_k, x0_k)) in enumerate(zip(steps, steps_k)):
        assert _max_rel(x, x_k) < STEP_RTOL, (i, _max_rel(x, x_k))
        assert _max_abs(x0, x0_k) < X0_ATOL, (i, _max_abs(x0, x0_k))
    assert _max_abs(final, final_k) < X0_ATOL
    sampled = process_solvers.sample(EDM, _edm_network, jax.random.key(1), SHAPE, method=method,
                                     num_steps=10, x_T=jnp.asarray(x_T),
                                     grid=np.asarray(sigmas, np.float64))['samples']
    assert _max_abs(np.asarray(sampled), final_k) < X0_ATOL
    assert np.std(final_k) > 0.3  # the two modes, not a collapsed sample


def test_edm_heun_churn_equals_k_diffusion_with_the_same_noise(monkeypatch):
    """Algorithm 2 with S_churn = 40 between S_tmin = 0.05 and S_tmax = 50 (some steps churn,
    some do not): with k-diffusion's torch.randn_like replaced by our per-step draws z_i, every
    step equals sample_heun's."""
    sigmas = K_SAMPLING.get_sigmas_karras(10, EDM.sigma_min, EDM.sigma_max, EDM.rho).numpy()
    x_T = _x_T()
    no_churn, _ = _k_run('heun', sigmas, x_T)
    keys = [jax.random.key(100 + i) for i in range(10)]
    # The z our heun step draws at step i (samplers.common.noise_like on its key).
    draws = iter([np.asarray(common.noise_like(k, jnp.asarray(x_T), 1), np.float64) for k in keys])
    monkeypatch.setattr(K_SAMPLING.torch, 'randn_like', lambda x: torch.from_numpy(next(draws)))
    churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    final_k, steps_k = _k_run('heun', sigmas, x_T, **churn)
    final, steps = _our_steps('heun', sigmas, x_T, keys, **churn)
    gammas = [min(40.0 / 10, math.sqrt(2) - 1) if 0.05 <= s <= 50 else 0 for s in sigmas[:-1]]
    assert 0 < sum(g > 0 for g in gammas) < 10  # churn on some steps only
    for i, ((x, x0), (x_k, x0_k)) in enumerate(zip(steps, steps_k)):
        assert _max_rel(x, x_k) < STEP_RTOL, (i, _max_rel(x, x_k))
        assert _max_abs(x0, x0_k) < X0_ATOL, (i, _max_abs(x0, x0_k))
    assert _max_abs(final, final_k) < X0_ATOL
    assert _max_abs(no_churn, final_k) > 1e-2  # the churn changed the sample
