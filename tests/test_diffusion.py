"""GaussianDiffusion against closed forms, Bayes' rule, Monte Carlo and the exact likelihood of
Gaussian data. Monte Carlo tolerances are 5 standard errors of the sample size used."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as dl
from diffusion_jax import schedules

T = 1000


def make(mean='eps', var='fixed_small', loss='mse', T=T, schedule='linear'):
    return dl.GaussianDiffusion(schedules.get_beta_schedule(schedule, T), mean, var, loss)


def test_constants_match_their_definitions():
    d = make()
    b = schedules.get_beta_schedule('linear', T)
    abar = np.cumprod(1 - b)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-14)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.posterior_variance[1:], b[1:] * (1 - abar[:-1]) / (1 - abar[1:]))
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(np.log(d.posterior_variance[1]))
    with pytest.raises(AttributeError, match='immutable'):
        d.betas = b


def test_q_sample_moments_monte_carlo():
    d = make()
    n = 200_000
    x0 = jnp.full((n, 1), 0.7)
    key = jax.random.key(0)
    for t_int in (0, 100, 500, 999):
        t = jnp.full((n,), t_int, jnp.int32)
        x_t = np.asarray(d.q_sample(x0, t, jax.random.normal(jax.random.fold_in(key, t_int), x0.shape)))
        abar = d.alphas_cumprod[t_int]
        var = 1 - abar
        assert abs(x_t.mean() - math.sqrt(abar) * 0.7) < 5 * math.sqrt(var / n)
        assert abs(x_t.var() - var) < 5 * var * math.sqrt(2 / n)
    mean, variance, log_var = d.q_mean_variance(x0[:2], jnp.array([3, 7], jnp.int32))
    np.testing.assert_allclose(variance[:, 0], 1 - d.alphas_cumprod[[3, 7]], rtol=1e-6)
    np.testing.assert_allclose(log_var, np.log(variance), rtol=1e-5)


def test_composing_single_steps_matches_closed_form_marginal():
    """x_t built by t steps of q(x_s|x_{s-1}) has the law of q(x_t|x_0) (KS test and moments)."""
    d = make(T=100)
    n, t_end = 50_000, 60
    x = jnp.full((n,), -0.4)
    key = jax.random.key(1)
    for s in range(t_end):
        beta = d.betas[s]
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * jax.random.normal(jax.random.fold_in(key, s), (n,))
    abar = d.alphas_cumprod[t_end - 1]
    x = np.asarray(x)
    assert abs(x.mean() + 0.4 * math.sqrt(abar)) < 5 * math.sqrt((1 - abar) / n)
    assert abs(x.var() - (1 - abar)) < 5 * (1 - abar) * math.sqrt(2 / n)
    p = stats.kstest(x, stats.norm(-0.4 * math.sqrt(abar), math.sqrt(1 - abar)).cdf).pvalue
    assert p > 1e-4


def test_posterior_equals_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), both Gaussian: precision-weighted."""
    d = make()
    ts = np.array([1, 2, 10, 300, 999])
    x0 = jnp.asarray(np.linspace(-0.9, 0.9, 5)[:, None])
    x_t = jnp.asarray(np.linspace(1.5, -2.0, 5)[:, None])
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, jnp.asarray(ts, jnp.int32))
    abar_prev, alpha, beta = d.alphas_cumprod[ts - 1], 1 - d.betas[ts], d.betas[ts]
    prec = 1 / (1 - abar_prev) + alpha / beta
    bayes_var = 1 / prec
    bayes_mean = bayes_var * (np.sqrt(abar_prev) * np.asarray(x0[:, 0]) / (1 - abar_prev)
                              + np.sqrt(alpha) * np.asarray(x_t[:, 0]) / beta)
    np.testing.assert_allclose(var[:, 0], bayes_var, rtol=1e-5)
    np.testing.assert_allclose(mean[:, 0], bayes_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_var[:, 0], np.log(bayes_var), rtol=1e-5)
    # At t = 0 the posterior is the point mass at x_0.
    m0, v0, _ = d.q_posterior_mean_variance(x0[:1], x_t[:1], jnp.zeros((1,), jnp.int32))
    assert float(m0[0, 0]) == pytest.approx(float(x0[0, 0]), abs=1e-6) and float(v0[0, 0]) == 0


