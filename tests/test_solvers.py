"""The ODE solvers (dpmpp_2m, dpmpp_3m, unipc, heun) and what every registered sampler shares,
against closed-form truths.

  * Gaussian data N(μ, s² I): the probability-flow ODE is linear, x_b = √b μ + c (x_a - √a μ)
    with c = √((b s² + 1-b)/(a s² + 1-a)) from level ᾱ = a to b, so each solver's error from the
    same x_T is measured exactly, on chains whose ᾱ are uniform in λ = log(α/σ) (no snapping to
    a base schedule's integer steps, so the grids refine smoothly).
  * The mixture oracle of test_samplers (ε and p(y|x_t) exact): class weights, guidance,
    inversion.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance as gl
from diffusion_jax import samplers, sharding
from test_samplers import (CENTRES, MU, S2, TARGET, WEIGHTS, Z5, gaussian_eps, mixture_apply,
                           mixture_grad_log_prob, mixture_model, mixture_params, nearest_class,
                           spaced)

pytestmark = pytest.mark.usefixtures('fast_compiles')

SOLVERS = ('dpmpp_2m', 'dpmpp_3m', 'unipc', 'heun')
KS = (5, 10, 20, 40)
# λ at ᾱ = 0.9999 and at the linear schedule's ᾱ_{T-1} = 4.04e-5 (T = 1000): the range a
# DDPM-trained model covers.
LAMBDA_MAX, LAMBDA_MIN = 0.5 * math.log(0.9999 / 1e-4), 0.5 * math.log(4.04e-5 / (1 - 4.04e-5))


def lambda_uniform(k):
    """A K-step diffusion whose ᾱ_k are uniform in λ from LAMBDA_MAX (k = 0) to LAMBDA_MIN."""
    abar = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(LAMBDA_MAX, LAMBDA_MIN, k)))
    return dl.GaussianDiffusion(1.0 - abar / np.append(1.0, abar[:-1]), 'eps', 'fixed_small')


def oracle(d, mean_type='eps'):
    """The exact model of N(MU, S2 I) data for diffusion d (timestep_map = identity), in ε, x0 or
    v form."""
    tables = jnp.asarray(np.stack([d.alphas_cumprod, d.one_minus_alphas_cumprod]), jnp.float32)
    return Partial(_oracle_output, tables, jnp.asarray(MU, jnp.float32), jnp.float32(S2), d,
                   mean_type)


def _oracle_output(tables, mu, s2, d, mean_type, x_t, t):
    eps = gaussian_eps(tables, mu, s2, x_t, t)
    if mean_type == 'eps':
        return eps
    x0 = d.predict_x0_from_eps(x_t, t, eps)
    return x0 if mean_type == 'x0' else d.predict_v(x0, t, eps)


def exact_solution(d, x_T):
    """The PF-ODE from level ᾱ_{K-1} to ᾱ_0, then the x̂_0 = E[x_0|x] at ᾱ_0 that every sampler
    returns as its last step (float64)."""
    a, b = d.alphas_cumprod[-1], d.alphas_cumprod[0]
    x_b = math.sqrt(b) * MU + math.sqrt((b * S2 + 1 - b) / (a * S2 + 1 - a)) * (
        x_T - math.sqrt(a) * MU)
    return MU + math.sqrt(b) * S2 / (b * S2 + 1 - b) * (x_b - math.sqrt(b) * MU)


X_T = np.asarray(jax.random.normal(jax.random.key(0), (64, MU.size)), np.float64)


def solve(method, d, model=None, **kwargs):
    model = oracle(d) if model is None else model
    return np.asarray(samplers.sample(d, model, jax.random.key(1), X_T.shape, method=method,
                                      x_T=jnp.asarray(X_T, jnp.float32), clip_denoised=False,
                                      **kwargs)['samples'], np.float64)


@pytest.fixture(scope='module')
def errors():
    """RMS error against the exact solution, {method: [err at K for K in KS]}."""
    out = {}
    for method in ('ddim',) + SOLVERS:
        out[method] = [float(np.sqrt(np.mean((solve(method, d) - exact_solution(d, X_T)) ** 2)))
                       for d in map(lambda_uniform, KS)]
    return out


# (order band from K = 20 to 40, the factor by which the K = 10 error beats DDIM's). Measured
# (2-core CPU, float32): orders 1.00, 2.01, 2.58, 2.98, 2.18; K = 10 errors 4.6e-2 (DDIM),
# 4.0e-3, 3.1e-2, 9.7e-3, 3.8e-2. dpmpp_3m is order 2 overall (its first step is DDIM's, order 1
# locally O(h²)) and still pre-asymptotic at K = 10 on this grid (3.1e-2; 1.8e-3 at K = 20,
# where its penultimate step is third order, as diffusers' from 15 steps on);
# unipc is order 3 (UniC raises UniP-2 by one, Zhao et al. Theorem 3.3); heun spends 2K - 1 NFE.
ORDERS = {'ddim': (0.9, 1.1, None), 'dpmpp_2m': (1.8, 2.3, 8.0), 'dpmpp_3m': (2.0, 3.3, 1.3),
          'unipc': (2.6, 3.3, 4.0), 'heun': (1.8, 2.4, 1.1)}


@pytest.mark.parametrize('method', list(ORDERS))
def test_pf_ode_convergence_order_on_gaussian_data(errors, method):
    low, high, factor = ORDERS[method]
    err = errors[method]
    order = math.log(err[2] / err[3]) / math.log(2.0)
    assert low < order < high, (method, err)
    assert err[3] < err[2] < err[0], err
    if factor is not None:
        assert err[1] * factor < errors['ddim'][1], (err[1], errors['ddim'][1])


def published_dpmpp_3m(d, x_T):
    """DPM-Solver++(3M) written from the published update (Lu et al. 2022; diffusers'
    multistep_dpm_solver_third_order_update) in float64, with the same lower orders."""
    abar = list(np.asarray(d.alphas_cumprod)[::-1]) + [1.0]
    lam = [0.5 * math.log(a / (1 - a)) for a in abar[:-1]]
    k_steps = len(lam)
    x, ms = x_T, []
    for i in range(k_steps):
        a = abar[i]
        m = MU + math.sqrt(a) * S2 / (a * S2 + 1 - a) * (x - math.sqrt(a) * MU)
        ms.append(m)
        if i == k_steps - 1:
            return m
        alpha_t, sigma_t, sigma_s = math.sqrt(abar[i + 1]), math.sqrt(1 - abar[i + 1]), \
            math.sqrt(1 - a)
        h = lam[i + 1] - lam[i]
        # diffusers' lower_order_final: below 15 steps the order is ≤ the steps left; from 15
        # on only the last step (returned above) is lowered.
        order = min(3, i + 1, k_steps - i) if k_steps < 15 else min(3, i + 1)
        x1 = sigma_t / sigma_s * x - alpha_t * math.expm1(-h) * m
        if order == 1:
            x = x1
        elif order == 2:
            x = x1 - 0.5 * alpha_t * math.expm1(-h) * (m - ms[-2]) * h / (lam[i] - lam[i - 1])
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (m - ms[-2]) / r0, (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = (x1 + alpha_t * (math.expm1(-h) / h + 1.0) * d1
                 - alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5) * d2)


@pytest.mark.parametrize('k', [10, 20])
def test_dpmpp_3m_is_the_published_update(k):
    d = lambda_uniform(k)
    np.testing.assert_allclose(solve('dpmpp_3m', d), published_dpmpp_3m(d, X_T), atol=1e-5)


@pytest.mark.parametrize('method', SOLVERS)
def test_eps_x0_and_v_networks_give_the_same_samples(method):
    d = lambda_uniform(10)
    want = solve(method, d)
    for mean_type in ('x0', 'v'):
        got = solve(method, d.replace(model_mean_type=mean_type), oracle(d, mean_type))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('method,spec', [('dpmpp_2m', 'ddim10'), ('dpmpp_3m', 'ddim10'),
                                         ('unipc', 'ddim10'), ('heun', 'ddim6')])
def test_mixture_weights_at_about_10_nfe(method, spec):
    """Point-mass mixture, ε exact: the class weights of 10-NFE samples (heun: K = 6, 11 NFE)
    within Monte Carlo error. (Measured at n = 3000: the smallest class comes out at 0.178 for
    the three multistep solvers, -3 SE: the 10-step ODE's own bias, inside the 5 SE bound.)"""
    n = 3000
    x = np.asarray(samplers.sample(spaced(spec), mixture_model(0.0), jax.random.key(13), (n, 2),
                                   method=method, clip_denoised=False)['samples'])
    counts = np.bincount(nearest_class(x, 0.0), minlength=3) / n
    se = np.sqrt(WEIGHTS * (1 - WEIGHTS) / n)
    np.testing.assert_array_less(np.abs(counts - WEIGHTS), Z5 * se)
    dist = np.min(np.linalg.norm(x[:, None] - np.asarray(CENTRES)[None], axis=-1), axis=1)
    assert np.median(dist) < 0.01 and np.mean(dist) < 0.03


# ----------------------------------------------------------------------------------------------
# Guidance identities, for every registered method
# ----------------------------------------------------------------------------------------------
TAU = 0.25


# The samplers of the Gaussian chain (the cold-diffusion ones run on a ColdDiffusion only:
# tests/test_cold.py).
# 'consistency' needs a distilled student's (σ_min, σ_data): tests/test_distillation.py.
GAUSSIAN_METHODS = tuple(m for m in samplers.METHODS
                         if m not in ('cold', 'cold_naive', 'consistency'))


@pytest.mark.parametrize('method', GAUSSIAN_METHODS)
def test_guidance_identities(method):
    n, d, key = 64, spaced('ddim10'), jax.random.key(5)
    params = mixture_params(TAU)
    y = jnp.full((n,), TARGET, jnp.int32)
    run = lambda model, **kw: np.asarray(samplers.sample(  # noqa: E731
        d, model, key, (n, 2), method=method, clip_denoised=False, **kw)['samples'])
    # Classifier guidance of scale 0 is the unguided sampler (to float32 rounding).
    grad_fn = Partial(mixture_grad_log_prob, params)
    plain = run(mixture_model(TAU))
    np.testing.assert_allclose(run(mixture_model(TAU),
                                   guidance=samplers.classifier_guidance(grad_fn, y, 0.0)),
                               plain, atol=2e-5)
    # Classifier-free w = 0 is the conditional model, with or without guidance rescale.
    cond = run(gl.bind_model(mixture_apply, params, y))
    cfg = lambda w, rescale=0.0: run(gl.classifier_free_model_fn(  # noqa: E731
        mixture_apply, params, y, w, len(WEIGHTS), guidance_rescale=rescale))
    np.testing.assert_allclose(cfg(0.0), cond, atol=1e-6)
    np.testing.assert_allclose(cfg(0.0, 0.7), cond, atol=2e-5)
    # φ = 0 is plain classifier-free guidance; φ > 0 changes a w > 0 sample.
    np.testing.assert_allclose(cfg(2.0, 0.0), run(gl.classifier_free_model_fn(
        mixture_apply, params, y, 2.0, len(WEIGHTS))), atol=1e-6)
    assert not np.allclose(cfg(2.0, 0.7), cfg(2.0, 0.0), atol=1e-3)


@pytest.mark.parametrize('method', ['dpmpp_2m', 'heun'])
def test_classifier_guidance_scale_one_samples_the_class(method):
    """With the exact classifier, ε - √(1-ᾱ)∇log p(y|x_t) = -√(1-ᾱ)∇log q(x_t|y): the ODE
    solvers at s = 1 sample the class component N(c_y, τ² I). (Over 100 steps; over 20 steps
    dpmpp_2m's variance is 66% high: between the classes the exact gradient is steep.)"""
    n, d = 2000, spaced('100')
    y = jnp.full((n,), TARGET, jnp.int32)
    guide = samplers.classifier_guidance(Partial(mixture_grad_log_prob, mixture_params(TAU)), y,
                                         1.0)
    x = np.asarray(samplers.sample(d, mixture_model(TAU), jax.random.key(6), (n, 2),
                                   method=method, clip_denoised=False, guidance=guide)['samples'])
    se = TAU / math.sqrt(n)
    np.testing.assert_array_less(np.abs(x.mean(0) - np.asarray(CENTRES)[TARGET]), Z5 * se + 0.01)
    assert abs(x.var(0).mean() / TAU**2 - 1) < 0.1


def guidance_rescale_reference(cond, cfg, phi):
    """Lin et al. 2023, eq. 15-16, per example over all dims."""
    std = lambda v: v.reshape(v.shape[0], -1).std(1).reshape(-1, 1)  # noqa: E731
    return phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg


def test_guidance_rescale_is_lin_et_al_eq_16():
    params = mixture_params(TAU)
    x = jax.random.normal(jax.random.key(2), (8, 2))
    t = jnp.arange(8, dtype=jnp.int32) * 100
    y = jnp.full((8,), 1, jnp.int32)
    cond = np.asarray(mixture_apply(params, x, t, y=y), np.float64)
    uncond = np.asarray(mixture_apply(params, x, t, y=jnp.full((8,), 3)), np.float64)
    cfg = 3.0 * cond - 2.0 * uncond
    got = gl.classifier_free_model_fn(mixture_apply, params, y, 2.0, 3, guidance_rescale=0.7)(x, t)
    np.testing.assert_allclose(got, guidance_rescale_reference(cond, cfg, 0.7), rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Clipping, thresholding and the DDIM guidance order
# ----------------------------------------------------------------------------------------------
def test_dynamic_threshold_and_ddim_guidance_order():
    x0 = jnp.array([[3.0, -0.5, 0.2, 0.1], [0.5, -0.2, 0.1, 0.0]])
    got = samplers.dynamic_threshold(x0, 0.5)
    # Row 0: s = median |x̂_0| = 0.35 < 1, so s = 1 (plain clip); row 1 the same, nothing clipped.
    np.testing.assert_allclose(got, jnp.clip(x0, -1, 1))
    got = samplers.dynamic_threshold(x0, 1.0 - 1e-6)
    np.testing.assert_allclose(got[0], np.array([3.0, -0.5, 0.2, 0.1]) / 3.0, rtol=1e-4)
    # Guided DDIM, condition_score by hand: ε from the clipped x̂_0, shifted, x̂_0 unclipped.
    d = spaced('ddim10')
    x = 2.5 * jax.random.normal(jax.random.key(3), (16, 2))
    t = jnp.full((16,), 3, jnp.int32)
    guide = samplers.classifier_guidance(Partial(mixture_grad_log_prob, mixture_params(TAU)),
                                         jnp.full((16,), TARGET), 3.0)
    out = mixture_model(TAU)(x, jnp.asarray(d.timestep_map)[t])
    x0_clip = jnp.clip(d.predict_x0_from_eps(x, t, out), -1, 1)
    abar, abar_prev = d.alphas_cumprod[3], d.alphas_cumprod_prev[3]
    eps = (d.predict_eps_from_x0(x, t, x0_clip) - math.sqrt(1 - abar)
           * guide.scaled_grad(x, jnp.asarray(d.timestep_map)[t]))
    x0_g = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    want = math.sqrt(abar_prev) * x0_g + math.sqrt(1 - abar_prev) * eps
    zero = jnp.zeros_like(x)
    got = samplers.ddim_step(d, out, x, t, zero, guidance=guide)['sample']
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    shift = samplers.ddim_step(d, out, x, t, zero, guidance=guide, ddim_guidance='eps_shift')
    assert not np.allclose(shift['sample'], got, atol=1e-3)  # the orders differ under clipping
    free = [samplers.ddim_step(d, out, x, t, zero, guidance=guide, clip_denoised=False,
                               ddim_guidance=o)['sample'] for o in samplers.DDIM_GUIDANCE]
    np.testing.assert_allclose(free[0], free[1], rtol=1e-4, atol=1e-4)  # and agree without it
    with pytest.raises(ValueError, match='sampling.ddim_guidance'):
        samplers.sample(d, mixture_model(TAU), jax.random.key(0), (4, 2), ddim_guidance='x')


# ----------------------------------------------------------------------------------------------
# Inversion: the reference form and today's
# ----------------------------------------------------------------------------------------------
def test_ddim_inversion_reconstruction_on_the_mixture():
    """Encode mixture samples (τ = 0.1) with each inversion, decode with DDIM (η = 0).

    Measured RMS reconstruction error (2-core CPU, n = 512): 'reference' 0.197 (K = 10) and
    0.104 (K = 20); 'target_level' 0.139 and 0.086. Both are first order (about halving with
    K); on this oracle the reference form's treatment of x_0 as the level-ᾱ_0 input costs more
    than target_level's timestep lag."""
    rng = np.random.default_rng(0)
    comp = rng.choice(3, 512, p=WEIGHTS)
    x0 = jnp.asarray(np.asarray(CENTRES)[comp] + 0.1 * rng.standard_normal((512, 2)), jnp.float32)
    err = {}
    for spec in ('ddim10', 'ddim20'):
        d, model = spaced(spec), mixture_model(0.1)
        for inversion in samplers.INVERSIONS:
            code = samplers.ddim_encode(d, model, x0, inversion=inversion)
            rec = samplers.sample(d, model, jax.random.key(0), x0.shape, method='ddim', x_T=code,
                                  clip_denoised=False)['samples']
            err[spec, inversion] = float(np.sqrt(np.mean(np.sum(np.square(rec - x0), -1))))
    for inversion in samplers.INVERSIONS:
        assert 1.15 < err['ddim10', inversion] / err['ddim20', inversion] < 2.5, err
    assert err['ddim20', 'reference'] < 0.13 and err['ddim20', 'target_level'] < 0.11, err
    assert err['ddim10', 'target_level'] < err['ddim10', 'reference'], err
    with pytest.raises(ValueError, match='sampling.inversion'):
        samplers.ddim_encode(d, model, x0, inversion='exact')


# ----------------------------------------------------------------------------------------------
# Registry, compilation, sharding
# ----------------------------------------------------------------------------------------------
def test_registry_lists_the_methods_and_their_nfe():
    assert samplers.METHODS == ('ancestral', 'ddim', 'langevin', 'pc', 'dpmpp_2m', 'dpmpp_3m',
                                'unipc', 'heun', 'cold', 'cold_naive', 'consistency')
    assert [samplers.nfe(m, 10, 2) for m in samplers.METHODS] == [10, 10, 30, 30, 10, 10, 10, 19,
                                                                  10, 10, 10]
    with pytest.raises(ValueError, match='dpmpp_2m, dpmpp_3m, unipc, heun'):
        samplers.sample(spaced('ddim10'), mixture_model(0.0), jax.random.key(0), (4, 2),
                        method='euler')


class _Calls:
    """A call counter (a plain object, so it is a static leaf of the model pytree)."""

    def __init__(self):
        self.count = 0

    def add(self):
        self.count += 1


def _counted_mixture(calls, x_t, t):
    jax.debug.callback(calls.add)
    return mixture_model(0.0)(x_t, t)


def test_network_calls_at_run_time_are_the_registered_nfe():
    """Each network evaluation runs a host callback once: heun's skipped second evaluation at
    the last step (lax.cond) and the Langevin corrector loops are counted as they execute."""
    d = spaced('ddim4')
    for method in GAUSSIAN_METHODS:
        calls = _Calls()
        x = samplers.sample(d, Partial(_counted_mixture, calls), jax.random.key(0), (8, 2),
                            method=method, langevin_steps=2)['samples']
        jax.block_until_ready(x)
        jax.effects_barrier()
        assert calls.count == samplers.nfe(method, 4, 2), method


@pytest.mark.parametrize('method', SOLVERS)
def test_one_compile_per_method_steps_and_shape(method):
    traces = []

    def counted(*args):
        traces.append(1)
        return gaussian_eps(*args)

    def model(mu):
        return Partial(counted, *spaced_tables(), jnp.asarray(mu, jnp.float32), jnp.float32(S2))

    d = spaced('ddim10')
    samplers.sample(d, model(MU), jax.random.key(0), (16, MU.size), method=method)
    first = len(traces)
    for i, mu in enumerate((-MU, 2 * MU)):
        samplers.sample(d, model(mu), jax.random.key(i), (16, MU.size), method=method)
    samplers.reverse_from(d, model(MU), jax.random.key(0), jnp.zeros((16, MU.size)), 9,
                          method=method)
    second = len(traces)
    samplers.reverse_from(d, model(MU), jax.random.key(0), jnp.zeros((16, MU.size)), 4,
                          method=method)
    assert first >= 1 and len(traces) == second == 2 * first


def spaced_tables():
    from test_samplers import TABLES  # pylint: disable=import-outside-toplevel
    return (TABLES,)


@pytest.mark.parametrize('method', ['dpmpp_3m', 'unipc', 'heun'])
def test_sharded_solver_equals_single_device(method):
    mesh = sharding.make_mesh()
    d, model, key = spaced('ddim10'), mixture_model(TAU), jax.random.key(17)
    guide = samplers.classifier_guidance(Partial(mixture_grad_log_prob, mixture_params(TAU)),
                                         jnp.full((32,), TARGET), 1.0)
    kw = dict(method=method, guidance=guide, dynamic_threshold=0.9)
    single = samplers.sample(d, model, key, (32, 2), **kw)['samples']
    sharded = samplers.sample(d, model, key, (32, 2), mesh=mesh, **kw)['samples']
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, atol=1e-5)
