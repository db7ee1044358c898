"""Tests of diffusion_jax.models: parameter counts, shapes, conditioning, dropout, precision, the
classifier gradient and config validation.

Cost control for a 2-core CPU: the big models are only traced (jax.eval_shape); the option
grid is traced too; the few compiled functions are tiny (8x8 images, width 32) and compiled once
per module without XLA's optimisation passes, which dominate compile time at this size.
"""
import functools
import itertools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import models
from diffusion_jax.models import layers

try:
    from configs import model_configs
except ImportError:  # configs/ is not a package on sys.path under plain `pytest`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import model_configs

FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
B = 2


def fast_jit(fn, *args):
    """Lower and compile fn for args without XLA's optimisation passes."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def perturbed(variables, scale=0.1, seed=0):
    """Adds Gaussian noise to every parameter, so zero-initialised layers carry signal too."""
    rng = np.random.default_rng(seed)  # numpy: an eager jax op per leaf would compile per shape
    return jax.tree.map(
        lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32), variables)


def tiny_config(**overrides):
    base = dict(in_channels=3, out_channels=6, num_classes=3, dropout=0.5, num_heads=2,
                use_scale_shift_norm=True, resblock_updown=True)
    base.update(overrides)
    return model_configs.tiny_unet(image_size=8, **base)


@pytest.fixture(scope='module')
def tiny():
    """A tiny class-conditional UNet, its perturbed params, inputs and compiled forward passes."""
    model = models.get_model(tiny_config())
    fresh = models.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 3))
    t = jnp.array([10, 500], jnp.int32)
    y = jnp.array([0, 2], jnp.int32)
    key = jax.random.key(2)

    def forward(params, x, t, y, key, train):
        return model.apply(params, x, t, y, train=train, rngs={'dropout': key})

    return dict(
        model=model, fresh=fresh, params=perturbed(fresh), x=x, t=t, y=y, key=key,
        eval=fast_jit(functools.partial(forward, train=False), fresh, x, t, y, key),
        train=fast_jit(functools.partial(forward, train=True), fresh, x, t, y, key))


# --- parameter counts of the papers' models (traced only) -------------------------------------

@pytest.mark.parametrize('factory, expected', [
    (model_configs.ddpm_cifar10, 35_746_307),  # Ho et al. 2020: 35.7M
    (model_configs.improved_ddpm_cifar10, 52_546_438),  # improved-diffusion UNetModel, CIFAR-10
])
def test_paper_parameter_counts(factory, expected):
    shapes = models.param_shapes(models.get_model(factory()))
    assert models.count_params(shapes) == expected
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_count_params_of_real_params_matches_shapes(tiny):
    assert models.count_params(tiny['fresh']) == models.count_params(
        models.param_shapes(tiny['model']))


# --- shapes over the option grid (traced only) --------------------------------------------------

_GRID = list(itertools.product([False, True], [False, True], [0, 3], ['heads', 'head_channels']))


@pytest.mark.parametrize('scale_shift, updown, num_classes, heads', _GRID)
def test_unet_output_shape_for_every_option(scale_shift, updown, num_classes, heads):
    # Every combination of the options that change the parameter tree. Those that do not
    # (rescale_skip, timestep_embedding, dtype) are XORs of the grid bits: each of their 8
    # combinations occurs twice, and each value occurs with both values of every grid option.
    index = _GRID.index((scale_shift, updown, num_classes, heads))
    ss, ud, nc, hd = (int(bit) for bit in f'{index:04b}')
    cfg = tiny_config(
        in_channels=2, out_channels=4, num_classes=num_classes, use_scale_shift_norm=scale_shift,
        resblock_updown=updown, num_heads=2 if heads == 'heads' else 0,
        num_head_channels=16 if heads == 'head_channels' else 0,
        rescale_skip=bool(ss ^ ud ^ nc ^ hd),
        timestep_embedding=('ddpm', 'improved')[nc ^ hd],
        dtype=('float32', 'bfloat16')[ud ^ nc])
    model = models.get_model(cfg)
    x = jax.ShapeDtypeStruct((3, 8, 8, 2), jnp.float32)
    t = jax.ShapeDtypeStruct((3,), jnp.int32)
    y = jax.ShapeDtypeStruct((3,), jnp.int32) if num_classes else None
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t, y)
    assert out.shape == (3, 8, 8, 4) and out.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert ('label_emb' in variables['params']) == bool(num_classes)


@pytest.mark.parametrize('pool, updown', [('attention', False), ('attention', True),
                                          ('spatial', False), ('spatial', True)])
def test_classifier_output_shape(pool, updown):
    cfg = model_configs.adm_classifier(
        16, num_classes=5, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8, 4),
        num_head_channels=32, pool=pool, resblock_updown=updown)
    model = models.get_model(cfg)
    x = jax.ShapeDtypeStruct((3, 16, 16, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((3,), jnp.int32)
    logits, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32


@pytest.mark.parametrize('out_dim, data_dim', [(0, 2), (4, 2), (3, 3)])
def test_mlp_output_shape(out_dim, data_dim):
    model = models.get_model(model_configs.swissroll_mlp(out_dim=out_dim, data_dim=data_dim))
    x = jax.ShapeDtypeStruct((7, data_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((7,), jnp.int32)
    out, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
    assert out.shape == (7, out_dim or data_dim)


# --- behaviour of the compiled tiny UNet --------------------------------------------------------

def test_fresh_model_predicts_zero(tiny):
    out = tiny['eval'](tiny['fresh'], tiny['x'], tiny['t'], tiny['y'], tiny['key'])
    assert out.shape == (B, 8, 8, 6) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_output_depends_on_t_and_y(tiny):
    run = functools.partial(tiny['eval'], tiny['params'], tiny['x'])
    base = run(tiny['t'], tiny['y'], tiny['key'])
    other_t = run(tiny['t'] + 100, tiny['y'], tiny['key'])
    other_y = run(tiny['t'], (tiny['y'] + 1) % 3, tiny['key'])
    assert np.all(np.isfinite(base)) and np.abs(base).mean() > 1e-3
    for other in (other_t, other_y):  # every example changes, not only on average
        assert np.all(np.abs(other - base).mean(axis=(1, 2, 3)) > 1e-3 * np.abs(base).mean())


def test_dropout_only_in_training(tiny):
    args = (tiny['params'], tiny['x'], tiny['t'], tiny['y'])
    key_a, key_b = jax.random.split(tiny['key'])
    np.testing.assert_array_equal(tiny['eval'](*args, key_a), tiny['eval'](*args, key_b))
    train_a, train_b = tiny['train'](*args, key_a), tiny['train'](*args, key_b)
    np.testing.assert_array_equal(train_a, tiny['train'](*args, key_a))
    assert np.abs(train_a - train_b).mean() > 1e-3 * np.abs(train_a).mean()
    assert np.abs(train_a - tiny['eval'](*args, key_a)).mean() > 0


def test_bfloat16_forward_close_to_float32(tiny):
    model16 = models.get_model(tiny_config(dtype='bfloat16'))
    args = (tiny['params'], tiny['x'], tiny['t'], tiny['y'])
    out16 = fast_jit(model16.apply, *args)(*args)
    out32 = tiny['eval'](*args, tiny['key'])
    assert out16.dtype == jnp.float32
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 0.03, rel


# --- conditioning semantics, timestep embedding, MLP --------------------------------------------

def test_null_label_and_label_rows():
    model = models.get_model(model_configs.swissroll_mlp(num_classes=3))
    variables = perturbed(models.init_params(model, jax.random.key(0)))
    assert variables['params']['label_emb']['embedding'].shape == (4, 128)  # 3 classes + null
    x, t = jnp.ones((2, 2)), jnp.array([3, 700])
    null = fast_jit(model.apply, variables, x, t)(variables, x, t)  # y=None: the null label
    with_label = fast_jit(model.apply, variables, x, t, t)
    np.testing.assert_allclose(null, with_label(variables, x, t, jnp.array([3, 3])), atol=1e-6)
    assert np.abs(null - with_label(variables, x, t, jnp.array([0, 1]))).min() > 1e-4


def test_label_to_unconditional_model_raises():
    model = models.get_model(model_configs.tiny_unet(8))
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    with pytest.raises(ValueError, match='num_classes'):
        jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize('kind', ['ddpm', 'improved'])
def test_timestep_embedding_formula(kind):
    t = np.array([0, 1, 37, 999])
    dim, half = 10, 5
    if kind == 'ddpm':  # Ho et al.: sin then cos, frequencies exp(-ln(1e4) i/(half-1))
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
        expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], 1)
    else:  # improved DDPM: cos then sin, frequencies exp(-ln(1e4) i/half)
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
        expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1)
    got = layers.timestep_embedding(jnp.asarray(t, jnp.int32), dim, kind)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert layers.timestep_embedding(jnp.asarray(t), 11, kind).shape == (4, 11)


def test_mlp_fresh_zero_and_learns_swiss_roll_noise():
    """150 Adam steps of eps-regression on a swiss roll cut the loss from ~1 to below 0.5."""
    model = models.get_model(model_configs.swissroll_mlp())
    variables = models.init_params(model, jax.random.key(0))
    angle = np.random.default_rng(0).uniform(1.5 * np.pi, 4.5 * np.pi, 256)
    x0 = jnp.asarray(np.stack([angle * np.cos(angle), angle * np.sin(angle)], 1) / 10, jnp.float32)
    alphas_cumprod = jnp.cumprod(1 - jnp.linspace(1e-4, 0.02, 1000))
    opt = optax.adam(1e-3)

    def loss_fn(params, key):
        kt, ke = jax.random.split(key)
        t = jax.random.randint(kt, (x0.shape[0],), 0, 1000)
        eps = jax.random.normal(ke, x0.shape)
        a = alphas_cumprod[t][:, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        return jnp.mean((model.apply(params, x_t, t) - eps) ** 2)

    def step(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    x, t = x0[:3], jnp.arange(3)
    np.testing.assert_array_equal(fast_jit(model.apply, variables, x, t)(variables, x, t), 0.0)
    carry, keys = (variables, opt.init(variables)), jax.random.split(jax.random.key(1), 150)
    train = fast_jit(lambda c, k: jax.lax.scan(step, c, k), carry, keys)
    _, losses = train(carry, keys)
    assert losses[:10].mean() > 0.9 and losses[-30:].mean() < 0.5, (losses[:10], losses[-30:])


# --- the noisy-image classifier -----------------------------------------------------------------

def test_classifier_log_prob_grad_matches_finite_difference():
    cfg = model_configs.adm_classifier(8, num_classes=4, ch=32, ch_mult=(1, 2),
                                       attn_resolutions=(4,), num_head_channels=32)
    model = models.get_model(cfg)
    params = perturbed(models.init_params(model, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 3))
    t = jnp.array([5, 300], jnp.int32)
    y = jnp.array([1, 3], jnp.int32)
    fn = fast_jit(functools.partial(models.classifier_log_prob_grad, model), params, x, t, y)

    log_p, grad = fn(params, x, t, y)
    assert log_p.shape == (B,) and grad.shape == x.shape
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    # log p(y|x) normalises over the classes.
    probs = sum(np.exp(fn(params, x, t, jnp.full((B,), k))[0]) for k in range(4))
    np.testing.assert_allclose(probs, 1.0, rtol=1e-5)
    # Central difference of Σ_b log p(y_b | x_b) along a random unit direction.
    v = jax.random.normal(jax.random.key(3), x.shape)
    v = v / jnp.linalg.norm(v)
    eps = 1e-2
    log_p_plus, log_p_minus = fn(params, x + eps * v, t, y)[0], fn(params, x - eps * v, t, y)[0]
    fd = (log_p_plus.sum() - log_p_minus.sum()) / (2 * eps)
    analytic = jnp.vdot(grad, v)
    np.testing.assert_allclose(fd, analytic, rtol=0.05, atol=1e-4)


# --- invalid configs ----------------------------------------------------------------------------

@pytest.mark.parametrize('factory, overrides, field', [
    (model_configs.ddpm_cifar10, dict(image_size=36), 'image_size'),
    (model_configs.ddpm_cifar10, dict(ch=48), 'ch'),
    (model_configs.ddpm_cifar10, dict(name='resnet'), 'name'),
    (model_configs.ddpm_cifar10, dict(num_heads=2, num_head_channels=64), 'num_heads'),
    (model_configs.ddpm_cifar10, dict(num_heads=0), 'num_heads'),
    (model_configs.ddpm_cifar10, dict(attn_resolutions=(12,)), 'attn_resolutions'),
    (model_configs.ddpm_cifar10, dict(dtype='float16'), 'dtype'),
    (model_configs.ddpm_cifar10, dict(timestep_embedding='fourier'), 'timestep_embedding'),
    (model_configs.ddpm_cifar10, dict(dropout=1.0), 'dropout'),
    (model_configs.improved_ddpm_cifar10, dict(num_heads=3), 'num_heads'),
    (functools.partial(model_configs.adm_classifier, 32), dict(pool='max'), 'pool'),
    (model_configs.swissroll_mlp, dict(data_dim=0), 'data_dim'),
])
def test_invalid_config_raises_naming_the_field(factory, overrides, field):
    cfg = factory()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=f'model_config.{field}'):
        models.get_model(cfg)


def test_unknown_field_raises():
    cfg = model_configs.ddpm_cifar10()
    cfg.num_res_block = 2  # a typo must not be silently ignored
    with pytest.raises(ValueError, match='num_res_block'):
        models.get_model(cfg)


# --- options for the published checkpoints; the attention kernel ------------------------------

@pytest.mark.parametrize('requested, dtype, head_dim, platform, expected', [
    ('auto', jnp.bfloat16, 64, 'gpu', 'cudnn'),
    ('auto', jnp.float16, 128, 'gpu', 'cudnn'),
    ('auto', jnp.float32, 64, 'gpu', 'xla'),  # cuDNN's fused kernel takes fp16/bf16 only
    ('auto', jnp.bfloat16, 60, 'gpu', 'xla'),  # head dim not a multiple of 8
    ('auto', jnp.bfloat16, 256, 'gpu', 'xla'),  # above 128
    ('auto', jnp.bfloat16, 64, 'cpu', 'xla'),
    ('auto', jnp.bfloat16, 64, 'tpu', 'xla'),
    ('xla', jnp.bfloat16, 64, 'gpu', 'xla'),
    ('cudnn', jnp.bfloat16, 64, 'gpu', 'cudnn'),
])
def test_attention_implementation_selection(requested, dtype, head_dim, platform, expected):
    assert layers.select_attention_implementation(requested, dtype, head_dim,
                                                  platform) == expected


@pytest.mark.parametrize('dtype, head_dim, platform, reason', [
    (jnp.float32, 64, 'gpu', 'float32'), (jnp.bfloat16, 64, 'cpu', "'cpu'"),
    (jnp.bfloat16, 12, 'gpu', 'head dimension 12')])
def test_cudnn_where_it_cannot_run_is_an_error(dtype, head_dim, platform, reason):
    with pytest.raises(ValueError, match=f"model_config.attention_implementation='cudnn'.*{reason}"):
        layers.select_attention_implementation('cudnn', dtype, head_dim, platform)


def test_default_fields_keep_todays_networks():
    """The new fields' defaults are today's network: same parameter tree, same outputs."""
    cfg = model_configs.ddpm_cifar10()
    assert (cfg.norm_epsilon, cfg.downsample_padding, cfg.timestep_scale, cfg.qkv_order,
            cfg.num_heads_upsample) == (1e-6, 'symmetric', 1.0, 'new', 0)
    for name in ('norm_epsilon', 'downsample_padding', 'timestep_scale', 'qkv_order',
                 'num_heads_upsample', 'attention_implementation'):
        del cfg[name]
    assert models.count_params(models.param_shapes(models.get_model(cfg))) == 35_746_307


def test_reference_options_change_the_function(tiny):
    """GroupNorm ε and the stride-2 padding are live (timestep_scale and qkv_order are shown
    live by tests/test_convert.py's equality with reference networks that need them)."""
    args = (tiny['params'], tiny['x'], tiny['t'], tiny['y'])
    base = tiny['eval'](*args, tiny['key'])
    other = models.get_model(tiny_config(norm_epsilon=1e-1))
    out = fast_jit(other.apply, *args)(*args)
    assert np.abs(out - base).mean() > 1e-3 * np.abs(base).mean()
    # The padding of the strided convs (tiny's resblock_updown has none).
    strided = [models.get_model(tiny_config(resblock_updown=False, downsample_padding=p))
               for p in ('symmetric', 'same')]
    params = perturbed(models.init_params(strided[0], jax.random.key(0)))
    args = (params, *args[1:])
    outs = [fast_jit(m.apply, *args)(*args) for m in strided]
    assert np.abs(outs[1] - outs[0]).mean() > 1e-3 * np.abs(outs[0]).mean()


@pytest.mark.parametrize('overrides, field', [
    (dict(downsample_padding='valid'), 'downsample_padding'),
    (dict(qkv_order='heads_first'), 'qkv_order'),
    (dict(attention_implementation='flash'), 'attention_implementation'),
    (dict(norm_epsilon=0.0), 'norm_epsilon'),
    (dict(timestep_scale=-1.0), 'timestep_scale'),
    (dict(num_heads_upsample=3), 'num_heads_upsample'),
])
def test_invalid_reference_option_raises_naming_the_field(overrides, field):
    cfg = model_configs.improved_ddpm_cifar10()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=f'model_config.{field}'):
        models.get_model(cfg)


