"""The guidance interval (Kynkäänniemi et al. 2024) in a Heun step: decided once per step from the
step's current σ and applied to both evaluations, as their reference EDM sampler does.

A linear class-conditional network out = a_y x + b_y (any process's raw output: EDM's F, the flow
velocity, the VP ε) makes every step closed form, so each sampler is checked against a float64
Heun written out here, with the step's guidance switch g_i = [lo < σ_i ≤ hi] used by both of its
evaluations. The grids are chosen so that one step has σ_i inside (lo, hi] and σ_{i+1} outside:
deciding per evaluation (the old behaviour) would leave that step's second evaluation unguided,
and that reference is shown to be far from the sampler's output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import guidance, processes, samplers

pytestmark = pytest.mark.usefixtures('fast_compiles')

SHAPE = (4, 2, 2, 1)
Y = np.array([0, 1, 2, 0])
NULL = 3
W = 2.0
# a_y, b_y per label (row NULL: the unconditional output).
A = np.array([0.6, 0.7, 0.8, 0.3])
B = np.array([-0.2, 0.1, 0.4, -0.5])
X_T = np.asarray(jax.random.normal(jax.random.key(3), SHAPE), np.float64)


def _linear(variables, x, t, y=None):
    del t  # time-independent: the process's coefficients carry σ
    a = variables['a'][y].reshape((-1,) + (1,) * (x.ndim - 1))
    b = variables['b'][y].reshape(a.shape)
    return a * x + b


VARIABLES = {'a': jnp.asarray(A, jnp.float32), 'b': jnp.asarray(B, jnp.float32)}


def _coefficients(guided: bool):
    """(a, b) [B, 1, 1, 1] of the network the sampler sees: guided or conditional."""
    a, b = A[Y], B[Y]
    if guided:
        a, b = (1 + W) * a - W * A[NULL], (1 + W) * b - W * B[NULL]
    return a.reshape(-1, 1, 1, 1), b.reshape(-1, 1, 1, 1)


def _guided_fn(sigma_fn, lo, hi):
    return guidance.classifier_free_model_fn(_linear, VARIABLES, jnp.asarray(Y), W, NULL,
                                             interval=(lo, hi, sigma_fn))


def _heun(x, grid, derivative, x0_of, switch):
    """Float64 Heun from x over grid (descending, ending at 0), the last step returning x̂_0.
    derivative(x, t, guided), x0_of(x, t, guided); switch(step_time, evaluation_time) -> guided."""
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        if t_next == 0:
            return x0_of(x, t, switch(t, t))
        d = derivative(x, t, switch(t, t))
        x_e = x + (t_next - t) * d
        d_next = derivative(x_e, t_next, switch(t, t_next))
        x = x + (t_next - t) * 0.5 * (d + d_next)
    return x


def _per_step(lo, hi, sigma):
    return lambda t_step, t_eval: lo < sigma(t_step) <= hi


def _per_evaluation(lo, hi, sigma):
    return lambda t_step, t_eval: lo < sigma(t_eval) <= hi


def _check(out, grid, derivative, x0_of, lo, hi, sigma, x_start=X_T):
    want = _heun(x_start, grid, derivative, x0_of, _per_step(lo, hi, sigma))
    old = _heun(x_start, grid, derivative, x0_of, _per_evaluation(lo, hi, sigma))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-5)
    # The grid makes the two rules differ: a sampler deciding per evaluation fails above.
    assert np.max(np.abs(want - old)) > 1e-2


def test_edm_heun_guides_both_evaluations_of_a_step_that_starts_inside():
    process = processes.EDM()
    grid = np.array([10.0, 2.0, 0.5, 0.0])  # σ_0 = 10 in (3, 20], σ_1 = 2 outside
    lo, hi = 3.0, 20.0
    sd = process.sigma_data

    def denoised(x, s, guided):
        a, b = _coefficients(guided)
        c_in, c_skip = 1 / np.sqrt(s**2 + sd**2), sd**2 / (s**2 + sd**2)
        c_out = s * sd / np.sqrt(s**2 + sd**2)
        return c_skip * x + c_out * (a * c_in * x + b)

    out = samplers.sample(process, _guided_fn(process.network_sigma(), lo, hi),
                          jax.random.key(0), SHAPE, method='heun', num_steps=3,
                          x_T=jnp.asarray(X_T, jnp.float32), grid=grid,
                          clip_denoised=False)['samples']
    _check(out, grid, lambda x, s, g: (x - denoised(x, s, g)) / s, denoised, lo, hi,
           lambda s: s)


def test_flow_heun_guides_both_evaluations_of_a_step_that_starts_inside():
    process = processes.FlowMatching(time_scale=1000.0)
    grid = np.array([0.9, 0.5, 0.2, 0.0])  # σ̃ = t/(1-t): 9 in (2, 10], then 1 and 0.25 outside
    lo, hi = 2.0, 10.0

    def velocity(x, t, guided):
        a, b = _coefficients(guided)
        return a * x + b

    out = samplers.sample(process, _guided_fn(process.network_sigma(), lo, hi),
                          jax.random.key(0), SHAPE, method='heun', num_steps=3,
                          x_T=jnp.asarray(X_T, jnp.float32), grid=grid,
                          clip_denoised=False)['samples']
    _check(out, grid, velocity, lambda x, t, g: x - t * velocity(x, t, g), lo, hi,
           lambda t: t / (1 - t))


def test_vp_heun_guides_both_evaluations_of_a_step_that_starts_inside():
    """samplers/heun.py on a GaussianDiffusion (ε-prediction), in EDM's σ = √((1-ᾱ)/ᾱ)."""
    d = dl.GaussianDiffusion(np.linspace(0.05, 0.5, 4), 'eps', 'fixed_small')
    abar = np.asarray(d.alphas_cumprod, np.float64)
    sig = np.sqrt((1 - abar) / abar)  # σ_0 < σ_1 < σ_2 < σ_3
    lo, hi = 0.5 * (sig[1] + sig[2]), sig[3] + 1.0  # steps at σ_3, σ_2 inside; σ_1 outside
    process = processes.GaussianProcess(d)
    fn = _guided_fn(process.network_sigma(), lo, hi)
    out = samplers.sample(d, fn, jax.random.key(0), SHAPE, method='heun', x_T=jnp.asarray(
        X_T, jnp.float32), clip_denoised=False)['samples']

    # In x̃ = x/√ᾱ over the grid σ_3 > σ_2 > σ_1 > σ_0, then the last step returns D at σ_0.
    level = {s: k for k, s in enumerate(sig)}

    def denoised(x_tilde, s, guided):
        a, b = _coefficients(guided)
        k = level[s]
        x = np.sqrt(abar[k]) * x_tilde
        return (x - np.sqrt(1 - abar[k]) * (a * x + b)) / np.sqrt(abar[k])

    grid = np.append(sig[::-1], 0.0)
    _check(out, grid, lambda x, s, g: (x - denoised(x, s, g)) / s, denoised, lo, hi,
           lambda s: s, x_start=X_T / np.sqrt(abar[-1]))


def test_has_interval_marks_only_guided_models_with_an_interval():
    sigma_fn = processes.EDM().network_sigma()
    assert guidance.has_interval(_guided_fn(sigma_fn, 0.28, 1.61))
    assert not guidance.has_interval(guidance.classifier_free_model_fn(
        _linear, VARIABLES, jnp.asarray(Y), W, NULL))
    assert not guidance.has_interval(guidance.bind_model(_linear, VARIABLES, jnp.asarray(Y)))
    weak = guidance.bind_model(_linear, VARIABLES, jnp.asarray(Y))
    assert guidance.has_interval(guidance.autoguidance_model_fn(
        weak, weak, W, interval=(0.28, 1.61, sigma_fn)))
    assert not guidance.has_interval(guidance.autoguidance_model_fn(weak, weak, W))
