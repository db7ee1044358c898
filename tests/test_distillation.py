"""diffusion_jax.distillation against truths of Gaussian data x_0 ~ N(MU, S² I).

VP levels α = cos(πt/2), σ = sin(πt/2): the exact teacher is E[x_0|z_t] = MU + α S²/(α² S² + σ²)
(z_t - α MU), so every DDIM step is affine in z and the progressive target is computed here
independently in float64 numpy. In EDM variables y = x_0 + σ ε the probability-flow ODE maps the
marginals affinely: y(σ') = MU + √((S² + σ'²)/(S² + σ²)) (y(σ) - MU), and the exact consistency
function (to σ_min) is f*(y, σ) = MU + √((S² + σ_min²)/(S² + σ²)) (y - MU).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import diffusion as dl
from diffusion_jax import distillation as dist
from diffusion_jax import respace, samplers, schedules

pytestmark = pytest.mark.usefixtures('fast_compiles')

MU, S = 0.3, 0.5
SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def vp(t):
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


def exact_x0(z, alpha, sigma):
    return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)


def ddim_np(z, lv_from, lv_to):
    (a_s, s_s), (a_t, s_t) = lv_from, lv_to
    x0 = exact_x0(z, a_s, s_s)
    return a_t * x0 + s_t * (z - a_s * x0) / s_s


def _levels_batch(levels, b):
    return tuple((jnp.full((b,), a, jnp.float32), jnp.full((b,), s, jnp.float32))
                 for a, s in levels)


@pytest.fixture(scope='module')
def z_batch():
    return np.asarray(jax.random.normal(jax.random.key(0), (64, 2, 2, 1)), np.float64) * 1.3


@pytest.mark.parametrize('t, n', [(1.0, 4), (0.5, 4), (0.25, 4), (0.125, 8)])
def test_progressive_target_is_two_exact_ddim_steps(z_batch, t, n):
    """x̃ from the library equals the target built from two float64 DDIM steps, and one DDIM
    step of a student predicting x̃ lands on the teacher's z_{t''} (Salimans & Ho 2022, Alg. 2)."""
    levels = (vp(t), vp(t - 0.5 / n), vp(max(t - 1.0 / n, 0.0)))
    (a_t, s_t), lv_mid, (a_e, s_e) = levels
    z_end = ddim_np(ddim_np(z_batch, levels[0], lv_mid), lv_mid, levels[2])
    want = (z_end - s_e / s_t * z_batch) / (a_e - s_e / s_t * a_t)
    lv = _levels_batch(levels, z_batch.shape[0])

    def teacher(z, i):
        return exact_x0(z, *(lv[i][0].reshape(-1, 1, 1, 1), lv[i][1].reshape(-1, 1, 1, 1)))

    got = dist.progressive_target(teacher, jnp.asarray(z_batch, jnp.float32), lv)
    np.testing.assert_allclose(got['target'], want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got['z_end'], z_end, atol=2e-5, rtol=1e-5)
    one_step = dist.ddim_level_step(got['target'], jnp.asarray(z_batch, jnp.float32),
                                    *lv[0], *lv[2])
    np.testing.assert_allclose(one_step, z_end, atol=5e-5, rtol=1e-5)


