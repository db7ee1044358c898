"""Respaced schedules: step sets, marginals preserved, identity when all steps are kept."""
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import respace, schedules


# improved-diffusion's space_timesteps (respace.py), worked through by hand: per section of
# `size` steps, frac_stride = (size-1)/(count-1), cur_idx = 0.0, count times: take
# start + round(cur_idx) (Python's round), then cur_idx += frac_stride. The sum of floats lands
# just below the exact .5 ties: T=1000, N=21: ten strides of 49.95 sum to 499.49999999999994
# -> 499 (i(T-1)/(N-1) = 499.5 -> 500); N=27 likewise at 13 x 38.423...; '10,15,20' at
# 100 + 7 x 99/14 -> 149 (exactly 149.5 -> 150).
IMPROVED_DIFFUSION = {
    (1000, '21'): [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749,
                   799, 849, 899, 949, 999],
    (1000, '27'): [0, 38, 77, 115, 154, 192, 231, 269, 307, 346, 384, 423, 461, 499, 538, 576,
                   615, 653, 692, 730, 768, 807, 845, 884, 922, 961, 999],
    (300, '10,15,20'): [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107, 114, 121, 128, 135, 142,
                        149, 157, 164, 171, 178, 185, 192, 199, 200, 205, 210, 216, 221, 226,
                        231, 236, 242, 247, 252, 257, 263, 268, 273, 278, 283, 289, 294, 299],
}


@pytest.mark.parametrize('T, spec', sorted(IMPROVED_DIFFUSION))
def test_even_spacing_equals_improved_diffusion_at_exact_ties(T, spec):
    assert respace.space_timesteps(T, spec) == IMPROVED_DIFFUSION[T, spec]
    if ',' not in spec:
        assert respace.space_timesteps(T, int(spec)) == IMPROVED_DIFFUSION[T, spec]


def test_space_timesteps_forms():
    assert respace.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
    assert respace.space_timesteps(1000, 'ddim1000') == list(range(1000))
    assert respace.space_timesteps(300, '10,15,20') == IMPROVED_DIFFUSION[300, '10,15,20']
    steps = respace.space_timesteps(1000, 25)
    assert len(steps) == 25 and steps[0] == 0 and steps[-1] == 999


@pytest.mark.parametrize('bad', ['ddimx', '10,abc', '2000', 'ddim0', 'trailing0', 'karras',
                                 'logsnr2000', 'cosine20', '10,,20'])
def test_space_timesteps_errors_list_the_valid_forms(bad):
    with pytest.raises(ValueError, match=r"sampling.num_steps=.*valid forms: .*'trailingN', "
                                         r"'logsnrN', 'karrasN'"):
        respace.space_timesteps(1000, bad, alphas_cumprod=np.linspace(0.99, 0.01, 1000))


def test_empty_spec_keeps_every_step():
    assert respace.space_timesteps(7, '') == list(range(7))


# improved-diffusion's ddimN rule, worked out by hand: the first stride s = 1, 2, … with
# len(range(0, T, s)) = N.
@pytest.mark.parametrize('T,N,expected', [
    (10, 3, [0, 4, 8]),            # s=1: 10, s=2: 5, s=3: 4, s=4: 3
    (10, 4, [0, 3, 6, 9]),         # s=3: 4
    (7, 3, [0, 3, 6]),             # s=3: ceil(7/3) = 3
    (1000, 30, list(range(0, 1000, 34))),  # s=33: 31 elements, s=34: 30
    (1000, 50, list(range(0, 1000, 20))),
    (200, 200, list(range(200))),
])
def test_ddim_rule_by_hand(T, N, expected):
    assert respace.space_timesteps(T, f'ddim{N}') == expected


@pytest.mark.parametrize('T,N', [(10, 6), (100, 30), (200, 150)])
def test_ddim_rule_raises_when_no_stride_gives_n(T, N):
    # (10, 6): s=1 gives 10, s=2 gives 5; (100, 30): s=3 gives 34, s=4 gives 25.
    with pytest.raises(ValueError, match=f'no integer stride gives exactly {N} steps'):
        respace.space_timesteps(T, f'ddim{N}')


