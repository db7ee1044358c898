"""Cold diffusion (Bansal et al. 2022): degradations against independent implementations
(scipy's Gaussian filter, numpy block means, the mask formula pixel by pixel), the samplers'
exactness truths, the loss and the prior."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.tree_util import Partial
from scipy import ndimage

from diffusion_jax import cold, samplers

pytestmark = pytest.mark.usefixtures('fast_compiles')

H = W = 8
C = 2
T = 12
SHAPE = (4, H, W, C)


def make(degradation, **fields):
    cfg = ml_collections.ConfigDict(dict(process='cold', degradation=degradation,
                                         num_timesteps=fields.pop('num_timesteps', T), **fields))
    return cold.create_cold_diffusion(cfg, (H, W, C))


@pytest.fixture(scope='module')
def x0():
    return jax.random.uniform(jax.random.key(0), SHAPE, jnp.float32, -1.0, 1.0)


def levels(s):
    return jnp.full((SHAPE[0],), s, jnp.int32)


@pytest.mark.parametrize('degradation', cold.DEGRADATIONS)
def test_level_zero_is_the_identity(degradation, x0):
    d = make(degradation)
    np.testing.assert_allclose(d.degrade(x0, levels(0)), x0, atol=1e-6)


def scipy_blur(x, stds, padding):
    """len(stds) successive 11-tap Gaussian blurs (scipy: radius = int(truncate·σ + 0.5) = 5;
    'mirror' is PyTorch's 'reflect', 'wrap' its 'circular')."""
    mode = {'reflect': 'mirror', 'circular': 'wrap'}[padding]
    x = np.asarray(x, np.float64)
    for std in stds:
        for axis in (1, 2):
            x = ndimage.gaussian_filter1d(x, std, axis=axis, mode=mode, truncate=5.0 / std)
    return x


@pytest.mark.parametrize('padding', ['reflect', 'circular'])
def test_blur_is_the_papers_composed_schedule(padding, x0):
    """D(x_0, s) = s successive blurs with σ_i = 0.35 + i/100 (Bansal et al.'s CIFAR-10
    'Special_6_routine', 11x11); D(x_0, T) the spatial mean of the T-fold blur."""
    d = make('blur', blur_std_start=0.35, blur_std_step=0.01, blur_kernel_size=11,
             blur_padding=padding)
    stds = [0.35 + i / 100 for i in range(T)]
    for s in (1, 5, T - 1):
        np.testing.assert_allclose(d.degrade(x0, levels(s)), scipy_blur(x0, stds[:s], padding),
                                   atol=2e-6)
    end = scipy_blur(x0, stds, padding).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(d.degrade(x0, levels(T)), np.broadcast_to(end, SHAPE), atol=2e-6)
    # Mixed levels in one batch gather per example.
    mixed = d.degrade(x0, jnp.array([0, 1, 5, T]))
    for b, s in enumerate([0, 1, 5, T]):
        np.testing.assert_allclose(mixed[b], d.degrade(x0, levels(s))[b], atol=1e-6)


def test_blur_of_equal_gaussians_composes_to_the_summed_variance():
    """With a support wide against σ (21 taps, σ = 1.5: the σ√2 kernel is cut at 4.7σ, mass
    ~3e-6 beyond) and σ well above the pixel (the sampled Gaussian's aliasing is O(e^{-2π²σ²})),
    two circular blurs of σ compose to one of σ√2: Gaussian variances add."""
    n, size, std = 64, 21, 1.5
    k2 = cold.blur_matrix(n, size, std, 'circular') @ cold.blur_matrix(n, size, std, 'circular')
    one = cold.blur_matrix(n, size, std * math.sqrt(2.0), 'circular')
    np.testing.assert_allclose(k2, one, atol=3e-6)


def test_mask_is_the_growing_gaussian_hole(x0):
    std_step, initial = 0.1, 11
    d = make('mask', mask_std_step=std_step, mask_initial=initial)
    cy = cx = (H - 1) // 2
    for s in (3, T):
        expect = np.ones((H, W))
        for i in range(s):
            sigma = std_step * (i + initial)
            for y in range(H):
                for x in range(W):
                    r2 = (y - cy)**2 + (x - cx)**2
                    expect[y, x] *= 1.0 - math.exp(-r2 / (2 * sigma**2))
        out = np.asarray(d.degrade(x0, levels(s)))
        np.testing.assert_allclose(out, expect[None, :, :, None] * np.asarray(x0), atol=1e-6)
        assert np.all(out[:, cy, cx] == 0.0)  # the hole's centre is gone


def test_pixelate_halves_the_resolution_and_ends_at_the_mean(x0):
    d = make('pixelate', num_timesteps=3)  # L = log2(8) = 3 halvings, one per level
    x = np.asarray(x0, np.float64)
    for s in (1, 2, 3):
        b = 2**s
        blocks = x.reshape(SHAPE[0], H // b, b, W // b, b, C).mean(axis=(2, 4))
        expect = np.repeat(np.repeat(blocks, b, axis=1), b, axis=2)
        np.testing.assert_allclose(d.degrade(x0, levels(s)), expect, atol=1e-6)
    np.testing.assert_allclose(d.degrade(x0, levels(3)),
                               np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), SHAPE),
                               atol=1e-6)