def test_eps_x0_v_parameterisations_give_the_same_mean():
    key = jax.random.key(2)
    x0 = jax.random.uniform(key, (6, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 1, 50, 400, 800, 999], jnp.int32)
    d_eps, d_x0, d_v = make('eps'), make('x0'), make('v')
    x_t = d_eps.q_sample(x0, t, eps)
    outs = [d.p_mean_variance(o, x_t, t, clip_denoised=False) for d, o in
            ((d_eps, eps), (d_x0, x0), (d_v, d_v.predict_v(x0, t, eps)))]
    for out in outs[1:]:
        np.testing.assert_allclose(out['mean'], outs[0]['mean'], atol=2e-4)
        np.testing.assert_allclose(out['pred_x0'], x0, atol=2e-3)
    # DDPM eq. 11: μ_θ = (x_t - β_t/√(1-ᾱ_t) ε)/√α_t, for t >= 1.
    tn = np.asarray(t)[1:]
    beta = d_eps.betas[tn].reshape(-1, 1, 1, 1)
    eq11 = (np.asarray(x_t)[1:] - beta / np.sqrt(1 - d_eps.alphas_cumprod[tn]).reshape(-1, 1, 1, 1)
            * np.asarray(eps)[1:]) / np.sqrt(1 - beta)
    np.testing.assert_allclose(outs[0]['mean'][1:], eq11, atol=1e-4)
    # ε <-> x0 <-> v round trips.
    np.testing.assert_allclose(d_eps.predict_eps_from_x0(x_t, t, x0)[1:], eps[1:], atol=2e-3)
    v = d_v.predict_v(x0, t, eps)
    np.testing.assert_allclose(d_v.predict_eps_from_v(x_t, t, v), eps, atol=1e-5)
    np.testing.assert_allclose(d_v.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)


def test_variance_types():
    x_t = jnp.zeros((3, 2, 2, 1))
    t = jnp.array([0, 5, 999], jnp.int32)
    d = make(var='fixed_large', loss='mse')
    out = d.p_mean_variance(jnp.zeros_like(x_t), x_t, t)
    expect = np.array([d.posterior_variance[1], d.betas[5], d.betas[999]])
    np.testing.assert_allclose(out['variance'][:, 0, 0, 0], expect, rtol=1e-5)
    d = make(var='fixed_small', loss='mse')
    out = d.p_mean_variance(jnp.zeros_like(x_t), x_t, t)
    np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0],
                               d.posterior_log_variance_clipped[[0, 5, 999]], rtol=1e-5)
    d = make(var='learned_range', loss='hybrid')
    for v, expect in ((-1.0, d.posterior_log_variance_clipped[[0, 5, 999]]),
                      (1.0, np.log(d.betas[[0, 5, 999]]))):
        out = d.p_mean_variance(jnp.concatenate([x_t, jnp.full_like(x_t, v)], -1), x_t, t)
        np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], expect, rtol=1e-5)
    d = make(var='learned', loss='hybrid')
    out = d.p_mean_variance(jnp.concatenate([x_t, jnp.full_like(x_t, -3.0)], -1), x_t, t)
    np.testing.assert_allclose(out['log_variance'], -3.0)


def test_normal_kl_zero_and_monte_carlo():
    assert float(dl.normal_kl(0.3, -1.0, 0.3, -1.0)) == pytest.approx(0.0, abs=1e-7)
    m1, lv1, m2, lv2 = 0.4, math.log(0.5), -0.2, math.log(1.7)
    n = 400_000
    x = m1 + math.sqrt(0.5) * np.random.default_rng(0).standard_normal(n)
    log_ratio = stats.norm(m1, math.sqrt(0.5)).logpdf(x) - stats.norm(m2, math.sqrt(1.7)).logpdf(x)
    kl = float(dl.normal_kl(m1, lv1, m2, lv2))
    assert abs(log_ratio.mean() - kl) < 5 * log_ratio.std() / math.sqrt(n)