def test_ddim_rule_properties_for_many_t_and_n():
    """For every T ≤ 120 and N in [2, T]: a stride s exists iff (N-1)·⌈T/N⌉ < T (then
    (N-1)s < T ≤ Ns holds for s = ⌈T/N⌉); the steps are 0, s, …, (N-1)s with that smallest s."""
    checked = 0
    for T in range(2, 121):
        for N in range(2, T + 1):
            s = -(-T // N)
            if (N - 1) * s < T:
                steps = respace.space_timesteps(T, f'ddim{N}')
                assert steps == [i * s for i in range(N)], (T, N)
                assert s == 1 or len(range(0, T, s - 1)) > N  # the smaller stride overshoots
                checked += 1
            else:
                with pytest.raises(ValueError):
                    respace.space_timesteps(T, f'ddim{N}')
    assert checked == 1575  # of the 7,140 (T, N) pairs; the rest raise


@pytest.mark.parametrize('T,N,expected', [
    (10, 3, [2, 6, 9]),     # round(10/3) - 1, round(20/3) - 1, 10 - 1
    (10, 4, [1, 4, 7, 9]),  # 2.5 -> 2 and 7.5 -> 8 (half to even), minus 1
    (1000, 10, list(range(99, 1000, 100))),
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_trailing_by_hand(T, N, expected):
    assert respace.space_timesteps(T, f'trailing{N}') == expected


def test_linspace_equals_the_even_form_and_numpy_linspace():
    for T, N in ((1000, 20), (200, 7), (10, 10), (1000, 21)):
        steps = respace.space_timesteps(T, f'linspace{N}')
        if (T, N) != (1000, 21):  # the tie: numpy's linspace gives 499.5 -> 500 there
            assert steps == respace.space_timesteps(T, str(N))
        assert steps == [int(v) for v in np.round(np.linspace(0, T - 1, N))]


def test_logsnr_and_karras_by_hand():
    # ᾱ = 0.9, 0.5, 0.1, 0.01: λ = ½ log(ᾱ/(1-ᾱ)) = 1.0986, 0, -1.0986, -2.2976 and
    # σ = √((1-ᾱ)/ᾱ) = 1/3, 1, 3, 9.95.
    abar = np.array([0.9, 0.5, 0.1, 0.01])
    # λ targets -2.2976, -0.5995, 1.0986: the middle one is 0.499 from λ_2 and 0.600 from λ_1.
    assert respace.space_timesteps(4, 'logsnr3', alphas_cumprod=abar) == [0, 2, 3]
    # σ targets 9.95, ((9.95^(1/7) + (1/3)^(1/7))/2)^7 = 2.233, 1/3: nearest σ are 3 then 1/3.
    assert respace.space_timesteps(4, 'karras3', alphas_cumprod=abar) == [0, 2, 3]
    # Where λ and σ disagree: σ_1 = 1.3, σ_2 = 2.9 (ᾱ = 1/(1+σ²)) put λ_1 = -0.262 and
    # λ_2 = -1.065 at 0.337 and 0.465 from -0.5995, but σ_1 and σ_2 at 0.933 and 0.667 from 2.233.
    abar = np.array([0.9, 1 / 2.69, 1 / 9.41, 0.01])
    assert respace.space_timesteps(4, 'logsnr3', alphas_cumprod=abar) == [0, 1, 3]
    assert respace.space_timesteps(4, 'karras3', alphas_cumprod=abar) == [0, 2, 3]


def _nearest(levels, target):
    return int(np.argmin(np.abs(levels - target)))


@pytest.mark.parametrize('name,T', [('linear', 1000), ('cosine', 1000), ('linear', 200)])
@pytest.mark.parametrize('N', [5, 10, 20, 50])
def test_logsnr_and_karras_properties(name, T, N):
    """Exactly N distinct steps, both ends kept; where no two levels collide each step is the
    nearest discrete level to its target (λ uniform; σ on Karras' ρ = 7 grid)."""
    betas = (schedules.get_beta_schedule(name, T) if T == 1000 else
             schedules.get_beta_schedule(name, T, beta_start=5e-4, beta_end=0.1))
    abar = np.cumprod(1 - betas)
    lam = 0.5 * np.log(abar / (1 - abar))
    sigma = np.sqrt((1 - abar) / abar)
    i = np.arange(N) / (N - 1)
    targets = {'logsnr': (lam, np.linspace(lam[-1], lam[0], N)),
               'karras': (sigma, (sigma[-1] ** (1 / 7) + i * (sigma[0] ** (1 / 7)
                                                               - sigma[-1] ** (1 / 7))) ** 7)}
    for kind, (levels, target) in targets.items():
        steps = respace.space_timesteps(T, f'{kind}{N}', alphas_cumprod=abar)
        assert len(steps) == N and steps == sorted(set(steps)), kind
        assert steps[0] == 0 and steps[-1] == T - 1, kind
        nearest = sorted(_nearest(levels, v) for v in target)
        if len(set(nearest)) == N:
            assert steps == nearest, kind
        else:  # collisions only where the targets are denser than the levels: consecutive steps
            moved = [s for s, n in zip(steps, nearest) if s != n]
            assert moved and all(s - 1 in steps or s + 1 in steps for s in moved), kind


def test_snap_to_levels_pushes_collisions_apart():
    levels = np.arange(10.0)
    assert respace.snap_to_levels(levels, [0.0, 0.1, 0.2, 5.0]) == [0, 1, 2, 5]
    assert respace.snap_to_levels(levels, [9.0, 9.0, 8.9, 0.0]) == [0, 7, 8, 9]


def test_schedule_spacings_need_the_schedule_and_finite_levels():
    with pytest.raises(ValueError, match='needs the schedule'):
        respace.space_timesteps(100, 'logsnr10')
    zero_snr = np.cumprod(1 - schedules.rescale_zero_terminal_snr(
        schedules.get_beta_schedule('linear', 100, beta_end=0.1)))
    with pytest.raises(ValueError, match='zero terminal SNR.*trailing10'):
        respace.space_timesteps(100, 'karras10', alphas_cumprod=zero_snr)
    assert respace.space_timesteps(100, 'trailing10')[-1] == 99


def test_respaced_passes_the_schedule():
    from diffusion_jax import generate  # pylint: disable=import-outside-toplevel
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('cosine', 1000), 'eps', 'fixed_large',
                             'mse')
    assert generate.respaced is respace.respaced  # the old name
    r = respace.respaced(d, 'karras20')
    expected = respace.space_timesteps(1000, 'karras20', alphas_cumprod=d.alphas_cumprod)
    np.testing.assert_array_equal(r.timestep_map, expected)
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[expected], rtol=1e-6)
    assert respace.respaced(d, '') is d


def test_respacing_all_steps_reproduces_the_original_exactly():
    for name in ('linear', 'cosine'):
        d = dl.GaussianDiffusion(schedules.get_beta_schedule(name, 1000), 'eps', 'fixed_large', 'mse')
        r = d.respace(range(1000))
        for field in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_mean_coef1',
                      'posterior_log_variance_clipped', 'timestep_map'):
            np.testing.assert_array_equal(getattr(r, field), getattr(d, field), err_msg=field)


