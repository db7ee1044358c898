"""dpmpp_2m, dpmpp_3m and unipc against diffusers' DPMSolverMultistepScheduler (solver_order 2
and 3) and UniPCMultistepScheduler, step for step.

Truth: diffusers' schedulers (the `torch` extra) driving the exact ε of Gaussian data N(μ, s² I)
written in torch, ε*(x, t) = √(1-ᾱ_t)(x - √ᾱ_t μ)/(ᾱ_t s² + 1 - ᾱ_t), on the T = 1000 linear
schedule given to diffusers as `trained_betas`. Our chain runs on the same timesteps (those
diffusers' own set_timesteps returns, respaced into our GaussianDiffusion), from the same x_T,
with the jax ε of the same formula; every intermediate x_t (x after each of the K steps) is
compared (ε prediction; v and x0 at K = 10). The diffusers settings that equal our defaults are
DIFFUSERS_SETTINGS (docs/samplers.md lists them). diffusers computes in float32 (its step()
casts the sample to float32), as our solvers do: the measured difference is at most 9.4e-7
relative per intermediate x_t (2-core CPU); the bound 1e-5 is float32 rounding over 20 steps
with room, while one step of another order moves x_t by 4e-3 to 7e-3 relative (dpmpp_3m's
penultimate step at K = 20 before it followed diffusers' lower_order_final: 6.5e-3).
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from diffusion_jax import respace, samplers
from test_samplers import BASE, MU, S2, T, _abar, gaussian_eps, gaussian_model
from test_samplers_ztsnr import gaussian_v

pytestmark = pytest.mark.usefixtures('fast_compiles')

# diffusers' options, set explicitly to what our samplers do by default (the defaults of
# diffusers 0.42.1 too, except solver_order=3 for 3M and the spacing, chosen per test).
COMMON = dict(num_train_timesteps=T, thresholding=False, lower_order_final=True,
              final_sigmas_type='zero', rescale_betas_zero_snr=False, use_karras_sigmas=False)
DIFFUSERS_SETTINGS = {
    'dpmpp_2m': ('DPMSolverMultistepScheduler', dict(COMMON, solver_order=2,
                                                     algorithm_type='dpmsolver++',
                                                     solver_type='midpoint',
                                                     euler_at_final=False)),
    'dpmpp_3m': ('DPMSolverMultistepScheduler', dict(COMMON, solver_order=3,
                                                     algorithm_type='dpmsolver++',
                                                     solver_type='midpoint',
                                                     euler_at_final=False)),
    'unipc': ('UniPCMultistepScheduler', dict(COMMON, solver_order=2, solver_type='bh2',
                                              predict_x0=True, disable_corrector=[])),
}
PREDICTION = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
RTOL = 1e-5  # relative L2 difference of each intermediate x_t (measured ≤ 9.4e-7)


def _scheduler(method, spacing, num_steps, mean_type='eps'):
    import diffusers  # pylint: disable=import-outside-toplevel
    name, settings = DIFFUSERS_SETTINGS[method]
    sched = getattr(diffusers, name)(trained_betas=np.asarray(BASE.betas),
                                     prediction_type=PREDICTION[mean_type],
                                     timestep_spacing=spacing, **settings)
    sched.set_timesteps(num_steps)
    return sched


def _torch_model(mean_type):
    import torch  # pylint: disable=import-outside-toplevel
    abar_table = torch.tensor(np.asarray(BASE.alphas_cumprod), dtype=torch.float64)
    mu = torch.tensor(MU, dtype=torch.float64)

    def model(x, t):
        a = abar_table[t]
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * S2 + 1 - a)
        if mean_type == 'eps':
            return eps
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        if mean_type == 'x0':
            return x0
        return torch.sqrt(a) * eps - torch.sqrt(1 - a) * x0  # v = α ε - σ x0
    return model


def gaussian_x0(tables, mu, s2, x_t, t):
    """x̂_0* = (x_t - √(1-ᾱ) ε*)/√ᾱ of N(μ, s² I) data (the jax model of prediction 'x0')."""
    abar, one_minus = _abar(tables, t, x_t)
    return (x_t - jnp.sqrt(one_minus) * gaussian_eps(tables, mu, s2, x_t, t)) / jnp.sqrt(abar)


def diffusers_chain(sched, x_T, mean_type='eps'):
    """[K, B, D] float64: diffusers' x after each step (its prev_sample), from x_T."""
    import torch  # pylint: disable=import-outside-toplevel
    model, x, out = _torch_model(mean_type), torch.tensor(x_T, dtype=torch.float64), []
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), t, x).prev_sample
        out.append(x.double().numpy())
    return np.stack(out)