def test_fade_goes_linearly_to_the_mean_colour(x0):
    d = make('fade')
    x = np.asarray(x0, np.float64)
    mean = x.mean(axis=(1, 2), keepdims=True)
    for s in (4, T):
        np.testing.assert_allclose(d.degrade(x0, levels(s)), (1 - s / T) * x + s / T * mean,
                                   atol=1e-6)


def _const(x0, x, t):  # pylint: disable=unused-argument
    return x0


def _wrong(x, t):
    """A deliberately wrong restoration: nothing like x_0."""
    return 0.3 * x + 0.01 * t.astype(x.dtype).reshape(-1, 1, 1, 1) + 0.2


@pytest.mark.parametrize('degradation', cold.DEGRADATIONS)
@pytest.mark.parametrize('method', ['cold', 'cold_naive'])
def test_exact_restoration_returns_x0(degradation, method, x0):
    d = make(degradation)
    x_T = d.degrade(x0, levels(T))
    out = samplers.cold_restore(d, Partial(_const, x0), x_T, method=method, clip_denoised=False)
    np.testing.assert_allclose(out, x0, atol=2e-5)


def additive(e):
    """D(x_0, s) = x_0 + s·e: the identity operators plus the offset o_s = s·e."""
    d = make('fade')
    eye = lambda n: jnp.broadcast_to(jnp.eye(n), (T + 1, n, n))  # noqa: E731
    return d.replace(rows=eye(H), cols=eye(W), mult=jnp.ones((T + 1, H, W)),
                     mean_weight=jnp.zeros(T + 1),
                     offset=jnp.arange(T + 1, dtype=jnp.float32)[:, None, None, None] * e)


def test_algorithm_2_is_exact_for_an_additive_degradation_whatever_r(x0):
    """Bansal et al.'s argument: x_s - D(R, s) + D(R, s-1) = x_0 + (s-1)e for any R, so
    Algorithm 2 returns x_0; Algorithm 1 returns R's last estimate."""
    e = 0.05 * jax.random.normal(jax.random.key(1), (H, W, C))
    d = additive(e)
    x_T = d.degrade(x0, levels(T))
    np.testing.assert_allclose(x_T, x0 + T * e, atol=1e-6)
    alg2 = samplers.cold_restore(d, Partial(_wrong), x_T, method='cold', clip_denoised=False)
    np.testing.assert_allclose(alg2, x0, atol=2e-5)
    alg1 = np.asarray(samplers.cold_restore(d, Partial(_wrong), x_T, method='cold_naive',
                                            clip_denoised=False))
    # Algorithm 1 ends with D(R(x_1, 1), 0) = R(x_1, 1), x_1 = D(R(x_2, 2), 1) = R(x_2, 2) + e.
    x = np.asarray(x_T)
    for s in range(T, 0, -1):
        r = 0.3 * x + 0.01 * (s - 1) + 0.2
        x = r + (s - 1) * np.asarray(e)
    np.testing.assert_allclose(alg1, x, atol=1e-5)
    assert np.mean(np.abs(alg1 - np.asarray(x0))) > 0.3


def test_l1_restoration_loss(x0):
    d = make('blur')
    t = jnp.array([0, 3, 7, T - 1])
    exact = d.training_losses(Partial(_const, x0), x0, t)['loss']
    np.testing.assert_allclose(exact, 0.0, atol=1e-7)
    # R = the identity: the loss is the mean |D(x_0, t+1) - x_0| per example.
    ident = d.training_losses(Partial(lambda x, tt: x), x0, t)['loss']
    expect = np.mean(np.abs(np.asarray(d.degrade(x0, t + 1)) - np.asarray(x0)), axis=(1, 2, 3))
    np.testing.assert_allclose(ident, expect, rtol=1e-6)
    # The process-interface form draws levels in [1, T] and computes the same loss.
    out = d.loss(Partial(lambda x, tt: x), x0, jax.random.key(4))
    assert np.all((np.asarray(out['t']) >= 1) & (np.asarray(out['t']) <= T))
    np.testing.assert_allclose(out['loss'], d.training_losses(Partial(lambda x, tt: x), x0,
                                                              out['t'] - 1)['loss'])


