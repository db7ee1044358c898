"""Editing (samplers.edit) driven by the exact ε of Gaussian data N(μ, Σ), whose conditionals and
posterior means are closed forms: RePaint's conditioning, SDEdit's output mean and its limit
at strength -> 0, DDIM edits' shift-equivariance, masks and bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import respace, samplers, schedules

pytestmark = pytest.mark.usefixtures('fast_compiles')

T = 1000
BASE = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', T), 'eps', 'fixed_small')
AB = jnp.asarray(BASE.alphas_cumprod, jnp.float32)
_A = np.array([[1, 0.8, 0.5, 0.2], [0, 0.6, 0.3, 0.4], [0, 0, 0.5, 0.1], [0, 0, 0, 0.3]])
SIGMA = 0.3 * _A.T @ _A  # a correlated 4-d covariance
MU = np.array([0.2, -0.3, 0.1, 0.4])
D = 4


def gaussian_eps(mu, sigma, x, t):
    """The exact ε of N(μ, Σ) data: x̂_0 = μ + √ᾱ Σ (ᾱΣ + (1-ᾱ)I)^{-1} (x_t - √ᾱ μ),
    ε = (x_t - √ᾱ x̂_0)/√(1-ᾱ). mu [B, D] or [D]; x [B, D]; t [B] original timesteps."""
    a = AB[t][:, None]
    mu = jnp.broadcast_to(mu, x.shape)
    m = a[:, :, None] * sigma + (1 - a)[:, :, None] * jnp.eye(D)
    x0 = mu + jnp.sqrt(a) * jnp.einsum('ij,bj->bi', sigma, jnp.linalg.solve(
        m, (x - jnp.sqrt(a) * mu)[..., None])[..., 0])
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)


MODEL = Partial(gaussian_eps, jnp.asarray(MU, jnp.float32), jnp.asarray(SIGMA, jnp.float32))


def spaced(spec):
    return BASE.respace(respace.space_timesteps(T, spec))


def conditional(known_idx, unknown_idx, x_known):
    """Mean and covariance of x_u | x_k = x_known under N(μ, Σ)."""
    s_ku = SIGMA[np.ix_(unknown_idx, known_idx)]
    s_kk = SIGMA[np.ix_(known_idx, known_idx)]
    mean = MU[unknown_idx] + s_ku @ np.linalg.solve(s_kk, x_known - MU[known_idx])
    cov = SIGMA[np.ix_(unknown_idx, unknown_idx)] - s_ku @ np.linalg.solve(s_kk, s_ku.T)
    return mean, cov


# ----------------------------------------------------------------------------------------------
# RePaint
# ----------------------------------------------------------------------------------------------
def test_repaint_schedule_jumps_back_and_ends_at_the_data():
    plain = samplers.repaint_schedule(10, 1, 1)
    np.testing.assert_array_equal(plain, np.arange(9, -2, -1))
    path = samplers.repaint_schedule(10, 2, 3)
    assert path[0] == 9 and path[-1] == -1 and np.all(np.abs(np.diff(path)) == 1)
    # Each level 0, 2, 4, 6 (< K - j) is left upwards jump_n_sample - 1 = 2 times.
    ups = [int(a) for a, b in zip(path[:-1], path[1:]) if b > a]
    for level in (0, 2, 4, 6):
        assert sum(1 for i, a in enumerate(path[:-1])
                   if a == level and path[i + 1] > a) == 2, level
    assert 8 not in ups
    # Reverse (network) steps: K + (r - 1)·j·⌊(K - 1)/j⌋ = 10 + 2·2·4.
    assert int(np.sum(np.diff(path) < 0)) == 10 + 2 * 2 * 4


@pytest.fixture(scope='module')
def repainted():
    """RePaint of 4096 copies of one point, coordinates 0, 1 known, 2, 3 generated: the plain
    chain (j = r = 1) and with resampling (j = 1, r = 20), K = 100."""
    n, x_known = 4096, np.array([0.5, -0.2, 0.0, 0.0], np.float32)
    x0 = jnp.tile(jnp.asarray(x_known), (n, 1))
    mask = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
    d = spaced('100')
    run = lambda j, r: np.asarray(samplers.repaint(  # noqa: E731
        d, MODEL, jax.random.key(0), x0, mask, jump_length=j, jump_n_sample=r,
        clip_denoised=False))
    return x_known, run(1, 1), run(1, 20)


def test_repaint_keeps_the_known_pixels_exactly(repainted):
    x_known, plain, resampled = repainted
    for out in (plain, resampled):
        assert np.array_equal(out[:, :2], np.broadcast_to(x_known[:2], out[:, :2].shape))


def test_repaint_resampling_conditions_the_unknown_coordinates(repainted):
    """With the exact denoiser, RePaint with resampling draws x_u with the conditional mean
    E[x_u | x_k] (to 5 standard errors of the 4096-sample mean); the plain chain with pasting
    does not condition coordinate 3 (whose conditional shift, -0.033, is a cancellation of two
    correlations): the paper's reason for resampling. (RePaint is not an exact conditional
    sampler: its spread is below the conditional's, so only the mean is asserted.)"""
    x_known, plain, resampled = repainted
    mean, _ = conditional([0, 1], [2, 3], x_known[:2].astype(np.float64))
    se = resampled[:, 2:].std(axis=0) / math.sqrt(len(resampled))
    assert np.all(np.abs(resampled[:, 2:].mean(axis=0) - mean) < 5 * se)
    se_plain = plain[:, 2:].std(axis=0) / math.sqrt(len(plain))
    assert abs(plain[:, 3].mean() - mean[1]) > 8 * se_plain[1]


