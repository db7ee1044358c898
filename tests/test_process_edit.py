"""Edits (samplers.repaint / sdedit / ddim_edit) on the continuous processes, flow matching and
EDM (samplers/process_edit.py), driven by the exact x̂_0 of Gaussian data N(μ, Σ) under each
process's marginals x_t = α x_0 + σ ε:  x̂_0 = μ + α Σ (α²Σ + σ²I)^{-1} (x_t - α μ).
Closed forms: RePaint's conditional mean, SDEdit's output mean (the posterior mean of the
noised input) and its limit at strength -> 0, the DDIM edit's shift-equivariance."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import processes, samplers
from diffusion_jax.samplers import process_edit

pytestmark = pytest.mark.usefixtures('fast_compiles')

_A = np.array([[1, 0.8, 0.5, 0.2], [0, 0.6, 0.3, 0.4], [0, 0, 0.5, 0.1], [0, 0, 0, 0.3]])
SIGMA = 0.3 * _A.T @ _A  # a correlated 4-d covariance (tests/test_edit.py's)
MU = np.array([0.2, -0.3, 0.1, 0.4])
SHIFT = np.array([-0.8, 0.6, -0.5, 0.4])  # μ_1 - μ_0 of a second class
D = 4
SIGMA_DATA = 0.5
FLOW = processes.FlowMatching(prediction='x0')
FLOW_V = processes.FlowMatching()  # velocity prediction: the default network output
EDM = processes.EDM(sigma_data=SIGMA_DATA)


def exact_x0(mu, sigma, x, alpha, std):
    """E[x_0 | x_t] of N(μ, Σ) data; x [B, D], alpha, std [B]."""
    a = alpha[:, None, None]
    m = a**2 * sigma + (std**2)[:, None, None] * jnp.eye(D)
    return mu + alpha[:, None] * jnp.einsum('ij,bj->bi', sigma, jnp.linalg.solve(
        m, (x - alpha[:, None] * mu)[..., None])[..., 0])


def flow_x0_net(mu, sigma, x, t):  # FlowMatching(prediction='x0'): the network outputs x̂_0
    return exact_x0(mu, sigma, x, 1.0 - t, t)


def flow_v_net(mu, sigma, x, t):  # the default: v = ε - x_0, ε̂ = (x - (1-t) x̂_0)/t
    x0 = exact_x0(mu, sigma, x, 1.0 - t, t)
    return (x - (1.0 - t)[:, None] * x0) / t[:, None] - x0


def edm_net(mu, sigma, x_in, c_noise):  # the raw F with c_skip x + c_out F = E[x_0 | x_σ]
    s = jnp.exp(4.0 * c_noise)
    x = x_in * jnp.sqrt(s**2 + SIGMA_DATA**2)[:, None]
    denoised = exact_x0(mu, sigma, x, jnp.ones_like(s), s)
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s * SIGMA_DATA / jnp.sqrt(s**2 + SIGMA_DATA**2)
    return (denoised - c_skip[:, None] * x) / c_out[:, None]


NETS = {'flow': flow_x0_net, 'flow_v': flow_v_net, 'edm': edm_net}
PROCS = {'flow': FLOW, 'flow_v': FLOW_V, 'edm': EDM}


def model(name, mu=MU):
    return Partial(NETS[name], jnp.asarray(mu, jnp.float32), jnp.asarray(SIGMA, jnp.float32))


def test_process_nets_are_the_exact_denoiser():
    """The three test networks give x̂_0 = E[x_0 | x_t] through each process's denoise."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, D)), jnp.float32)
    for name, proc in PROCS.items():
        t = jnp.full((8,), 0.4 if name != 'edm' else 1.3, jnp.float32)
        alpha, std = proc.alpha_sigma(t)
        np.testing.assert_allclose(proc.denoise(model(name), x, t),
                                   exact_x0(jnp.asarray(MU), jnp.asarray(SIGMA), x,
                                            jnp.broadcast_to(alpha, (8,)), std),
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# RePaint
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['flow', 'edm'])
def test_repaint_on_a_process_keeps_the_known_and_conditions_the_unknown(name):
    """Coordinates 0, 1 kept, 2, 3 generated, 4096 copies: the kept ones equal the input
    exactly; with resampling (j = 1, r = 20, K = 100) the generated ones have the conditional
    mean E[x_u | x_k] to 5 standard errors (+ 0.01 for the grid)."""
    n, x_known = 4096, np.array([0.5, -0.2, 0.0, 0.0], np.float32)
    x0 = jnp.tile(jnp.asarray(x_known), (n, 1))
    mask = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
    out = np.asarray(samplers.repaint(PROCS[name], model(name), jax.random.key(0), x0, mask,
                                      num_steps=100, jump_length=1, jump_n_sample=20,
                                      clip_denoised=False))
    assert np.array_equal(out[:, :2], np.broadcast_to(x_known[:2], (n, 2)))
    ku, kk = SIGMA[np.ix_([2, 3], [0, 1])], SIGMA[np.ix_([0, 1], [0, 1])]
    mean = MU[2:] + ku @ np.linalg.solve(kk, x_known[:2] - MU[:2])
    se = out[:, 2:].std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(out[:, 2:].mean(axis=0) - mean) < 5 * se + 0.01), (
        out[:, 2:].mean(axis=0), mean)
    # And it generated: the unknown coordinates moved off the input's zeros, with spread.
    assert np.all(out[:, 2:].std(axis=0) > 0.05)


# ----------------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------------
X_IN = np.array([0.9, -0.8, 0.7, -0.6])