def test_prior_matches_the_degraded_channel_means():
    """The mixture fitted to D(x_0, T)'s colours reproduces their mean and covariance (Monte
    Carlo, 5 standard errors) and adds per-pixel noise of the stated std."""
    d = make('fade')
    rng = np.random.default_rng(0)
    n = 2000
    colours = np.where(rng.random((n, 1)) < 0.3, [-0.5, 0.2], [0.4, -0.1])
    colours = colours + 0.05 * rng.standard_normal((n, C))
    images = colours[:, None, None, :] + 0.1 * rng.standard_normal((n, H, W, C))
    prior = cold.fit_mean_prior(d, images, num_components=2, noise_std=0.002)
    target = np.asarray(images).mean(axis=(1, 2))
    m = 20000
    x = np.asarray(prior.sample(jax.random.key(3), (m, H, W, C)))
    sampled = x.mean(axis=(1, 2))
    se = target.std(axis=0) * math.sqrt(1 / n + 1 / m)
    assert np.all(np.abs(sampled.mean(0) - target.mean(0)) < 5 * se)
    np.testing.assert_allclose(np.cov(sampled.T), np.cov(target.T), rtol=0.1, atol=1e-3)
    resid = x - sampled[:, None, None, :]
    assert abs(resid.std() / 0.002 - 1) < 0.02
    with pytest.raises(ValueError, match="degradation='mask'"):
        cold.fit_mean_prior(make('mask'), images[:10])


def test_generate_starts_at_the_prior_and_restores(x0):
    d = make('blur')
    prior = cold.fit_mean_prior(d, np.asarray(x0), num_components=1)
    out = samplers.cold_generate(d, Partial(_const, x0), prior, jax.random.key(2), SHAPE,
                                 clip_denoised=False)
    # x_T is one colour per channel plus 0.002 noise; exact R restores x0 from any x_T with
    # Algorithm 2 only when x_T = D(x_0, T); from the prior's x_T the result is
    # x_T - D(x0, T) + x0 (the first step's correction is carried).
    expect = np.asarray(out['x_T']) - np.asarray(d.degrade(x0, levels(T))) + np.asarray(x0)
    np.testing.assert_allclose(out['samples'], expect, atol=2e-5)


@pytest.mark.parametrize('field,value,match', [
    ('degradation', 'snow', "diffusion.degradation='snow' is not one of blur"),
    ('blur_padding', 'zeros', "diffusion.blur_padding='zeros'"),
    ('blur_kernel_size', 4, 'diffusion.blur_kernel_size=4 must be odd'),
    ('num_timesteps', 0, 'diffusion.num_timesteps=0 must be >= 1'),
])
def test_bad_fields_raise_one_line(field, value, match):
    fields = {'degradation': 'blur', field: value}
    with pytest.raises(ValueError, match=match):
        make(fields.pop('degradation'), **fields)


def test_cold_methods_refuse_a_gaussian_diffusion_and_vice_versa(x0):
    from diffusion_jax import diffusion as dl, schedules  # pylint: disable=import-outside-toplevel
    g = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 100), 'eps', 'fixed_large')
    with pytest.raises(ValueError, match="diffusion.process='cold'"):
        samplers.sample(g, Partial(_wrong), jax.random.key(0), SHAPE, method='cold')
    with pytest.raises(ValueError, match="sampling.method='ddim' cannot run"):
        samplers.cold_restore(make('blur'), Partial(_wrong), x0, method='ddim')


# ----------------------------------------------------------------------------------------------
# The registry ('cold' is a process like the others) and the random-centre mask
# ----------------------------------------------------------------------------------------------
def test_cold_is_a_registered_process_built_at_the_derived_image_shape():
    from diffusion_jax import config_validation, processes  # pylint: disable=import-outside-toplevel
    from configs import digits_cold_mask  # pylint: disable=import-outside-toplevel
    assert 'cold' in processes.names() and 'cold' in processes.PROCESSES
    cfg = ml_collections.ConfigDict(dict(process='cold', degradation='mask', num_timesteps=T,
                                         mask_std_step=0.1, image_shape=(H, W, C)))
    got = processes.get_process(cfg)
    want = cold.create_cold_diffusion(cfg, (H, W, C))
    assert isinstance(got, cold.ColdDiffusion) and got.num_timesteps == T
    for field in ('rows', 'cols', 'mult', 'mean_weight', 'offset', 'mask_sigma'):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    # Without the shape the builder says where it comes from, in one line.
    del cfg['image_shape']
    with pytest.raises(ValueError, match=r"^diffusion.image_shape=None: diffusion.process='cold' "
                                         r'builds .*run.resolve_config'):
        processes.get_process(cfg)
    # run.resolve_config / config_validation.resolve derive it once from the data.
    resolved = config_validation.resolve(digits_cold_mask.get_config(), 'sample')
    assert tuple(resolved.diffusion.image_shape) == (8, 8, 1)
    assert processes.get_process(resolved.diffusion).mult.shape == (51, 8, 8)
    with pytest.raises(ValueError, match="diffusion.process='snow' is not a process; choose one "
                                         "of gaussian, flow, edm, cold."):
        processes.check_name('snow')