def test_repaint_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match=r'edit.mask of shape \(3,\) does not fit'):
        samplers.repaint(spaced('10'), MODEL, jax.random.key(0), jnp.zeros((8, D)),
                         jnp.ones((3,)))


# ----------------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def sdedit_input():
    return jnp.tile(jnp.asarray([[0.9, -0.8, 0.7, -0.6]], jnp.float32), (2048, 1))


def test_sdedit_output_mean_is_the_posterior_mean_of_the_noised_input(sdedit_input):
    """x_{t0} ~ q(x_{t0} | x_in) and the 1000-step ancestral chain samples p(x_0 | x_{t0}), so
    E[out] = μ + √ᾱ Σ (ᾱΣ + (1-ᾱ)I)^{-1} (√ᾱ x_in - √ᾱ μ) at ᾱ = ᾱ_{t0}, t0 = 499."""
    strength = 0.5
    out = np.asarray(samplers.sdedit(BASE, MODEL, jax.random.key(1), sdedit_input, strength,
                                     clip_denoised=False))
    t0 = samplers.sdedit_start(T, strength)
    assert t0 == 499
    a = float(BASE.alphas_cumprod[t0])
    x_in = np.asarray(sdedit_input[0], np.float64)
    expect = MU + a * SIGMA @ np.linalg.solve(a * SIGMA + (1 - a) * np.eye(D), x_in - MU)
    se = out.std(axis=0) / math.sqrt(len(out))
    assert np.all(np.abs(out.mean(axis=0) - expect) < 5 * se + 2e-3)
    # And it is an edit: far from both the input and the data mean.
    assert np.all(np.abs(out.mean(axis=0) - x_in) > 0.1)


def test_sdedit_at_the_smallest_strength_returns_the_input(sdedit_input):
    """strength = 1/K starts at ᾱ_0 = 1 - β_0: one step of noise √β_0 = 0.01 and its exact
    removal, so the output is the input to O(√β_0); larger strengths move it further."""
    x_in = np.asarray(sdedit_input)
    rms = lambda s: float(np.sqrt(np.mean(np.square(np.asarray(  # noqa: E731
        samplers.sdedit(BASE, MODEL, jax.random.key(2), sdedit_input, s,
                        clip_denoised=False)) - x_in))))
    smallest = rms(1.0 / T)
    assert samplers.sdedit_start(T, 1.0 / T) == 0
    assert smallest < math.sqrt(float(BASE.betas[0]))
    assert rms(0.05) > 3 * smallest


