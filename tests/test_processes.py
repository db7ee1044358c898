"""The process interface (diffusion_jax.processes) and the samplers over it, against truths.

Gaussian data x_0 ~ N(MU, S² I) (D = 4 values as [B, 2, 2, 1] images): for x_t = α x_0 + σ ε the
optimal denoiser is E[x_0|x_t] = MU + α S²/(α² S² + σ²) (x_t - α MU), and the probability-flow
ODE is the affine map between the marginals, so
  flow:  x(t) = (1 - t) MU + √((1-t)² S² + t²) x_1   (x_0* = MU + S x_1),
  EDM:   x(σ) = MU + (x_T - MU) √(S² + σ²)/√(S² + σ_max²).
Every solver's last step returns x̂_0 at the grid's last nonzero time t_{K-1}, so its error is
measured against E[x_0 | x(t_{K-1})] of the exact trajectory: no σ_min → 0 floor.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import processes, samplers
from diffusion_jax.samplers import process_solvers

pytestmark = pytest.mark.usefixtures('fast_compiles')

MU, S = 0.3, 0.5
SHAPE = (16, 2, 2, 1)
Z = np.asarray(jax.random.normal(jax.random.key(0), SHAPE), np.float64)


def _b(a, x):
    return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1))


def flow_velocity(mu, s, x, t):
    """E[ε - x_0 | x_t] for x_t = (1-t) x_0 + t ε."""
    t = _b(t, x)
    r = (x - (1 - t) * mu) / ((1 - t) ** 2 * s**2 + t**2)
    return t * r - mu - (1 - t) * s**2 * r


def flow_x0(mu, s, x, t):
    t = _b(t, x)
    return mu + (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)


def edm_network(mu, s, sigma_data, x_in, c_noise):
    """The raw F with c_skip x + c_out F = E[x_0 | x_σ], called as F(c_in x, ln(σ)/4)."""
    sigma = _b(jnp.exp(4.0 * c_noise), x_in)
    x = x_in * jnp.sqrt(sigma**2 + sigma_data**2)
    denoised = mu + s**2 / (s**2 + sigma**2) * (x - mu)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    return (denoised - c_skip * x) / c_out


FLOW, EDM = processes.FlowMatching(), processes.EDM()
MODELS = {'flow': Partial(flow_velocity, MU, S), 'edm': Partial(edm_network, MU, S, 0.5)}


def reference(process, k):
    """E[x_0 | x(t_{K-1})] on the exact trajectory from x_T (float64)."""
    t = float(process.time_grid(k)[k - 1])
    if process.name == 'flow':
        x = (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * Z
        return MU + (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * MU)
    x_T = process.sigma_max * Z
    x = MU + (x_T - MU) * math.sqrt(S**2 + t**2) / math.sqrt(S**2 + process.sigma_max**2)
    return MU + S**2 / (S**2 + t**2) * (x - MU)


def solve(process, method, k, **kwargs):
    x_T = Z if process.name == 'flow' else process.sigma_max * Z
    out = samplers.sample(process, MODELS[process.name], jax.random.key(1), SHAPE, method=method,
                          num_steps=k, x_T=jnp.asarray(x_T, jnp.float32), clip_denoised=False,
                          **kwargs)['samples']
    return np.asarray(out, np.float64)


# (process, method): the order band of the error from K to 2K. The slope of log error over
# log K between K and 2K is p + O(1/K); measured (2-core CPU, float32) at K = 32 -> 64:
# flow euler 0.95, heun 2.04; edm euler 0.99, heun 2.10, dpmpp_2m 2.16, unipc 3.11; as on the VP
# chain (tests/test_solvers.py: ddim 1.00, dpmpp_2m 2.01, unipc 2.98, heun 2.18). Bands: the
# VP test's.
ORDERS = {('flow', 'euler'): (0.85, 1.15), ('flow', 'heun'): (1.8, 2.4),
          ('edm', 'euler'): (0.85, 1.15), ('edm', 'heun'): (1.8, 2.4),
          ('edm', 'dpmpp_2m'): (1.8, 2.3), ('edm', 'unipc'): (2.6, 3.3)}
KS = (32, 64)


@pytest.fixture(scope='module')
def errors():
    out = {}
    for name, method in ORDERS:
        process = FLOW if name == 'flow' else EDM
        out[name, method] = [float(np.max(np.abs(solve(process, method, k) - reference(process, k))))
                             for k in KS]
    return out


@pytest.mark.parametrize('key', list(ORDERS), ids=lambda k: '-'.join(k))
def test_convergence_order_with_the_exact_model(errors, key):
    low, high = ORDERS[key]
    err = errors[key]
    order = math.log(err[0] / err[1]) / math.log(2.0)
    assert low < order < high, (key, err, order)


def test_every_method_converges_and_euler_is_ddim():
    """At K = 24 Euler is within 0.08 (flow) / 0.16 (edm) of the exact solution (0.061 and
    0.126 measured)
    and every higher-order method at least twice closer; Euler equals DDIM (= order-1
    DPM-Solver++) where α and σ are linear in t, as for flow and EDM."""
    for process in (FLOW, EDM):
        err = {m: float(np.max(np.abs(solve(process, m, 24) - reference(process, 24))))
               for m in process.methods}
        assert err['euler'] < (0.08 if process.name == 'flow' else 0.16), (process.name, err)
        for method in set(process.methods) - {'euler', 'ddim'}:
            assert err[method] < 0.5 * err['euler'], (process.name, err)
        np.testing.assert_allclose(solve(process, 'ddim', 24), solve(process, 'euler', 24),
                                   atol=2e-4 * (1 if process.name == 'flow' else 80))


def test_ddim_on_gaussian_diffusion_is_euler_in_edm_sigma_space_step_for_step():
    """DDIM (η = 0) on a respaced VP chain equals Euler of dx̃/dσ = (x̃ - D)/σ in x̃ = x/√ᾱ,
    σ = √((1-ᾱ)/ᾱ), with D the VP model's x̂_0, on the chain's σ levels (then σ = 0)."""
    base = dl.GaussianDiffusion(np.linspace(1e-4, 0.02, 1000), 'eps', 'fixed_small')
    d = base.respace(range(0, 1000, 100))
    k = d.num_timesteps
    abar = np.asarray(d.alphas_cumprod)

    def vp_eps(x, t_orig):  # the exact ε-model of the Gaussian data (timestep_map: original t)
        a = _b(jnp.asarray(base.alphas_cumprod, jnp.float32)[t_orig], x)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

    sigmas = np.sqrt((1 - abar) / abar)
    grid = np.append(sigmas[::-1], 0.0)

    def denoiser(x_in, c_noise):  # D through EDM's preconditioning, from the VP model
        sigma = jnp.exp(4.0 * c_noise)
        kk = jnp.argmin(jnp.abs(jnp.asarray(sigmas, jnp.float32)[None] - sigma[:, None]), axis=1)
        x_tilde = x_in * _b(jnp.sqrt(sigma**2 + EDM.sigma_data**2), x_in)
        a = _b(jnp.asarray(abar, jnp.float32)[kk], x_in)
        x0 = d.predict_x0_from_eps(jnp.sqrt(a) * x_tilde, kk,
                                   vp_eps(jnp.sqrt(a) * x_tilde, d.timestep_map[kk]))
        return (x0 - _b(EDM.c_skip(sigma), x_in) * x_tilde) / _b(EDM.c_out(sigma), x_in)

    ctx = process_solvers.ProcessContext(EDM, denoiser, jnp.asarray(grid, jnp.float32),
                                         process_solvers.ProcessOptions('euler', k),
                                         jnp.zeros(4))
    x = jnp.asarray(Z, jnp.float32)
    state = {'x': x / math.sqrt(abar[-1])}
    for i, t in enumerate(range(k - 1, -1, -1)):
        tt = jnp.full((SHAPE[0],), t, jnp.int32)
        x = samplers.ddim_step(d, vp_eps(x, d.timestep_map[tt]), x, tt, jnp.zeros_like(x),
                               clip_denoised=False)['sample']
        state, _ = process_solvers.euler_step(ctx, state, i, None)
        scale = math.sqrt(abar[t - 1]) if t > 0 else 1.0
        np.testing.assert_allclose(np.asarray(state['x']) * scale, np.asarray(x), rtol=2e-5,
                                   atol=2e-5, err_msg=f'step {i}')


def test_edm_preconditioning_and_grid_are_table_1():
    sigma = np.array([0.002, 0.05, 0.5, 1.3, 80.0])
    sd = 0.5
    np.testing.assert_allclose(EDM.c_skip(sigma), sd**2 / (sigma**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(EDM.c_out(sigma), sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(EDM.c_in(sigma), 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(EDM.c_noise(sigma), np.log(sigma) / 4, rtol=1e-6)
    np.testing.assert_allclose(EDM.loss_weight(sigma), (sigma**2 + sd**2) / (sigma * sd) ** 2,
                               rtol=1e-12)
    # λ c_out² = 1: the effective weight of F's regression is 1 at every σ (Karras et al. Sec. 5).
    np.testing.assert_allclose(EDM.loss_weight(sigma) * EDM.c_out(sigma) ** 2, 1.0, rtol=1e-6)
    grid = EDM.time_grid(18)
    i = np.arange(18)
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid, np.append(expect, 0.0), rtol=1e-12)
    assert grid[0] == pytest.approx(80) and grid[17] == pytest.approx(0.002) and grid[18] == 0
    # The training law: ln σ ~ N(-1.2, 1.2²) (Monte Carlo, 4 standard errors).
    log_sigma = np.log(np.asarray(EDM.sample_time(jax.random.key(3), 20000)))
    assert abs(log_sigma.mean() + 1.2) < 4 * 1.2 / math.sqrt(20000)
    assert abs(log_sigma.std() - 1.2) < 4 * 1.2 / math.sqrt(2 * 20000)


def test_flow_shift_maps_the_grid_and_the_training_times():
    shifted = processes.FlowMatching(shift=3.0)
    t = 1 - np.arange(11) / 10
    np.testing.assert_allclose(shifted.time_grid(10), 3 * t / (1 + 2 * t), rtol=1e-12)
    np.testing.assert_allclose(FLOW.time_grid(10), t, rtol=1e-12)
    # logit-normal then shift: logit of the unshifted time t = s'/(s - (s-1) s') is N(m, std²).
    ln = processes.FlowMatching(time_sampling='logit_normal', logit_mean=0.5, logit_std=0.8,
                                shift=3.0)
    ts = np.asarray(ln.sample_time(jax.random.key(4), 20000), np.float64)
    u = ts / (3.0 - 2.0 * ts)
    logit = np.log(u / (1 - u))
    assert abs(logit.mean() - 0.5) < 4 * 0.8 / math.sqrt(20000)
    assert abs(logit.std() - 0.8) < 4 * 0.8 / math.sqrt(2 * 20000)


def test_min_snr_weights_are_hang_et_al():
    snr = np.array([0.0, 0.01, 1.0, 5.0, 40.0])
    g = 5.0
    m = np.minimum(snr, g)
    with np.errstate(divide='ignore', invalid='ignore'):
        eps_w = np.where(snr > 0, m / snr, 1.0)
    np.testing.assert_allclose(processes.min_snr_weight(snr, g, 'eps'), eps_w, rtol=1e-6)
    np.testing.assert_allclose(processes.min_snr_weight(snr, g, 'x0'), m, rtol=1e-6)
    np.testing.assert_allclose(processes.min_snr_weight(snr, g, 'v'), m / (snr + 1), rtol=1e-6)
    # Each weight turns its parametrisation's squared error into min(SNR, γ)‖x̂_0 - x_0‖²: the
    # same network (x̂_0) under ε, x0 and v targets gets the same weighted loss.
    d = dl.GaussianDiffusion(np.linspace(1e-4, 0.02, 100), 'eps', 'fixed_small')
    t = jnp.array([0, 10, 40, 99])
    x0 = jax.random.normal(jax.random.key(5), (4, 2, 2, 1))
    eps = jax.random.normal(jax.random.key(6), x0.shape)
    x_t = d.q_sample(x0, t, eps)
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.key(7), x0.shape)
    eps_hat = d.predict_eps_from_x0(x_t, t, x0_hat)
    mse = lambda a, b: np.mean(np.square(np.asarray(a) - np.asarray(b)), axis=(1, 2, 3))
    base = np.minimum(np.asarray(d.snr(t)), g) * mse(x0_hat, x0)
    for kind, err in (('eps', mse(eps_hat, eps)), ('x0', mse(x0_hat, x0)),
                      ('v', mse(d.predict_v(x0_hat, t, eps_hat), d.predict_v(x0, t, eps)))):
        np.testing.assert_allclose(processes.min_snr_weight(d.snr(t), g, kind) * err, base,
                                   rtol=2e-3, err_msg=kind)


def _hermite_expectation(f, mean, std, n=80):
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return float(np.sum(weights * f(mean + std * nodes)) / np.sqrt(2 * np.pi))


N_LOSS = 8192


def _optimal_loss(process, model):
    x0 = MU + S * jax.random.normal(jax.random.key(8), (N_LOSS, 2, 2, 1))
    out = jax.jit(lambda k: process.loss(model, x0, k))(jax.random.key(9))
    return np.asarray(out['loss'], np.float64), np.asarray(out['t'], np.float64)


@pytest.mark.parametrize('variant', ['uniform', 'logit_normal_shift3', 'x0'])
def test_flow_loss_of_the_optimal_model_is_the_closed_form_minimum(variant):
    """Velocity: E Var(ε - x_0 | x_t) = S²/((1-t)² S² + t²) per dimension; x0-prediction:
    Var(x_0 | x_t) = S² t²/((1-t)² S² + t²). Monte Carlo over N examples, 4 standard errors."""
    if variant == 'uniform':
        process, model = FLOW, MODELS['flow']
    elif variant == 'x0':
        process, model = processes.FlowMatching(prediction='x0'), Partial(flow_x0, MU, S)
    else:
        process = processes.FlowMatching(time_sampling='logit_normal', shift=3.0)
        model = MODELS['flow']
    if variant == 'x0':
        minimum = lambda t: S**2 * t**2 / ((1 - t) ** 2 * S**2 + t**2)
    else:
        minimum = lambda t: S**2 / ((1 - t) ** 2 * S**2 + t**2)
    loss, t = _optimal_loss(process, model)
    # Given t the loss is the conditional minimum up to the ε, x_0 draw (a control variate).
    resid = loss - minimum(t)
    assert abs(resid.mean()) < 4 * resid.std() / math.sqrt(N_LOSS) + 1e-6, variant
    if variant == 'logit_normal_shift3':
        sig = lambda n: 1 / (1 + np.exp(-n))
        expect = _hermite_expectation(lambda n: minimum(3 * sig(n) / (1 + 2 * sig(n))), 0.0, 1.0)
    else:
        grid = (np.arange(200000) + 0.5) / 200000
        expect = float(np.mean(minimum(grid)))
    assert abs(loss.mean() - expect) < 4 * loss.std() / math.sqrt(N_LOSS), (loss.mean(), expect)


@pytest.mark.parametrize('s', [0.5, 1.0])
def test_edm_loss_of_the_optimal_model_is_the_closed_form_minimum(s):
    """λ(σ) Var(x_0 | x_σ) = (σ² + σ_d²) S²/(σ_d² (S² + σ²)): 1 at every σ where S = σ_d."""
    model = Partial(edm_network, MU, s, 0.5)
    x0 = MU + s * jax.random.normal(jax.random.key(8), (N_LOSS, 2, 2, 1))
    out = jax.jit(lambda k: EDM.loss(model, x0, k))(jax.random.key(9))
    loss, sigma = np.asarray(out['loss'], np.float64), np.asarray(out['t'], np.float64)
    minimum = lambda sg: (sg**2 + 0.25) * s**2 / (0.25 * (s**2 + sg**2))
    expect = _hermite_expectation(lambda n: minimum(np.exp(n)), -1.2, 1.2)
    assert abs(loss.mean() - expect) < 4 * loss.std() / math.sqrt(N_LOSS), (loss.mean(), expect)
    resid = loss - minimum(sigma)
    assert abs(resid.mean()) < 4 * resid.std() / math.sqrt(N_LOSS) + 1e-6
    if s == 0.5:
        assert expect == pytest.approx(1.0)


def test_heun_churn_is_deterministic_at_zero_and_keeps_the_marginals():
    """S_churn = 0 ignores the rng; with churn and the exact model, EDM Algorithm 2 still
    samples N(MU, S²) up to its discretisation error, which is first order in 1/K (std bias
    measured 0.073, 0.033, 0.011, 0.005 at K = 16, 32, 64, 128 with γ = √2 - 1 in every step):
    at K = 128 within 5 standard errors of 4096 × 4 values."""
    a = solve(EDM, 'heun', 8)
    x_T = jnp.asarray(EDM.sigma_max * Z, jnp.float32)
    b = samplers.sample(EDM, MODELS['edm'], jax.random.key(7), SHAPE, method='heun',
                        num_steps=8, x_T=x_T, clip_denoised=False)['samples']
    np.testing.assert_array_equal(a, np.asarray(b, np.float64))
    out = samplers.sample(EDM, MODELS['edm'], jax.random.key(2), (4096, 2, 2, 1), method='heun',
                          num_steps=128, clip_denoised=False, s_churn=200.0, s_tmin=0.05,
                          s_tmax=50.0, s_noise=1.0)['samples']
    out = np.asarray(out, np.float64).ravel()
    n = out.size
    assert abs(out.mean() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.std() - S) < 5 * S / math.sqrt(2 * n)


def test_gaussian_process_is_todays_diffusion():
    """process='gaussian' (the default) is create_diffusion's GaussianDiffusion: the same loss
    and, through samplers.sample(num_steps=...), the same samples as its respaced chain."""
    cfg = ml_collections.ConfigDict(dict(beta_schedule='linear', num_timesteps=50,
                                         model_mean_type='eps', model_var_type='fixed_small',
                                         loss_type='mse'))
    proc = processes.get_process(cfg)
    d = dl.create_diffusion(cfg)
    model = lambda x, t: 0.1 * x + 0.001 * _b(t.astype(jnp.float32), x)
    x0 = jax.random.normal(jax.random.key(1), (8, 2, 2, 1))
    t = jnp.arange(8, dtype=jnp.int32) * 6
    noise = jax.random.normal(jax.random.split(jax.random.key(2))[1], x0.shape)
    np.testing.assert_array_equal(proc.loss(model, x0, jax.random.key(2), t=t)['loss'],
                                  d.training_losses(model, x0, t, noise)['loss'])
    fn = Partial(lambda x, t: 0.1 * x)
    a = samplers.sample(proc, fn, jax.random.key(3), (8, 2, 2, 1), method='ddim', num_steps='ddim10')
    b = samplers.sample(d.respace(range(0, 50, 5)), fn, jax.random.key(3), (8, 2, 2, 1),
                        method='ddim')
    np.testing.assert_array_equal(a['samples'], b['samples'])


def test_bad_input_is_one_line():
    cfg = ml_collections.ConfigDict(dict(process='vesde'))
    with pytest.raises(ValueError, match=r"diffusion.process='vesde' .* gaussian, flow, edm"):
        processes.get_process(cfg)
    with pytest.raises(ValueError, match=r"sampling.method='ancestral' cannot run on "
                                         r"diffusion.process='flow'.*euler, heun"):
        samplers.sample(FLOW, MODELS['flow'], jax.random.key(0), SHAPE, method='ancestral')
    with pytest.raises(ValueError, match=r"s_churn=1.0 applies to method='heun'"):
        samplers.sample(EDM, MODELS['edm'], jax.random.key(0), SHAPE, method='euler',
                        s_churn=1.0)
    d = dl.GaussianDiffusion(np.linspace(1e-4, 0.02, 10), 'eps', 'learned_range', 'hybrid')
    with pytest.raises(ValueError, match=r"loss_weighting='min_snr' with diffusion.loss_type"):
        processes.GaussianProcess(d, 'min_snr')
    with pytest.raises(ValueError, match=r'diffusion.flow.shift=0.0 must be > 0'):
        processes.FlowMatching(shift=0.0)
    for err in (ValueError,):
        with pytest.raises(err, match=r'diffusion.edm.sigma_min'):
            processes.EDM(sigma_min=90.0)


@pytest.mark.parametrize('kind', ['flow', 'edm', 'min_snr'])
def test_train_step_loss_is_the_process_loss(kind):
    """The train step's loss is the configured process's loss on the same batch, parameters
    and keys (fold_in(rng, step) split as train.make_train_step does): for 'flow'/'edm'
    process.loss, for min-SNR the per-example min_snr_weight times L_simple."""
    from configs import model_configs, swissroll
    from diffusion_jax import input_pipeline, models, timestep_sampling, train
    config = swissroll.get_config()
    config.model = model_configs.swissroll_mlp(hidden_dim=32, num_layers=2, out_dim=2,
                                               dropout=0.0)
    config.diffusion.update(num_timesteps=10, beta_schedule='linear', beta_start=0.01,
                            beta_end=0.5, model_mean_type='v')
    if kind == 'min_snr':
        config.diffusion.loss_weighting = 'min_snr'
    else:
        config.diffusion.process = kind
    config.data.num_train_examples = 32
    model = models.get_model(config.model)
    diffusion = dl.create_diffusion(config.diffusion)
    optimizer, schedule = train.create_optimizer(config.optim)
    state = train.create_train_state(config, model, optimizer, jax.random.key(0))
    batch = next(input_pipeline.train_iterator(
        input_pipeline.get_dataset(config.data, 'train'), 32, seed=0))
    step = train.make_train_step(config, model, diffusion, optimizer, schedule)
    _, metrics = jax.jit(step)(state, batch, jax.random.key(1))
    t_rng, noise_rng, dropout_rng, _ = jax.random.split(jax.random.fold_in(jax.random.key(1), 0),
                                                        4)
    fn = lambda x, t: model.apply({'params': state.params}, x, t, None, train=True,
                                  rngs={'dropout': dropout_rng})
    x0 = jnp.asarray(batch['image'])
    if kind == 'min_snr':
        t, _ = timestep_sampling.sample(state.sampler_state, t_rng, 32)
        noise = jax.random.normal(noise_rng, x0.shape)
        mse = diffusion.training_losses(fn, x0, t, noise)['loss']
        expect = jnp.mean(processes.min_snr_weight(diffusion.snr(t), 5.0, 'v') * mse)
        # the weight is not 1 everywhere, so the check can tell weighted from unweighted
        assert not np.allclose(expect, jnp.mean(mse), rtol=1e-3)
    else:
        expect = jnp.mean(processes.get_process(config.diffusion).loss(fn, x0, noise_rng)['loss'])
    np.testing.assert_allclose(float(metrics['loss']), float(expect), rtol=1e-5)


@pytest.mark.parametrize('name', ['flow', 'edm'])
def test_ode_likelihood_of_each_process_is_the_gaussian_density(name):
    """evaluation.likelihood.ode_bpd over a process, exact model, exact divergence, no
    dequantisation: flow's bits/dim = -log N(x; MU, S²)/(D ln 2) + 7 (the 2/256 bin offset).
    EDM's ODE runs from x at σ_min to z = MU + (x - MU) c, c = √(S² + σ_max²)/√(S² + σ_min²),
    scored under its prior N(0, σ_max² I): log p = log N(z; 0, σ_max²) + D log c exactly; that
    differs from the data density by the prior's missing mean, ≈ z·MU/σ_max² per dim (4e-3
    bits/dim here)."""
    from diffusion_jax.evaluation import likelihood
    process = FLOW if name == 'flow' else EDM
    x0 = jnp.asarray(MU + S * Z[:4], jnp.float32)
    out = jax.jit(lambda x: likelihood.ode_bpd(process, MODELS[name], x, jax.random.key(0),
                                               hutchinson='exact', dequantization='none'))(x0)
    dims = 4
    logp = (-0.5 * np.sum(((np.asarray(x0, np.float64) - MU) / S) ** 2, axis=(1, 2, 3))
            - dims * math.log(S) - 0.5 * dims * math.log(2 * math.pi))
    expect = -logp / (dims * math.log(2.0)) + 7.0
    assert bool(out['ok'])
    if name == 'edm':
        sig_max, sig_min = EDM.sigma_max, EDM.sigma_min
        c = math.sqrt(S**2 + sig_max**2) / math.sqrt(S**2 + sig_min**2)
        z = MU + (np.asarray(x0, np.float64) - MU) * c
        model_logp = (-0.5 * np.sum((z / sig_max) ** 2, axis=(1, 2, 3))
                      - 0.5 * dims * math.log(2 * math.pi * sig_max**2) + dims * math.log(c))
        np.testing.assert_allclose(np.asarray(out['bpd']),
                                   -model_logp / (dims * math.log(2.0)) + 7.0, atol=5e-4)
        np.testing.assert_allclose(np.asarray(out['bpd']), expect, atol=1e-2)
    else:
        np.testing.assert_allclose(np.asarray(out['bpd']), expect, atol=5e-4)


def test_sharded_process_sampling_equals_one_device():
    from diffusion_jax import sharding
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8
    one = solve(FLOW, 'heun', 4)
    eight = solve(FLOW, 'heun', 4, mesh=mesh)
    np.testing.assert_allclose(eight, one, rtol=1e-6, atol=1e-6)


def test_config_refuses_what_a_process_cannot_do():
    """config_validation.resolve: one line per refusal, before anything is built."""
    from configs import digits, digits_edm, digits_flow
    from diffusion_jax import config_validation
    cases = [
        (digits.get_config, {'diffusion.process': 'vesde'},
         r"diffusion.process='vesde' is not a process; choose one of gaussian, flow, edm, cold"),
        (digits_flow.get_config, {'sampling.method': 'ancestral'},
         r"sampling.method='ancestral' cannot run on diffusion.process='flow'; it runs euler"),
        (digits_edm.get_config, {'diffusion.loss_weighting': 'min_snr'},
         r"diffusion.loss_weighting='min_snr' applies to diffusion.process='gaussian'"),
        (digits_edm.get_config, {'sampling.num_steps': 'ddim10'},
         r"sampling.num_steps='ddim10': diffusion.process='edm' samples over K steps"),
        (digits_edm.get_config, {'sampling.method': 'euler', 'sampling.s_churn': 5.0},
         r"sampling.s_churn=5.0 applies to method='heun'"),
        (digits_flow.get_config, {'eval.nll_estimator': 'full'},
         r"eval.nll_estimator='full' is the discrete chain's bound"),
        (digits_flow.get_config, {'sampling.progressive': True},
         r'sampling.progressive=True draws its figures along the discrete chain'),
        (digits_edm.get_config, {'diffusion.edm.sigma_min': 100.0},
         r'diffusion.edm.sigma_min=100.0, sigma_max=80.0'),
        # The gaussian chain's own options are refused, not silently ignored.
        (digits_flow.get_config, {'sampling.dynamic_threshold': 0.995},
         r"^sampling.dynamic_threshold=0.995: dynamic thresholding of x̂_0 \(Imagen's\) applies "
         r"to the gaussian chain only, not to diffusion.process='flow'; set "
         r"sampling.dynamic_threshold=0.0.$"),
        (digits_edm.get_config, {'sampling.dynamic_threshold': 0.9},
         r"^sampling.dynamic_threshold=0.9: .* not to diffusion.process='edm'"),
        (digits_edm.get_config, {'sampling.eta': 1.0},
         r"^sampling.eta=1.0: DDIM's η applies to the gaussian chain only, not to "
         r"diffusion.process='edm'; set sampling.eta=0.0.$"),
        (digits_flow.get_config, {'sampling.ddim_guidance': 'eps_shift'},
         r"^sampling.ddim_guidance='eps_shift': the order of classifier guidance and clipping "
         r"applies to the gaussian chain only, not to diffusion.process='flow'; set "
         r"sampling.ddim_guidance='auto'.$"),
    ]
    for make, edits, match in cases:
        config = make()
        for path, value in edits.items():
            section, field = path.rsplit('.', 1)
            node = config
            for part in section.split('.'):
                node = node[part]
            node[field] = value
        with pytest.raises(ValueError, match=match):
            config_validation.resolve(config, 'train')
    for make in (digits_flow.get_config, digits_edm.get_config):
        config_validation.resolve(make(), 'train')  # the shipped configs are valid
    config = digits.get_config()
    config.diffusion.loss_weighting = 'min_snr'
    config_validation.resolve(config, 'train')


def test_library_refuses_gaussian_chain_options_on_a_process():
    """samplers.sample over flow/EDM refuses the options only the gaussian chain reads (they
    were silently dropped before), in one line naming the argument."""
    for process, kwargs, match in [
            (FLOW, dict(dynamic_threshold=0.995), r"^dynamic_threshold=0.995 applies to the "
             r"gaussian chain only, not to the 'flow' process; leave it at 0.0.$"),
            (EDM, dict(eta=1.0),
             r"^eta=1.0 applies to the gaussian chain only, not to the 'edm'"),
            (EDM, dict(ddim_guidance='eps_shift'), r"^ddim_guidance='eps_shift' applies"),
            (FLOW, dict(progress_steps='all'), r"^progress_steps='all' applies")]:
        with pytest.raises(ValueError, match=match):
            samplers.sample(process, MODELS[process.name], jax.random.key(0), SHAPE,
                            method='euler', num_steps=2, **kwargs)


def _labelled_apply(variables, x, t, y=None):
    """A toy class-conditional network: its output depends on x, t and the label."""
    scale = variables['scale']
    tt = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return scale * x + 0.1 * tt + 0.3 * jnp.asarray(y, jnp.float32).reshape(tt.shape)


@pytest.mark.parametrize('name', ['gaussian', 'flow', 'edm'])
def test_guidance_interval_guides_exactly_inside_lo_hi(name):
    """Kynkäänniemi et al. 2024: the guided output where lo < σ ≤ hi, the conditional outside,
    with σ read from the network's time input in each process's σ units."""
    from diffusion_jax import guidance
    cfg = ml_collections.ConfigDict(dict(beta_schedule='linear', num_timesteps=1000,
                                         model_mean_type='eps', model_var_type='fixed_small',
                                         loss_type='mse', process=name,
                                         flow=dict(time_scale=1000.0)))
    process = processes.get_process(cfg)
    sigmas = np.array([0.1, 0.5, 1.0, 1.5, 3.0, 0.2])  # in and out of (0.28, 1.61]
    if name == 'gaussian':
        table = np.sqrt((1 - process.diffusion.alphas_cumprod) / process.diffusion.alphas_cumprod)
        t_in = jnp.asarray(np.abs(table[None] - sigmas[:, None]).argmin(axis=1), jnp.int32)
        sigmas = table[np.asarray(t_in)]
    elif name == 'flow':
        t_in = jnp.asarray(1000.0 * sigmas / (1 + sigmas), jnp.float32)
    else:
        t_in = jnp.asarray(np.log(sigmas) / 4, jnp.float32)
    x = jax.random.normal(jax.random.key(0), (6, 2, 2, 1))
    y = jnp.arange(6) % 3
    variables = {'scale': jnp.float32(0.7)}
    interval = (0.28, 1.61, process.network_sigma())
    fn = guidance.classifier_free_model_fn(_labelled_apply, variables, y, 2.0, 3,
                                           interval=interval)
    plain = guidance.classifier_free_model_fn(_labelled_apply, variables, y, 2.0, 3)
    cond = _labelled_apply(variables, x, t_in, y)
    inside = (sigmas > 0.28) & (sigmas <= 1.61)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, t_in)),
                               np.where(inside[:, None, None, None], plain(x, t_in), cond),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"guidance_interval='1.0,0.5' needs 0 <= lo < hi"):
        guidance.classifier_free_model_fn(_labelled_apply, variables, y, 2.0, 3,
                                          interval=(1.0, 0.5, process.network_sigma()))