@pytest.mark.parametrize('name', ['flow', 'flow_v', 'edm'])
def test_sdedit_on_a_process_has_the_posterior_mean_of_the_noised_input(name):
    """x_t = α x_in + σ ε at t = t_{j0}, then the ancestral (posterior) chain: every step's mean
    is exact for Gaussian data, so E[out] = μ + α Σ (α²Σ + σ²I)^{-1} (α x_in - α μ)."""
    proc, k, strength = PROCS[name], 200, 0.5
    x = jnp.tile(jnp.asarray([X_IN], jnp.float32), (4096, 1))
    out = np.asarray(samplers.sdedit(proc, model(name), jax.random.key(1), x, strength,
                                     num_steps=k, method='ancestral', clip_denoised=False))
    j0 = process_edit.sdedit_index(k, strength)
    assert j0 == 100
    alpha, std = (float(v) for v in proc.alpha_sigma(jnp.float32(proc.time_grid(k)[j0])))
    cov = alpha**2 * SIGMA + std**2 * np.eye(D)
    expect = MU + alpha * SIGMA @ np.linalg.solve(cov, alpha * X_IN - alpha * MU)
    se = out.std(axis=0) / math.sqrt(len(out))
    assert np.all(np.abs(out.mean(axis=0) - expect) < 5 * se + 2e-3), (out.mean(0), expect)
    assert np.all(np.abs(out.mean(axis=0) - X_IN) > 0.1)  # an edit, not the input


@pytest.mark.parametrize('name', ['flow', 'edm'])
@pytest.mark.parametrize('method', ['ancestral', 'euler'])
def test_sdedit_on_a_process_at_the_smallest_strength_returns_the_input(name, method):
    """strength = 1/K starts at t_{K-1} (flow: t = 1/K; EDM: σ_min = 0.002): the noise there is
    σ(t_{K-1}) and one exact step removes most of it, so the output is the input to σ(t_{K-1});
    a larger strength moves it further."""
    proc, k = PROCS[name], 1000
    x = jnp.tile(jnp.asarray([X_IN], jnp.float32), (512, 1))
    rms = lambda s: float(np.sqrt(np.mean(np.square(np.asarray(samplers.sdedit(  # noqa: E731
        proc, model(name), jax.random.key(2), x, s, num_steps=k, method=method,
        clip_denoised=False)) - X_IN))))
    std_last = float(proc.alpha_sigma(jnp.float32(proc.time_grid(k)[k - 1]))[1])
    smallest = rms(1.0 / k)
    assert smallest < std_last
    assert rms(0.05) > 3 * smallest


def test_sdedit_refuses_a_method_the_process_cannot_run():
    with pytest.raises(ValueError, match=r"edit.sdedit_method='langevin' cannot run on "
                                         r"diffusion.process='edm'; choose one of ancestral, "):
        samplers.sdedit(EDM, model('edm'), jax.random.key(0), jnp.zeros((4, D)), 0.5,
                        num_steps=10, method='langevin')


# ----------------------------------------------------------------------------------------------
# DDIM edits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['flow', 'flow_v', 'edm'])
def test_ddim_edit_on_a_process_is_the_shifted_decode(name):
    """One Σ for both classes: x̂_0 under μ + Δ at x + αΔ is x̂_0 under μ at x, plus Δ, so every
    DDIM step is shift-equivariant: decoding the code with class 1 equals decoding code - α(t_0) Δ
    with class 0, plus Δ. The unchanged decode is the reconstruction; its error (reported per
    example) is the inversion's and shrinks with K."""
    proc = PROCS[name]
    rng = np.random.default_rng(0)
    x_in = jnp.asarray(MU + rng.multivariate_normal(np.zeros(D), SIGMA, 64), jnp.float32)
    class1 = model(name, MU + SHIFT)
    out = samplers.ddim_edit(proc, model(name), x_in, edit_model_fn=class1, num_steps=50)
    alpha0 = float(proc.alpha_sigma(jnp.float32(proc.time_grid(50)[0]))[0])
    shifted = samplers.sample(proc, model(name), jax.random.key(0), x_in.shape, method='ddim',
                              num_steps=50, clip_denoised=False,
                              x_T=out['codes'] - alpha0 * jnp.asarray(SHIFT, jnp.float32))
    np.testing.assert_allclose(out['edited'], shifted['samples'] + SHIFT, atol=5e-4)
    logit = (np.asarray(out['edited']) - (MU + SHIFT / 2)) @ np.linalg.inv(SIGMA) @ SHIFT
    assert np.mean(logit > 0) > 0.95  # class 1 under the Bayes classifier
    same = samplers.ddim_edit(proc, model(name), x_in, num_steps=50)
    assert np.array_equal(np.asarray(same['edited']), np.asarray(same['reconstruction']))
    err = np.sqrt(np.mean(np.square(np.asarray(same['reconstruction']) - np.asarray(x_in)), 1))
    np.testing.assert_allclose(same['reconstruction_error'], err, rtol=1e-5)
    finer = samplers.ddim_edit(proc, model(name), x_in, num_steps=200)['reconstruction_error']
    assert float(np.mean(finer)) < 0.5 * float(np.mean(err))
    assert float(np.mean(finer)) < 0.05


def test_process_edits_refuse_classifier_guidance_and_the_target_level_inversion():
    g = samplers.classifier_guidance(Partial(lambda x, t, y: x), jnp.zeros(4, jnp.int32), 1.0)
    with pytest.raises(ValueError, match='classifier guidance runs on the gaussian process only'):
        samplers.ddim_edit(EDM, model('edm'), jnp.zeros((4, D)), edit_guidance=g, num_steps=4)
    with pytest.raises(ValueError, match="sampling.inversion='target_level': a edm process"):
        samplers.ddim_edit(EDM, model('edm'), jnp.zeros((4, D)), inversion='target_level',
                           num_steps=4)