def _formula_mask(center, s, std_step, initial):
    """m_s at centre (row, col), written pixel by pixel from the formula."""
    out = np.ones((H, W))
    for i in range(s):
        sigma = std_step * (i + initial)
        for y in range(H):
            for x in range(W):
                r2 = (y - center[0])**2 + (x - center[1])**2
                out[y, x] *= 1.0 - math.exp(-r2 / (2 * sigma**2))
    return out


def test_random_centre_mask_is_the_formula_at_each_images_centre(x0):
    """degrade(x0, s, center) = m_s(c_b) ⊙ x0_b with m_s(p) = ∏_{i<s}(1 - exp(-|p - c_b|²/2σ_i²))
    at each image's own centre and level; the centred table is the special case."""
    std_step, initial = 0.1, 11
    d = make('mask', mask_std_step=std_step, mask_initial=initial, mask_center='random')
    centers = np.array([[0, 0], [7, 2], [3, 3], [5, 7]])
    s = np.array([1, 4, 7, T])
    out = np.asarray(d.degrade(x0, jnp.asarray(s), jnp.asarray(centers)))
    for b in range(SHAPE[0]):
        expect = _formula_mask(centers[b], s[b], std_step, initial)
        np.testing.assert_allclose(out[b], expect[:, :, None] * np.asarray(x0[b]), atol=1e-6)
        assert np.all(out[b, centers[b][0], centers[b][1]] == 0.0)
    middle = np.full((SHAPE[0], 2), (H - 1) // 2)
    np.testing.assert_allclose(d.degrade(x0, jnp.asarray(s), jnp.asarray(middle)),
                               d.degrade(x0, jnp.asarray(s)), atol=1e-6)


def test_random_centre_loss_draws_the_centres_from_the_training_key(x0):
    """The L1 loss of mask_center='random' is the loss at centres c = (randint(k_y), randint(k_x))
    over [0, H) x [0, W), (k_y, k_x) = split(k_c), k_c the second half of split(key) (the first
    draws the levels as before); the centres cover the image uniformly."""
    d = make('mask', mask_std_step=0.1, mask_initial=11, mask_center='random')
    ident = Partial(lambda x, tt: x)  # R = the identity: the loss is mean |D(x_0, s) - x_0|
    key = jax.random.key(7)
    out = d.loss(ident, x0, key)
    k_levels, k_center = jax.random.split(key)
    k_y, k_x = jax.random.split(k_center)
    c = np.stack([np.asarray(jax.random.randint(k_y, (SHAPE[0],), 0, H)),
                  np.asarray(jax.random.randint(k_x, (SHAPE[0],), 0, W))], axis=1)
    t = np.asarray(jax.random.randint(k_levels, (SHAPE[0],), 1, T + 1))
    np.testing.assert_array_equal(out['t'], t)
    expect = [np.mean(np.abs((_formula_mask(c[b], t[b], 0.1, 11)[:, :, None] - 1.0)
                             * np.asarray(x0[b]))) for b in range(SHAPE[0])]
    np.testing.assert_allclose(out['loss'], expect, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_center='random' draws the mask centres"):
        d.training_losses(ident, x0, jnp.zeros((SHAPE[0],), jnp.int32))
    # Uniform over the 64 pixels: counts of 64·400 draws within 5 binomial standard errors.
    n = 64 * 400
    cs = np.asarray(d.draw_center(jax.random.key(1), n))
    counts = np.bincount(cs[:, 0] * W + cs[:, 1], minlength=H * W)
    p = 1.0 / (H * W)
    assert counts.shape == (H * W,)
    assert np.all(np.abs(counts - n * p) < 5 * math.sqrt(n * p * (1 - p)))


@pytest.mark.parametrize('degradation,center,match', [
    ('mask', 'corner', "diffusion.mask_center='corner' is not one of center, random."),
    ('blur', 'random', "diffusion.mask_center='random' applies to diffusion.degradation='mask'"),
])
def test_bad_mask_centre_is_one_line(degradation, center, match):
    with pytest.raises(ValueError, match=match):
        make(degradation, mask_center=center)