@pytest.mark.parametrize('strength', [0.0, 1.5, -0.2])
def test_sdedit_strength_outside_the_unit_interval(strength):
    with pytest.raises(ValueError, match=f'edit.strength={strength} must be in'):
        samplers.sdedit_start(100, strength)


# ----------------------------------------------------------------------------------------------
# DDIM edits
# ----------------------------------------------------------------------------------------------
SHIFT = np.array([-0.8, 0.6, -0.5, 0.4])  # μ_1 - μ_0 of a second class


def test_ddim_edit_to_another_class_is_the_shifted_decode():
    """With one Σ for both classes the DDIM ODE and each Euler step are equivariant under
    (x, μ) -> (x + √ᾱ Δ, μ + Δ): decoding the code with class 1 equals decoding code - √ᾱ_{K-1} Δ
    with class 0, plus Δ. With no change the edit is the reconstruction, whose error is the
    inversion's (reported per example)."""
    d = spaced('ddim50')
    rng = np.random.default_rng(0)
    x_in = jnp.asarray(MU + rng.multivariate_normal(np.zeros(D), SIGMA, 64), jnp.float32)
    mu1 = jnp.asarray(MU + SHIFT, jnp.float32)
    class1 = Partial(gaussian_eps, mu1, jnp.asarray(SIGMA, jnp.float32))
    out = samplers.ddim_edit(d, MODEL, x_in, edit_model_fn=class1)
    a_last = float(d.alphas_cumprod[-1])
    shifted = samplers.sample(d, MODEL, jax.random.key(0), x_in.shape, method='ddim',
                              clip_denoised=False,
                              x_T=out['codes'] - math.sqrt(a_last) * jnp.asarray(SHIFT,
                                                                                 jnp.float32))
    np.testing.assert_allclose(out['edited'], shifted['samples'] + SHIFT, atol=2e-4)
    # The edited points belong to class 1 under the Bayes classifier of the two classes.
    prec = np.linalg.inv(SIGMA)
    edited = np.asarray(out['edited'])
    logit = (edited - (MU + SHIFT / 2)) @ prec @ SHIFT
    assert np.mean(logit > 0) > 0.95
    # No change: the reconstruction itself, and its reported error.
    same = samplers.ddim_edit(d, MODEL, x_in)
    assert np.array_equal(np.asarray(same['edited']), np.asarray(same['reconstruction']))
    np.testing.assert_allclose(same['reconstruction'], out['reconstruction'])
    err = np.sqrt(np.mean(np.square(np.asarray(same['reconstruction']) - np.asarray(x_in)),
                          axis=1))
    np.testing.assert_allclose(same['reconstruction_error'], err, rtol=1e-5)
    # The inversion's error is the discretisation's: it shrinks with the step count (O(1/K)).
    finer = samplers.ddim_edit(spaced('ddim200'), MODEL, x_in)['reconstruction_error']
    assert float(np.mean(finer)) < 0.5 * float(np.mean(err))


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def test_named_masks_generate_the_named_region():
    shape = (2, 8, 6, 3)
    right = samplers.make_mask('right_half', shape)
    assert right.shape == (2, 8, 6, 1)
    assert np.all(right[:, :, :3] == 1) and np.all(right[:, :, 3:] == 0)
    left = samplers.make_mask('left_half', shape)
    assert np.all(left[:, :, :3] == 0) and np.all(left[:, :, 3:] == 1)
    top = samplers.make_mask('top_half', shape)
    assert np.all(top[:, :4] == 0) and np.all(top[:, 4:] == 1)
    center = samplers.make_mask('center', shape)
    assert center[0, :, :, 0].sum() == 8 * 6 - 4 * 4 and center[0, 4, 3, 0] == 0
    rand = samplers.make_mask('random:0.25', (400, 8, 8, 1), np.random.default_rng(0))
    generated = 1 - rand.mean()
    assert abs(generated - 0.25) < 5 * math.sqrt(0.25 * 0.75 / rand.size)