@pytest.mark.parametrize('mean', [-1.3, -0.5, 0.0, 0.77, 1.0])
@pytest.mark.parametrize('log_scale', [math.log(1e-3), math.log(0.05), 0.0])
def test_decoder_probabilities_sum_to_one(mean, log_scale):
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    ll = dl.discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    assert float(jnp.sum(jnp.exp(ll))) == pytest.approx(1.0, abs=2e-5)


def test_decoder_matches_exact_bin_probability_for_wide_gaussian():
    # Within 2σ of the mean the tanh CDF approximation is within 1e-2 of the exact log bin
    # probability (~1e-5 at the centre; it degrades in the far tails).
    x = jnp.arange(52, 204, dtype=jnp.float32) / 127.5 - 1.0
    ll = dl.discretized_gaussian_log_likelihood(x, jnp.zeros_like(x), jnp.full_like(x, math.log(0.3)))
    exact = np.log(stats.norm.cdf((np.asarray(x) + 1 / 255) / 0.3) - stats.norm.cdf((np.asarray(x) - 1 / 255) / 0.3))
    np.testing.assert_allclose(ll, exact, atol=1e-2)
    np.testing.assert_allclose(ll[70:82], exact[70:82], atol=1e-4)


def test_prior_bpd_closed_form():
    d = make()
    x0 = jnp.asarray(np.linspace(-1, 1, 8).reshape(2, 4))
    abar = d.alphas_cumprod[-1]
    per_dim = 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + abar * np.asarray(x0) ** 2) / math.log(2)
    np.testing.assert_allclose(d.prior_bpd(x0), per_dim.mean(1), rtol=1e-4)


def _quantize(x):
    return np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1


def test_bound_of_optimal_denoiser_on_gaussian_data():
    """For x0 ~ N(μ, σ²) per dimension the reverse process q(x_{t-1}|x_t) is Gaussian in closed form:
    E[x0|x_t] = √ᾱ μ + √ᾱσ²(x_t - √ᾱ μ)/(ᾱσ² + 1 - ᾱ), Var[x0|x_t] = σ²(1-ᾱ)/(ᾱσ² + 1 - ᾱ), and
    Var[x_{t-1}|x_t] = β̃_t + c1_t² Var[x0|x_t]. A 'learned' model that outputs exactly these has a
    bound that lies above the exact entropy of the discretized data (cross-entropy >= entropy) and
    close to it; a fixed variance is a worse model, so its bound is higher still."""
    mu, sigma = 0.1, 0.3
    d = make(var='learned', loss='kl')
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(_quantize(mu + sigma * rng.standard_normal((128, 4, 4, 1))), jnp.float32)
    abar_all = jnp.asarray(d.alphas_cumprod, jnp.float32)
    post_var = jnp.asarray(d.posterior_variance, jnp.float32)
    coef1 = jnp.asarray(d.posterior_mean_coef1, jnp.float32)
    s2 = sigma**2 + (1 / 127.5) ** 2 / 12  # + variance of the rounding

    def eps_fn(x_t, t):
        abar = abar_all[t][:, None, None, None]
        return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s2 + 1 - abar)

    def model_fn(x_t, t):
        abar = abar_all[t][:, None, None, None]
        var_x0 = s2 * (1 - abar) / (abar * s2 + 1 - abar)
        var = post_var[t][:, None, None, None] + coef1[t][:, None, None, None] ** 2 * var_x0
        return jnp.concatenate([eps_fn(x_t, t), jnp.log(var) * jnp.ones_like(x_t)], -1)

    out = jax.jit(lambda x, k: d.calc_bpd_loop(model_fn, x, k))(x0, jax.random.key(4))
    total = np.asarray(out['total_bpd'])
    edges = (np.arange(1, 256) - 0.5) / 127.5 - 1  # bin boundaries of the 256 levels
    cdf = np.concatenate([[0.0], stats.norm.cdf((edges - mu) / sigma), [1.0]])
    p = np.diff(cdf)
    entropy_bits = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    se = total.std() / math.sqrt(total.size)
    assert total.mean() > entropy_bits - 5 * se
    assert total.mean() - entropy_bits < 0.05, (total.mean(), entropy_bits)
    np.testing.assert_allclose(out['vb'].sum(1) + out['prior_bpd'], out['total_bpd'], rtol=1e-5)
    assert out['vb'].shape == (128, T) and out['mse'].shape == (128, T)
    # The ε-MSE of the optimal predictor at t is its posterior variance 1 - (1-ᾱ)/(ᾱσ²+1-ᾱ).
    abar = d.alphas_cumprod[500]
    expect = 1 - (1 - abar) / (abar * s2 + 1 - abar)
    assert float(out['mse'][:, 500].mean()) == pytest.approx(expect, rel=0.15)
    # The same mean with DDPM's fixed variances gives a looser bound.
    for var_type in ('fixed_small', 'fixed_large'):
        fixed = make(var=var_type).calc_bpd_loop(eps_fn, x0, jax.random.key(4))['total_bpd']
        gap = np.asarray(fixed) - total  # paired on the same x0 and noise
        assert gap.mean() > 5 * gap.std() / math.sqrt(gap.size)