def our_chain(method, diffusion, x_T, mean_type='eps'):
    """[K, B, D] float64: our x after each of the K steps (reverse_from stops at every level;
    the history starts at the first step, as in a whole chain)."""
    k = diffusion.num_timesteps
    model = gaussian_model(fn={'eps': gaussian_eps, 'v': gaussian_v, 'x0': gaussian_x0}[mean_type])
    x = jnp.asarray(x_T, jnp.float32)
    return np.stack([np.asarray(samplers.reverse_from(
        diffusion, model, jax.random.key(0), x, k - 1, stop=stop, method=method,
        clip_denoised=False), np.float64) for stop in range(k - 1, -1, -1)])


X_T = np.asarray(jax.random.normal(jax.random.key(3), (32, MU.size)), np.float64)


def _relative(ours, theirs):
    k = len(theirs)
    return (np.linalg.norm((ours - theirs).reshape(k, -1), axis=1)
            / np.linalg.norm(theirs.reshape(k, -1), axis=1))


@pytest.mark.parametrize('num_steps', [10, 20])
@pytest.mark.parametrize('method', list(DIFFUSERS_SETTINGS))
def test_every_step_equals_diffusers_on_trailing_steps(method, num_steps):
    sched = _scheduler(method, 'trailing', num_steps)
    # Our spelling 'trailingK' keeps exactly diffusers' timestep_spacing='trailing' steps.
    diffusion = respace.respaced(BASE, f'trailing{num_steps}')
    np.testing.assert_array_equal(np.asarray(diffusion.timestep_map)[::-1],
                                  sched.timesteps.numpy())
    rel = _relative(our_chain(method, diffusion, X_T), diffusers_chain(sched, X_T))
    assert rel.max() < RTOL, (method, num_steps, rel)


@pytest.mark.parametrize('num_steps', [10, 20])
@pytest.mark.parametrize('method', ['dpmpp_3m', 'unipc'])
def test_every_step_equals_diffusers_on_linspace_steps(method, num_steps):
    """diffusers' default spacing ('linspace': round(linspace(0, T-1, K+1)) without t = 0, then
    σ = 0): no spelling of ours keeps exactly these steps, so the chain is respaced to them."""
    sched = _scheduler(method, 'linspace', num_steps)
    diffusion = BASE.respace(set(int(t) for t in sched.timesteps))
    rel = _relative(our_chain(method, diffusion, X_T), diffusers_chain(sched, X_T))
    assert rel.max() < RTOL, (method, num_steps, rel)


@pytest.mark.parametrize('mean_type', ['v', 'x0'])
@pytest.mark.parametrize('method', ['dpmpp_3m', 'unipc'])
def test_v_and_x0_prediction_equal_diffusers(method, mean_type):
    sched = _scheduler(method, 'trailing', 10, mean_type=mean_type)
    diffusion = respace.respaced(BASE.replace(model_mean_type=mean_type), 'trailing10')
    rel = _relative(our_chain(method, diffusion, X_T, mean_type),
                    diffusers_chain(sched, X_T, mean_type))
    assert rel.max() < RTOL, (method, rel)


def test_dpmpp_3m_lowers_its_penultimate_order_below_15_steps_only():
    """diffusers' lower_order_final applies below 15 steps: at K = 14 the penultimate step is
    second order, at K = 15 third order; the two choices differ by far more than RTOL there."""
    for k in (14, 15):
        sched = _scheduler('dpmpp_3m', 'trailing', k)
        diffusion = BASE.respace(set(int(t) for t in sched.timesteps))
        rel = _relative(our_chain('dpmpp_3m', diffusion, X_T), diffusers_chain(sched, X_T))
        assert rel.max() < RTOL, (k, rel)