def test_student_fitting_the_target_reproduces_the_two_step_map():
    """The target is affine in z (Gaussian data), so an affine student x̂_S(z) = a z + b fitted
    by least squares on samples of z_t fits it exactly; on fresh z its single DDIM step equals
    the teacher's two steps, in each parametrisation the student's output can take."""
    t, n = 0.75, 2
    levels = (vp(t), vp(t - 0.5 / n), vp(t - 1.0 / n))
    (a_t, s_t), _, (a_e, s_e) = levels
    key_fit, key_new = jax.random.split(jax.random.key(1))
    b = 4096
    lv = _levels_batch(levels, b)
    z = a_t * (MU + S * jax.random.normal(key_fit, (b, 1))) \
        + s_t * jax.random.normal(jax.random.fold_in(key_fit, 1), (b, 1))

    def teacher(zz, i):
        return exact_x0(zz, lv[i][0][:, None], lv[i][1][:, None])

    target = np.asarray(dist.progressive_target(teacher, z, lv)['target'], np.float64)[:, 0]
    design = np.stack([np.asarray(z[:, 0], np.float64), np.ones(b)], 1)
    (slope, icpt), res, *_ = np.linalg.lstsq(design, target, rcond=None)
    assert res[0] / b < 1e-10  # affine: fitted exactly
    z_new = np.asarray(jax.random.normal(key_new, (256, 1)), np.float64) * 1.2
    want = ddim_np(ddim_np(z_new, levels[0], levels[1]), levels[1], levels[2])
    x_s = slope * z_new + icpt
    eps_s = (z_new - a_t * x_s) / s_t
    outputs = {'x': x_s, 'eps': eps_s, 'v': a_t * eps_s - s_t * x_s,
               'x_eps': np.concatenate([x_s, eps_s], -1)}
    for name, out in outputs.items():
        x0 = dist.x0_from_output(name, jnp.asarray(out, jnp.float32),
                                 jnp.asarray(z_new, jnp.float32), a_t, s_t)
        step = dist.ddim_level_step(x0, jnp.asarray(z_new, jnp.float32), a_t, s_t, a_e, s_e)
        np.testing.assert_allclose(step, want, atol=1e-4, err_msg=name)
        loss = dist.progressive_loss(x0, jnp.asarray(x_s, jnp.float32), a_t, s_t)
        assert float(jnp.max(loss)) < 1e-9, name
    with pytest.raises(ValueError, match='distill.parametrization'):
        dist.x0_from_output('score', jnp.zeros(1), jnp.zeros(1), 1.0, 1.0)