@pytest.mark.parametrize('spec', ['bottom', 'random:1.5', 'random:x'])
def test_bad_masks(spec):
    with pytest.raises(ValueError, match=f"edit.mask='{spec}'"):
        samplers.make_mask(spec, (1, 8, 8, 1))


# ----------------------------------------------------------------------------------------------
# Classifier-guided edits (edit.target_label on an unconditional run with a classifier)
# ----------------------------------------------------------------------------------------------
def gaussian_class_grad(mu, sigma, shift, x, t, y):
    """∇_x log p(y | x_t) of the two Gaussian classes N(μ, Σ) (y = 0) and N(μ + Δ, Σ) (y = 1)
    against the class-0 model, log N(x; √ᾱ(μ+Δ), C) - log N(x; √ᾱ μ, C), C = ᾱΣ + (1-ᾱ)I:
    the constant C^{-1} √ᾱ Δ for y = 1, 0 for y = 0. t: the original timesteps."""
    a = AB[t][:, None]
    m = a[:, :, None] * sigma + (1 - a)[:, :, None] * jnp.eye(D)
    grad = jnp.linalg.solve(m, (jnp.sqrt(a) * shift)[..., None])[..., 0]
    return jnp.where((y == 1)[:, None], grad, 0.0) + 0.0 * x


CLASS_GRAD = Partial(gaussian_class_grad, jnp.asarray(MU, jnp.float32),
                     jnp.asarray(SIGMA, jnp.float32), jnp.asarray(SHIFT, jnp.float32))


def test_classifier_guided_ddim_edit_is_the_class_conditional_edit():
    """With the class-0 ε and the exact log-likelihood-ratio classifier, DDIM guidance at s = 1
    (ε̂ - √(1-ᾱ) s ∇ log p(y|x_t), Dhariwal & Nichol Alg. 2) is the exact class-1 ε, so the
    guided edit towards y = 1 equals the edit decoded with the class-1 model; towards y = 0
    (zero gradient) it is the reconstruction. The guided SDEdit with the DDIM sampler equals
    the class-1 SDEdit from the same noise."""
    d = spaced('ddim50')
    rng = np.random.default_rng(1)
    x_in = jnp.asarray(MU + rng.multivariate_normal(np.zeros(D), SIGMA, 64), jnp.float32)
    class1 = Partial(gaussian_eps, jnp.asarray(MU + SHIFT, jnp.float32),
                     jnp.asarray(SIGMA, jnp.float32))
    to_one = samplers.classifier_guidance(CLASS_GRAD, jnp.ones(64, jnp.int32), 1.0)
    guided = samplers.ddim_edit(d, MODEL, x_in, edit_guidance=to_one)
    conditional = samplers.ddim_edit(d, MODEL, x_in, edit_model_fn=class1)
    np.testing.assert_allclose(guided['edited'], conditional['edited'], atol=2e-4)
    assert float(np.max(np.abs(np.asarray(guided['edited'] - guided['reconstruction'])))) > 0.3
    to_zero = samplers.classifier_guidance(CLASS_GRAD, jnp.zeros(64, jnp.int32), 1.0)
    np.testing.assert_allclose(samplers.ddim_edit(d, MODEL, x_in, edit_guidance=to_zero)['edited'],
                               guided['reconstruction'], atol=1e-5)
    sd_guided = samplers.sdedit(d, MODEL, jax.random.key(3), x_in, 0.6, method='ddim',
                                clip_denoised=False, guidance=to_one)
    sd_class1 = samplers.sdedit(d, class1, jax.random.key(3), x_in, 0.6, method='ddim',
                                clip_denoised=False)
    np.testing.assert_allclose(sd_guided, sd_class1, atol=2e-4)