def test_vb_terms_match_independent_kl_and_decoder():
    d = make(var='fixed_large')
    key = jax.random.key(5)
    x0 = jnp.asarray(_quantize(np.random.default_rng(6).uniform(-1, 1, (4, 3))), jnp.float32)
    t = jnp.array([0, 3, 200, 999], jnp.int32)
    noise = jax.random.normal(key, x0.shape)
    x_t = d.q_sample(x0, t, noise)
    model_eps = 0.5 * noise
    out = d.vb_terms_bpd(model_eps, x0, x_t, t)['output']
    tn = np.asarray(t)
    for i in (1, 2, 3):
        true_m, _, true_lv = (np.asarray(a[i]) for a in d.q_posterior_mean_variance(x0, x_t, t))
        pred_x0 = np.asarray(d.predict_x0_from_eps(x_t, t, model_eps)[i])
        ti = tn[i]
        model_m = (d.posterior_mean_coef1[ti] * pred_x0 + d.posterior_mean_coef2[ti] * np.asarray(x_t[i]))
        model_v = d.betas[ti]
        kl = 0.5 * (np.log(model_v) - true_lv + np.exp(true_lv) / model_v + (true_m - model_m) ** 2 / model_v - 1)
        assert float(out[i]) == pytest.approx(kl.mean() / math.log(2), rel=1e-3)
    # t = 0: the decoder NLL with variance β̃_1 (fixed_large at t = 0).
    mv = d.p_mean_variance(model_eps[:1], x_t[:1], t[:1], clip_denoised=False)
    nll = -dl.discretized_gaussian_log_likelihood(x0[:1], mv['mean'], 0.5 * mv['log_variance'])
    assert float(out[0]) == pytest.approx(float(nll.mean()) / math.log(2), rel=1e-5)


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_mse_loss_formula(mean_type):
    d = make(mean=mean_type)
    key = jax.random.key(7)
    x0 = jax.random.uniform(key, (3, 2, 2, 2), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 10, 900], jnp.int32)
    c = 0.25
    out = d.training_losses(lambda x_t, tt: jnp.full_like(x_t, c), x0, t, noise)
    target = {'eps': noise, 'x0': x0, 'v': d.predict_v(x0, t, noise)}[mean_type]
    np.testing.assert_allclose(out['loss'], np.mean((np.asarray(target) - c) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)


def test_kl_rescaled_kl_and_hybrid_losses():
    key = jax.random.key(8)
    x0 = jnp.asarray(_quantize(np.random.default_rng(9).uniform(-1, 1, (4, 2, 2, 1))), jnp.float32)
    noise = jax.random.normal(key, x0.shape)
    t = jnp.array([0, 1, 250, 999], jnp.int32)
    theta = jax.random.normal(jax.random.fold_in(key, 2), (4, 2, 2, 2)) * 0.3
    model_fn = lambda x_t, tt: theta
    kl_d = make(var='learned_range', loss='kl')
    x_t = kl_d.q_sample(x0, t, noise)
    direct = kl_d.vb_terms_bpd(theta, x0, x_t, t)['output']
    np.testing.assert_allclose(kl_d.training_losses(model_fn, x0, t, noise)['loss'], direct, rtol=1e-6)
    rk = make(var='learned_range', loss='rescaled_kl').training_losses(model_fn, x0, t, noise)
    np.testing.assert_allclose(rk['loss'], T * direct, rtol=1e-6)
    hy = make(var='learned_range', loss='hybrid').training_losses(model_fn, x0, t, noise)
    mse = np.mean((np.asarray(noise) - np.asarray(theta[..., :1])) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(hy['mse'], mse, rtol=1e-5)
    np.testing.assert_allclose(hy['loss'], mse + T / 1000 * np.asarray(direct), rtol=1e-5)


def test_hybrid_vb_term_trains_only_the_variance():
    d = make(var='learned_range', loss='hybrid')
    key = jax.random.key(10)
    x0 = jax.random.uniform(key, (4, 2, 2, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 3, 300, 900], jnp.int32)
    theta = jnp.concatenate([noise * 0.5, jnp.zeros_like(noise)], -1)
    grad_vb = jax.grad(lambda th: d.training_losses(lambda a, b: th, x0, t, noise)['vb'].sum())(theta)
    assert float(jnp.abs(grad_vb[..., 0]).max()) == 0.0
    assert float(jnp.abs(grad_vb[..., 1]).max()) > 0.0
    grad_mse = jax.grad(lambda th: d.training_losses(lambda a, b: th, x0, t, noise)['mse'].sum())(theta)
    assert float(jnp.abs(grad_mse[..., 1]).max()) == 0.0


def test_model_sees_original_timesteps_after_respacing():
    d = make().respace([0, 250, 500, 750, 999])
    seen = []

    def model_fn(x_t, t):
        seen.append(t)
        return jnp.zeros_like(x_t)

    d.training_losses(model_fn, jnp.zeros((2, 3)), jnp.array([1, 4], jnp.int32), jnp.ones((2, 3)))
    np.testing.assert_array_equal(seen[0], [250, 999])


def test_diffusion_is_a_pytree_usable_under_jit():
    d = make(var='learned_range', loss='hybrid')
    leaves, treedef = jax.tree.flatten(d)
    assert len(leaves) > 5
    d2 = jax.tree.unflatten(treedef, leaves)
    assert d2.loss_type == 'hybrid' and d2.num_timesteps == T
    x0 = jnp.ones((2, 3)) * 0.3
    t = jnp.array([5, 600], jnp.int32)
    inside = jax.jit(lambda dd, x: dd.q_sample(x, t, x))(d, x0)
    np.testing.assert_allclose(inside, d.q_sample(x0, t, x0), rtol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(model_mean_type='epsilon'), "model_mean_type='epsilon'.*eps, x0, v"),
    (dict(model_var_type='big'), 'fixed_small, fixed_large, learned, learned_range'),
    (dict(loss_type='l1'), 'mse, kl, rescaled_kl, hybrid'),
    (dict(model_var_type='learned_range', loss_type='mse'), "loss_type='hybrid'"),
    (dict(model_var_type='fixed_small', loss_type='hybrid'), 'learned'),
])
def test_invalid_arguments_raise(kwargs, match):
    args = dict(model_mean_type='eps', model_var_type='fixed_small', loss_type='mse')
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 10, beta_end=0.1), **args)


def test_wrong_output_channels_is_an_error():
    d = make(var='learned_range', loss='hybrid')
    with pytest.raises(AssertionError):
        d.p_mean_variance(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32))