def test_truncated_snr_weight_and_halving():
    w = dist.truncated_snr_weight(jnp.array([2.0, 1.0, 0.1]), jnp.array([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(w, [4.0, 1.0, 1.0], rtol=1e-6)
    loss = dist.progressive_loss(jnp.ones((1, 2)), jnp.zeros((1, 2)), 2.0, 1.0)
    np.testing.assert_allclose(loss, [4.0])
    assert dist.halve_steps(8, 3) == [4, 2, 1]
    with pytest.raises(ValueError, match=r'distill.rounds=4 .*use at most 3 rounds'):
        dist.halve_steps(8, 4)
    with pytest.raises(ValueError, match='distill.rounds=2'):
        dist.halve_steps(6, 2)


# ----------------------------------------------------------------------------------------------
# Consistency
# ----------------------------------------------------------------------------------------------
def denoise_y(y, sigma):
    sigma = jnp.reshape(sigma, (-1,) + (1,) * (y.ndim - 1))
    return MU + S**2 / (S**2 + sigma**2) * (y - MU)


def ode_exact(y, sigma, sigma_next):
    r = jnp.sqrt((S**2 + sigma_next**2) / (S**2 + sigma**2)).reshape((-1,) + (1,) * (y.ndim - 1))
    return MU + r * (y - MU)


def f_star(y, sigma):
    return ode_exact(y, sigma, jnp.full_like(sigma, SIGMA_MIN))


def test_c_skip_c_out_and_the_boundary_condition():
    sig = jnp.array([SIGMA_MIN, 0.5, 1.0, 80.0])
    skip = dist.c_skip(sig, SIGMA_MIN, SIGMA_DATA)
    out = dist.c_out(sig, SIGMA_MIN, SIGMA_DATA)
    np.testing.assert_allclose(skip, [1.0, 0.25 / (0.498**2 + 0.25), 0.25 / (0.998**2 + 0.25),
                                      0.25 / (79.998**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(out, [0.0, 0.5 * 0.498 / math.sqrt(0.5), 0.5 * 0.998 /
                                     math.sqrt(1.25), 0.5 * 79.998 / math.sqrt(6400.25)],
                               rtol=1e-6, atol=1e-9)
    y = jax.random.normal(jax.random.key(2), (4, 3, 3, 1))
    junk = 7.0 + jax.random.normal(jax.random.key(3), y.shape)
    at_min = jnp.full((4,), SIGMA_MIN)
    np.testing.assert_array_equal(dist.consistency_from_x0(junk, y, at_min, SIGMA_MIN,
                                                           SIGMA_DATA), y)
    np.testing.assert_allclose(dist.consistency_from_raw(junk, y, at_min, SIGMA_MIN,
                                                         SIGMA_DATA), y, atol=1e-7)
    # The closed-form consistency function also satisfies f(y, σ_min) = y.
    np.testing.assert_allclose(f_star(y, at_min), y, atol=1e-6)


def test_heun_of_the_exact_teacher_follows_the_closed_form_ode():
    """Heun's steps of the exact teacher converge to the closed-form ODE map at order 2."""
    y = 2.0 * jax.random.normal(jax.random.key(4), (8, 2, 2, 1))
    want = ode_exact(y, jnp.full((8,), 2.0), jnp.full((8,), 0.05))
    errors = []
    for k in (20, 40, 80):
        grid, x = np.geomspace(2.0, 0.05, k + 1), y
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = dist.ode_heun_step(denoise_y, x, jnp.full((8,), s), jnp.full((8,), s_next))
        errors.append(float(jnp.max(jnp.abs(x - want))))
    assert errors[-1] < 5e-4
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 3.2 < coarse / fine < 4.8  # second order
    one = dist.ode_ddim_step(denoise_y(y, jnp.full((8,), 2.0)), y, jnp.full((8,), 2.0),
                             jnp.full((8,), 0.0))
    np.testing.assert_allclose(one, denoise_y(y, jnp.full((8,), 2.0)), atol=1e-7)


def test_exact_consistency_function_has_zero_consistency_loss():
    b = 256
    key = jax.random.key(5)
    sigmas = dist.karras_sigmas(18, SIGMA_MIN, 80.0, 7.0)
    n = jax.random.randint(key, (b,), 0, 17)
    s_lo, s_hi = sigmas[n], sigmas[n + 1]
    y = MU + S * jax.random.normal(jax.random.fold_in(key, 1), (b, 2, 2, 1)) \
        + s_hi.reshape(-1, 1, 1, 1) * jax.random.normal(jax.random.fold_in(key, 2), (b, 2, 2, 1))
    c = 0.00054 * math.sqrt(4)
    exact = dist.consistency_loss(f_star, f_star, ode_exact, y, s_hi, s_lo, c)
    assert float(jnp.max(exact)) < 1e-5
    heun = dist.consistency_loss(
        f_star, f_star, lambda yy, a, bb: dist.ode_heun_step(denoise_y, yy, a, bb), y, s_hi,
        s_lo, c)
    # Heun's local error on 18 levels is small but not zero; the denoiser is not consistent.
    assert float(jnp.mean(heun)) < 5e-3
    wrong = dist.consistency_loss(denoise_y, denoise_y, ode_exact, y, s_hi, s_lo, c)
    assert float(jnp.mean(wrong)) > 20 * max(float(jnp.mean(heun)), 1e-5)


@pytest.mark.parametrize('sigmas', [(80.0,), (80.0, 0.8), (80.0, 2.0, 0.5, 0.1)])
def test_multistep_consistency_sampling_of_the_exact_function(sigmas):
    """Algorithm 1 with f* draws N(MU, S² + σ_min²) at any number of steps (Monte Carlo:
    5 standard errors of 2·10⁴ scalars)."""
    n = 20000
    x = np.asarray(dist.consistency_sample(f_star, jax.random.key(6), (n, 1),
                                           jnp.asarray(sigmas), SIGMA_MIN))[:, 0]
    std = math.sqrt(S**2 + SIGMA_MIN**2)
    assert abs(x.mean() - MU) < 5 * std / math.sqrt(n)
    assert abs(x.std() - std) < 5 * std / math.sqrt(2 * n)


def test_pseudo_huber_and_ema():
    a, b = jnp.array([[3.0, 0.0]]), jnp.zeros((1, 2))
    np.testing.assert_allclose(dist.pseudo_huber(a, b, 4.0), [1.0], rtol=1e-6)
    new = dist.ema_update({'w': jnp.array(1.0)}, {'w': jnp.array(3.0)}, 0.9)
    np.testing.assert_allclose(new['w'], 1.2, rtol=1e-6)
    s = dist.karras_sigmas(5, 0.002, 80.0, 7.0)
    np.testing.assert_allclose([s[0], s[-1]], [0.002, 80.0], rtol=1e-5)
    assert bool(jnp.all(jnp.diff(s) > 0))


# ----------------------------------------------------------------------------------------------
# sampling.method='consistency' on the chain
# ----------------------------------------------------------------------------------------------
def _student_eps(tables, x, t_orig):
    """An ε-network whose consistency function (c_skip y + (1 - c_skip) x̂) is f* exactly:
    x̂ = (f* - c_skip y)/(1 - c_skip), ε = (x - √ᾱ x̂)/√(1 - ᾱ), at the original timestep."""
    sqrt_ab, sqrt_1m, sig = (jnp.asarray(a)[t_orig].reshape(-1, 1) for a in tables)
    y = x / sqrt_ab
    f = f_star(y, sig[:, 0])
    skip = dist.c_skip(sig, SIGMA_MIN_VP, SIGMA_DATA)
    x0 = (f - skip * y) / (1.0 - skip)
    return (x - sqrt_ab * x0) / sqrt_1m


SIGMA_MIN_VP = None


@pytest.fixture(scope='module')
def vp_diffusion():
    global SIGMA_MIN_VP  # the teacher's σ̃ at timestep 0, as distillation uses it
    d = dl.GaussianDiffusion(schedules.linear(1000), 'eps', 'fixed_small')
    SIGMA_MIN_VP = float(d.sqrt_recipm1_alphas_cumprod[0])
    tables = (np.asarray(d.sqrt_alphas_cumprod, np.float32),
              np.asarray(d.sqrt_one_minus_alphas_cumprod, np.float32),
              np.asarray(d.sqrt_recipm1_alphas_cumprod, np.float32))
    return d, Partial(_student_eps, tuple(jnp.asarray(a) for a in tables))


@pytest.mark.parametrize('steps', ['trailing1', 'trailing2', 'trailing4'])
def test_consistency_sampler_draws_the_data_distribution(vp_diffusion, steps):
    """sampling.method='consistency' with 1, 2, 4 calls of a student whose consistency function
    is f* draws N(MU, S² + σ_min²) (5 standard errors of 8192 scalars)."""
    d, model = vp_diffusion
    n = 8192
    x = np.asarray(samplers.sample(respace.respaced(d, steps), model, jax.random.key(7), (n, 1),
                                   method='consistency', clip_denoised=False,
                                   consistency=(SIGMA_MIN_VP, SIGMA_DATA))['samples'])[:, 0]
    std = math.sqrt(S**2 + SIGMA_MIN_VP**2)
    assert abs(x.mean() - MU) < 5 * std / math.sqrt(n)
    assert abs(x.std() - std) < 5 * std / math.sqrt(2 * n)
    assert samplers.nfe('consistency', int(steps[len('trailing'):])) == int(steps[-1])


def test_consistency_sampler_refusals(vp_diffusion):
    d, model = vp_diffusion
    with pytest.raises(ValueError, match=r"method='consistency' needs consistency="):
        samplers.sample(d.respace([999]), model, jax.random.key(0), (8, 1),
                        method='consistency')
    with pytest.raises(ValueError, match="applies to method='consistency', not 'ddim'"):
        samplers.sample(d.respace([999]), model, jax.random.key(0), (8, 1), method='ddim',
                        consistency=(0.01, 0.5))


# ----------------------------------------------------------------------------------------------
# The run's progressive grid (diffusion_jax.distill) against the samplers' 'trailing' respacing
# ----------------------------------------------------------------------------------------------
def _teacher_eps(tables, x, t_orig):
    sqrt_ab, sqrt_1m = (jnp.asarray(a)[t_orig].reshape(-1, 1) for a in tables)
    return (x - sqrt_ab * exact_x0(x, sqrt_ab, sqrt_1m)) / sqrt_1m


def _ideal_student_eps(diffusion, n_student, teacher, x, t_orig):
    """The student that fits the progressive target exactly: ε of x̃ at its step i."""
    from diffusion_jax import distill  # pylint: disable=import-outside-toplevel
    i = (t_orig + 1) // (diffusion.num_timesteps // n_student)
    times, levels = distill.progressive_levels(diffusion, n_student, i)
    target = dist.progressive_target(lambda z, j: exact_x0(
        z, levels[j][0][:, None], levels[j][1][:, None]), x, levels)['target']
    (a_t, s_t) = levels[0]
    return (x - a_t[:, None] * target) / s_t[:, None]


@pytest.mark.parametrize('n_student', [1, 2, 4])
def test_ideal_progressive_student_reproduces_the_teacher_ddim_chain(vp_diffusion, n_student):
    """A student fitting distill's progressive target at every one of its N levels, sampled by
    DDIM on 'trailing<N>', equals the exact teacher's DDIM on 'trailing<2N>' from the same x_T:
    the run's levels are the samplers' grid, and N -> N/2 keeps the map."""
    d = vp_diffusion[0]
    tables = (jnp.asarray(d.sqrt_alphas_cumprod, jnp.float32),
              jnp.asarray(d.sqrt_one_minus_alphas_cumprod, jnp.float32))
    teacher = Partial(_teacher_eps, tables)
    student = Partial(_ideal_student_eps, d, n_student, teacher)
    x_t = jax.random.normal(jax.random.key(8), (64, 1))
    run = lambda steps, model: np.asarray(samplers.sample(  # noqa: E731
        respace.respaced(d, steps), model, jax.random.key(0), (64, 1), method='ddim',
        clip_denoised=False, x_T=x_t)['samples'])
    want = run(f'trailing{2 * n_student}', teacher)
    np.testing.assert_allclose(run(f'trailing{n_student}', student), want, atol=2e-4)
    # and it is not the teacher's own N-step chain (the distillation changes something).
    assert np.max(np.abs(run(f'trailing{n_student}', teacher) - want)) > 1e-2


@pytest.mark.parametrize('solver', ['ddim', 'heun'])
def test_the_runs_teacher_step_follows_the_closed_form_ode(vp_diffusion, solver):
    """distill.teacher_ode_step — the step the consistency run takes — with the exact ε-teacher
    on the VP levels k_{j+1} -> k_j of 18 scales: 'ddim' is the Euler step of the exact
    denoiser; 'heun' equals Heun's step of the y-space closed-form denoiser and lands on the
    closed-form ODE map at least 2x closer than Euler on every level pair."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    from diffusion_jax import distill  # pylint: disable=import-outside-toplevel
    d = vp_diffusion[0]
    tables = (jnp.asarray(d.sqrt_alphas_cumprod, jnp.float32),
              jnp.asarray(d.sqrt_one_minus_alphas_cumprod, jnp.float32))
    teacher = Partial(_teacher_eps, tables)
    config = ml_collections.ConfigDict(dict(distill=dict(
        sigma_data=SIGMA_DATA, num_scales=18, teacher_solver=solver)))
    ks = np.asarray(distill.consistency_levels(config, d))
    k_hi, k_lo = jnp.asarray(ks[1:]), jnp.asarray(ks[:-1])  # [17] level pairs
    lv = distill._Levels(config, d, 2)  # pylint: disable=protected-access
    s_hi, s_lo = lv.sig[k_hi], lv.sig[k_lo]
    y = MU + jnp.sqrt(S**2 + s_hi**2)[:, None] * jax.random.normal(jax.random.key(9), (17, 1))
    got = distill.teacher_ode_step(config, lv, teacher, k_hi, k_lo)(y, s_hi, s_lo)
    exact = ode_exact(y, s_hi, s_lo)
    euler = dist.ode_ddim_step(denoise_y(y, s_hi), y, s_hi, s_lo)
    err = np.abs(np.asarray(got - exact))[:, 0]
    err_euler = np.abs(np.asarray(euler - exact))[:, 0]
    if solver == 'ddim':
        np.testing.assert_allclose(got, euler, atol=2e-5, rtol=2e-5)
    else:
        # Heun on the y-space closed-form denoiser (another code path): the run's two teacher
        # calls sit on the levels k_hi and k_lo.
        ref = dist.ode_heun_step(denoise_y, y, s_hi, s_lo)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        big = err_euler > 1e-3  # the pairs where Euler's error is above float32 noise
        assert big.sum() >= 10
        assert np.all(err[big] < err_euler[big] / 2), (err, err_euler)


# ----------------------------------------------------------------------------------------------
# Easy consistency tuning
# ----------------------------------------------------------------------------------------------
def test_ect_schedule_equals_the_formula():
    """r = max(t (1 - n(t)/q^{s+1}), 0), n(t) = 1 + k/(1 + e^{bt}) (Geng et al. 2024), in float64
    by hand, for q = 2, k = 8, b = 1 over stages 0..7; Δt = t - r halves per stage at large t."""
    t = np.array([0.002, 0.05, 0.3, 1.0, 2.5, 10.0, 80.0])
    for stage in range(8):
        n = 1.0 + 8.0 / (1.0 + np.exp(t))
        want = np.maximum(t * (1.0 - n / 2.0 ** (stage + 1)), 0.0)
        np.testing.assert_allclose(dist.ect_r(t, stage, 2.0, 8.0, 1.0), want, rtol=1e-5,
                                   atol=1e-7)
    # Stage 0 is denoising at small t: r = 0 where n(t) >= 2, i.e. t <= log 7.
    assert float(dist.ect_r(1.0, 0, 2.0, 8.0, 1.0)) == 0.0
    np.testing.assert_allclose(float(dist.ect_r(1.0, 2, 2.0, 8.0, 1.0)),
                               1.0 - (1.0 + 8.0 / (1.0 + math.e)) / 8.0, rtol=1e-6)
    dt = [80.0 - float(dist.ect_r(80.0, s, 2.0, 8.0, 1.0)) for s in range(4)]
    np.testing.assert_allclose(np.array(dt[:-1]) / np.array(dt[1:]), 2.0, rtol=1e-5)
    np.testing.assert_allclose(dist.ect_weight(jnp.array([0.5, 2.0]), 0.5), [8.0, 4.25],
                               rtol=1e-6)


def test_ect_loss_at_the_exact_consistency_function():
    """Point-mass data x_0 = MU: x_0 + tε and x_0 + rε lie on one PF-ODE trajectory (the ray
    from MU), so the ECT loss of the exact consistency function f*(y, σ) = MU + (σ_min/σ)(y - MU)
    is zero for every t, r, ε, and not for a perturbed f. Gaussian data N(MU, S²): a shared ε does
    not keep the two points on one trajectory, so the loss at f* is not zero but first order in
    Δt: halving Δt halves it (Monte Carlo over 4096 draws). r < σ_min takes x_0 as target."""
    b = 4096
    key = jax.random.key(10)
    noise = jax.random.normal(key, (b, 2, 2, 1))
    t = jnp.exp(-1.1 + 2.0 * jax.random.normal(jax.random.fold_in(key, 1), (b,)))
    t = jnp.clip(t, 0.05, 80.0)
    r = dist.ect_r(t, 3, 2.0, 8.0, 1.0)
    c = 0.00054 * math.sqrt(4)

    def f_point(y, sigma):
        return MU + (SIGMA_MIN / sigma).reshape(-1, 1, 1, 1) * (y - MU)

    x0 = jnp.full((b, 2, 2, 1), MU)
    loss = dist.ect_loss(f_point, f_point, x0, noise, t, r, SIGMA_MIN, SIGMA_DATA, c)
    has_r = np.asarray(r >= SIGMA_MIN)
    assert has_r.sum() > b // 2
    # Where r >= σ_min the target is f*(y_r, r): exactly consistent (float32 rounding only).
    assert float(jnp.max(jnp.where(has_r, loss, 0.0))) < 1e-4 * float(jnp.max(
        dist.ect_weight(t, SIGMA_DATA)))
    # Where r < σ_min the target is x_0 = MU while f*(y_t, t) = MU + σ_min ε: not zero.
    if (~has_r).any():
        assert float(jnp.min(jnp.where(has_r, jnp.inf, loss))) > 0
    perturbed = lambda y, s: f_point(y, s) + 0.01 * y  # noqa: E731
    assert float(jnp.mean(dist.ect_loss(perturbed, perturbed, x0, noise, t, r, SIGMA_MIN,
                                        SIGMA_DATA, c))) > 1e-2

    # Gaussian data: the loss at f* is first order in Δt.
    x0 = MU + S * jax.random.normal(jax.random.fold_in(key, 2), (b, 2, 2, 1))
    t = jnp.full((b,), 1.0)
    means = []
    for dt in (0.1, 0.05, 0.025):
        loss = dist.ect_loss(f_star, f_star, x0, noise, t, t - dt, SIGMA_MIN, SIGMA_DATA, 0.0)
        means.append(float(jnp.mean(loss)))
    for coarse, fine in zip(means[:-1], means[1:]):
        assert 1.8 < coarse / fine < 2.2, means


def test_one_step_ddim_on_a_fixed_large_run_is_the_denoiser():
    """'trailing1' on a fixed_large diffusion (the digits teacher's; a one-step chain has no
    β̃_1, which fixed_large reads at t = 0): one DDIM step from x_T is x̂_0(x_T, T-1)."""
    d = dl.GaussianDiffusion(schedules.linear(200), 'eps', 'fixed_large')
    tables = (jnp.asarray(d.sqrt_alphas_cumprod, jnp.float32),
              jnp.asarray(d.sqrt_one_minus_alphas_cumprod, jnp.float32))
    x_t = jax.random.normal(jax.random.key(11), (16, 1))
    got = samplers.sample(respace.respaced(d, 'trailing1'), Partial(_teacher_eps, tables),
                          jax.random.key(0), (16, 1), method='ddim', clip_denoised=False,
                          x_T=x_t)['samples']
    a, s = float(tables[0][-1]), float(tables[1][-1])
    np.testing.assert_allclose(got, exact_x0(np.asarray(x_t), a, s), atol=1e-4, rtol=1e-4)