# --- the CPU-profiled implementations (issue #14): same function as the reference formulas -------

class _FlaxGroupNorm(layers.GroupNorm):
    """layers.GroupNorm before issue #14 (flax's nn.GroupNorm, then h·(1 + scale) + shift)."""

    @nn.compact
    def __call__(self, x, scale=None, shift=None):
        h = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, dtype=jnp.float32,
                         param_dtype=jnp.float32, name='norm')(x.astype(jnp.float32))
        if scale is not None:
            h = h * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
        return h.astype(self.dtype)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize('shape, adaptive', [((2, 4, 4, 64), False), ((2, 4, 4, 64), True),
                                             ((3, 2, 6, 32), True), ((2, 5, 64), False)])
def test_group_norm_matches_flax_forward_and_grad(shape, adaptive):
    """Values and gradients (x, scale/bias, adaptive scale/shift) of layers.GroupNorm equal
    those of flax's nn.GroupNorm formula, parameter tree included."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 * rng.standard_normal(shape) + 1.5, jnp.float32)
    c = shape[-1]
    ss = [jnp.asarray(0.3 * rng.standard_normal((shape[0],) + (1,) * (len(shape) - 2) + (c,)),
                      jnp.float32) for _ in range(2)] if adaptive else [None, None]
    new, old = layers.GroupNorm(16, epsilon=1e-5), _FlaxGroupNorm(16, epsilon=1e-5)
    v_new, v_old = new.init(jax.random.key(0), x), old.init(jax.random.key(0), x)
    assert jax.tree.structure(v_new) == jax.tree.structure(v_old)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_new), jax.tree.leaves(v_old)))
    v = perturbed(v_new, 0.5)
    probe = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(module, v, x, s, t):
        return jnp.sum(jnp.tanh(module.apply(v, x, s, t)) * probe)

    assert _rel(new.apply(v, x, *ss), old.apply(v, x, *ss)) < 1e-5
    argnums = (1, 2, 3, 4) if adaptive else (1, 2)
    g_new = jax.grad(loss, argnums)(new, v, x, *ss)
    g_old = jax.grad(loss, argnums)(old, v, x, *ss)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        assert _rel(a, b) < 1e-5


def test_group_norm_bfloat16_output_dtype_and_channel_check():
    x = jnp.ones((1, 2, 2, 64), jnp.bfloat16)
    module = layers.GroupNorm(32, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert module.apply(variables, x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match='not divisible'):
        layers.GroupNorm(32).init(jax.random.key(0), jnp.ones((1, 2, 2, 48)))


def _upsample_then_conv_reference(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('shape, out_ch', [((2, 4, 4, 8), 8), ((1, 3, 5, 4), 6)])
def test_upsample_conv3x3_matches_upsample_then_conv(shape, out_ch):
    """The folded conv equals nearest x2 + 3x3 conv: values, reverse-mode gradients in x and
    the kernel, forward-mode (jvp) tangents."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out_ch)), jnp.float32)
    out = layers.upsample_conv3x3(x, kernel)
    ref = _upsample_then_conv_reference(x, kernel)
    assert out.shape == ref.shape == (shape[0], 2 * shape[1], 2 * shape[2], out_ch)
    assert _rel(out, ref) < 1e-5
    probe = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    grads = [jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k)) * probe), (0, 1))(x, kernel)
             for f in (layers.upsample_conv3x3, _upsample_then_conv_reference)]
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-5
    tangents = (jnp.asarray(rng.standard_normal(shape), jnp.float32),
                jnp.asarray(rng.standard_normal(kernel.shape), jnp.float32))
    for args, tans in [((x, kernel), tangents), ((x,), tangents[:1])]:
        jvps = [jax.jvp(lambda *a, f=f: f(*a, *(() if len(a) == 2 else (kernel,))), args, tans)[1]
                for f in (layers.upsample_conv3x3, _upsample_then_conv_reference)]
        assert _rel(*jvps) < 1e-5


def test_upsample_module_keeps_its_parameters_and_function():
    """layers.Upsample: the parameter tree and initial values of the plain nn.Conv named 'conv',
    and the output of conv3x3(upsample_nearest(x)) + bias; other conv settings are refused."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))

    class Plain(layers.Upsample):
        @nn.compact
        def __call__(self, x):
            return layers.conv3x3(x.shape[-1], self.dtype, 'conv')(layers.upsample_nearest(x))

    v_new = layers.Upsample().init(jax.random.key(0), x)
    v_old = Plain().init(jax.random.key(0), x)
    assert jax.tree.structure(v_new) == jax.tree.structure(v_old)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_new), jax.tree.leaves(v_old)))
    v = perturbed(v_new, 0.5)
    assert _rel(layers.Upsample().apply(v, x), Plain().apply(v, x)) < 1e-5
    kernel = jnp.ones((3, 3, 16, 16))
    with pytest.raises(ValueError, match='stride-1 3x3'):
        layers.upsample_then_conv(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                  dimension_numbers=jax.lax.conv_dimension_numbers(
                                      x.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC')))