def test_respacing_keeps_marginals_and_maps_timesteps():
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('cosine', 4000), 'v', 'learned_range',
                             'hybrid')
    kept = respace.space_timesteps(4000, '10,20,30')
    r = d.respace(kept)
    assert r.num_timesteps == len(kept) and r.model_var_type == 'learned_range'
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-9)
    np.testing.assert_array_equal(r.timestep_map, kept)
    # Respacing a respaced diffusion composes the maps.
    rr = r.respace([0, 5, 59])
    np.testing.assert_array_equal(rr.timestep_map, np.asarray(kept)[[0, 5, 59]])
    # β' = 1 - ᾱ_t/ᾱ_s and back through ∏(1 - β') loses a few digits where ᾱ ~ 1e-10.
    np.testing.assert_allclose(rr.alphas_cumprod, d.alphas_cumprod[np.asarray(kept)[[0, 5, 59]]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match='use_timesteps'):
        d.respace([4000])


def test_the_model_wrapper_sends_respaced_steps_to_trained_timesteps():
    """wrap_model is the one map from a chain's indices to the network's time input: the
    original timesteps of a (twice) respaced chain, and the continuous ODE's interpolated ones."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from diffusion_jax.evaluation import likelihood  # pylint: disable=import-outside-toplevel
    d = dl.GaussianDiffusion(schedules.get_beta_schedule('linear', 100), 'eps', 'fixed_large', 'mse')
    r = d.respace(range(0, 100, 10)).respace([1, 4, 9])
    seen = dl.wrap_model(lambda x, t: t, r)(None, jnp.array([0, 1, 2, 2]))
    np.testing.assert_array_equal(seen, [10, 40, 90, 90])
    sde = likelihood.ContinuousVP.from_diffusion(r)
    taus = jnp.array([1.0, 2.0, 2.5, 3.0])  # knots τ_k = k + 1, and half way between two
    np.testing.assert_allclose(dl.wrap_model(lambda x, t: t, sde)(None, taus), [10, 40, 65, 90])
