"""Negative log-likelihood bounds in bits per dimension (DDPM Table 1's NLL column).

The bound of DDPM eq. 5 for one image, in bits/dim:
    NLL(x0) ≤ L_T + Σ_{t=1}^{T-1} L_t + L_0,
with L_T = prior_bpd, L_t the KL terms and L_0 the discretized decoder (all from
GaussianDiffusion.calc_bpd_loop). Two estimators:

  full_bpd         every term: T network evaluations per image (exact bound, the published way).
  sampled_bpd      K timesteps per image drawn from p(t): Σ_t L_t ≈ (1/K) Σ_k L_{t_k}/p(t_k),
                   unbiased for any p > 0, with a standard error from the spread of the per-image
                   estimates; K ≪ T evaluations per image. p uniform gives (T/K) Σ_k L_{t_k};
                   importance_probs gives Nichol & Dhariwal's p(t) ∝ √E[L_t²] (eq. 18) from a
                   pilot batch's terms, which concentrates the K evaluations where L_t is large.

A third, `ode_bpd`, is not the bound but the exact likelihood of the probability-flow ODE's
density model (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 4.3 and
App. D.2; score_sde's likelihood.py), see its docstring.

All are pure functions of (diffusion, model_fn, x0, rng) that run under jit on a batch sharded
over the device mesh; `BpdAccumulator` streams a dataset split through them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes, timestep_sampling
from diffusion_jax.diffusion import wrap_model

# score_sde (likelihood.py, get_likelihood_fn): rtol = atol = 1e-5 with scipy's RK45
# (Dormand-Prince 5(4), diffrax's Dopri5) and a Rademacher Hutchinson probe.
ODE_RTOL = 1e-5
ODE_ATOL = 1e-5
ODE_SOLVERS = ('dopri5', 'tsit5', 'heun', 'euler')
HUTCHINSON = ('rademacher', 'gaussian', 'exact')
DEQUANTIZATION = ('uniform', 'none')
# eval.nll_estimator: full_bpd ('full'), sampled_bpd with uniform or importance p(t)
# ('sampled', 'importance'), ode_bpd ('ode').
ESTIMATORS = ('full', 'sampled', 'importance', 'ode')
# Vector-field evaluations per step of each solver: the explicit RK stages, less the one that
# first-same-as-last methods reuse from the previous step (plus one evaluation at the start).
_EVALS_PER_STEP = {'dopri5': 6, 'tsit5': 6, 'heun': 2, 'euler': 1}
_FSAL = {'dopri5': True, 'tsit5': True, 'heun': False, 'euler': False}
# 256 levels on [-1, 1]: a bin is 2/256 wide, so a density p(y) per dim becomes
# -log2 P(bin) ≈ -log2 p(y) - log2(2/256) = -log2 p(y) + 7 bits (score_sde's offset:
# log2 of the inverse scaler's gradient, 1/2, plus 8).
_BITS_PER_BIN_WIDTH = 7.0


def full_bpd(diffusion, model_fn, x0, rng, clip_denoised: bool = True):
    """Every term of the bound: dict(total, prior, decoder, kl_sum) each [B] bits/dim, and
    vb [B, T] (L_t per t)."""
    out = diffusion.calc_bpd_loop(model_fn, x0, rng, clip_denoised=clip_denoised)
    return dict(total=out['total_bpd'], prior=out['prior_bpd'], decoder=out['vb'][:, 0],
                kl_sum=jnp.sum(out['vb'][:, 1:], axis=1), vb=out['vb'])


def importance_probs(vb_terms, uniform_prob: float = timestep_sampling.UNIFORM_PROB):
    """p(t) ∝ √(mean over images of L_t²) from pilot terms vb_terms [B, T], mixed with a small
    uniform share so every t keeps p > 0 (Nichol & Dhariwal 2021, eq. 18): the loss-aware
    training sampler's distribution with the pilot batch as its history. Returns [T]."""
    history = jnp.asarray(vb_terms, jnp.float32).T  # [T, B]: B values of each L_t
    state = timestep_sampling.LossAwareState(
        loss_history=history, counts=jnp.full((history.shape[0],), history.shape[1], jnp.int32),
        uniform_prob=uniform_prob)
    return timestep_sampling.probabilities(state)


def sampled_bpd(diffusion, model_fn, x0, rng, num_timesteps_per_image: int,
                clip_denoised: bool = True, probs=None):
    """Unbiased Monte Carlo estimate of the bound from K timesteps per image drawn from p(t).

    Σ_{t=0}^{T-1} L_t = E_{t~p}[L_t/p(t)] ≈ (1/K) Σ_k L_{t_k}/p(t_k); L_T is added exactly.
    probs: [T] (default uniform, which gives (T/K) Σ_k L_{t_k}).
    Returns dict(total=[B], prior=[B]).
    """
    batch, num_t = x0.shape[0], diffusion.num_timesteps
    t_key, n_key = jax.random.split(rng)
    if probs is None:
        probs = jnp.full((num_t,), 1.0 / num_t, jnp.float32)
    ts = jax.random.choice(t_key, num_t, (num_timesteps_per_image, batch), p=probs).astype(
        jnp.int32)

    def term(carry, inputs):
        t, key = inputs
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        model_output = wrap_model(model_fn, diffusion)(x_t, t)
        vb = diffusion.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=clip_denoised)['output']
        return carry + vb / probs[t], None

    keys = jax.random.split(n_key, num_timesteps_per_image)
    vb_sum, _ = jax.lax.scan(term, jnp.zeros((batch,), x0.dtype), (ts, keys))
    prior = diffusion.prior_bpd(x0)
    return dict(total=vb_sum / num_timesteps_per_image + prior, prior=prior)


def dequantize(x0, rng, kind: str = 'uniform'):
    """Uniform dequantisation as score_sde: v = 127.5(x0 + 1) ∈ {0..255}, y = 2(v + u)/256 - 1 with
    u ~ U[0, 1)^D, so the 256 bins tile [-1, 1]. 'none' returns x0. Shapes: x0 [B, ...] -> same.

    -log2 P(v) ≤ E_u[-log2 p(y)] + 7 per dim (Jensen), so the ODE likelihood of y bounds the
    discrete NLL; with 'none' the number is a density, not a bound.
    """
    if kind not in DEQUANTIZATION:
        raise ValueError(f'eval.ode_dequantization={kind!r}: use one of {", ".join(DEQUANTIZATION)}.')
    if kind == 'none':
        return x0
    levels = jnp.round((x0 + 1.0) * 127.5)
    u = jax.random.uniform(rng, x0.shape, x0.dtype)
    return 2.0 * (levels + u) / 256.0 - 1.0


@dataclasses.dataclass(frozen=True)
class ContinuousVP:
    """The VP SDE dx = -½β(τ)x dτ + √β(τ) dW that a discrete K-step diffusion defines.

    Knots τ_k = k + 1 (k = 0..K-1) carry the discrete levels: ᾱ(τ_k) = ᾱ_k, the level the network
    saw at its timestep timestep_map[k]. Between knots log ᾱ is the monotone cubic (PCHIP,
    Fritsch & Carlson 1980) through the knots, so q(x_τ|x_0) = N(√ᾱ(τ) x_0, (1-ᾱ(τ)) I) matches
    the discrete marginals at every knot and β(τ) = -d log ᾱ/dτ is positive and continuous. (Why
    not log ᾱ piecewise linear: β would then jump at every knot, by 100% at the first steps of a
    linear schedule, and Runge-Kutta error control misses those jumps: 0.03 bits/dim of solver
    error at rtol 1e-5 on the Gaussian test.) The network's timestep is interpolated linearly in
    τ (τ - 1 for an un-respaced diffusion). The ODE runs over τ ∈ [1, K]: from the first trained
    level ᾱ_0 (the analogue of score_sde's ε = 1e-5) to the last.
    """
    log_abar: Any  # [K] log ᾱ at the knots
    slopes: Any  # [K] d log ᾱ/dτ at the knots
    timestep_map: Any  # [K] float

    @classmethod
    def from_diffusion(cls, diffusion, dtype=jnp.float32) -> 'ContinuousVP':
        abar = np.asarray(diffusion.alphas_cumprod, np.float64)
        if abar.size < 3 or abar[-1] <= 0.0:
            raise ValueError('ode_bpd needs K >= 3 steps and ᾱ_T > 0: a zero-terminal-SNR '
                             'schedule (diffusion.rescale_zero_terminal_snr=True) has no finite '
                             'probability-flow ODE at τ = T; use the bound (eval.nll_estimator='
                             "'full').")
        log_abar = np.log(abar)
        delta = np.diff(log_abar)  # < 0: ᾱ decreases
        # Fritsch-Carlson on unit spacing: the harmonic mean of the neighbouring secants inside,
        # the one-sided secant at the ends; all slopes negative, so ᾱ(τ) stays monotone.
        inner = 2.0 / (1.0 / delta[:-1] + 1.0 / delta[1:])
        slopes = np.concatenate([delta[:1], inner, delta[-1:]])
        return cls(jnp.asarray(log_abar, dtype), jnp.asarray(slopes, dtype),
                   jnp.asarray(np.asarray(diffusion.timestep_map), dtype))

    @property
    def t_end(self) -> float:
        return float(self.log_abar.shape[0])

    def _hermite(self, tau):
        """(log ᾱ(τ), d log ᾱ/dτ) from the cubic Hermite segment holding τ (scalar)."""
        k = jnp.clip(jnp.floor(tau - 1.0).astype(jnp.int32), 0, self.log_abar.shape[0] - 2)
        s = tau - 1.0 - k
        y0, y1, m0, m1 = self.log_abar[k], self.log_abar[k + 1], self.slopes[k], self.slopes[k + 1]
        value = ((2 * s**3 - 3 * s**2 + 1) * y0 + (s**3 - 2 * s**2 + s) * m0
                 + (-2 * s**3 + 3 * s**2) * y1 + (s**3 - s**2) * m1)
        deriv = ((6 * s**2 - 6 * s) * (y0 - y1) + (3 * s**2 - 4 * s + 1) * m0
                 + (3 * s**2 - 2 * s) * m1)
        return value, deriv

    def log_alphas_cumprod(self, tau):
        return self._hermite(tau)[0]

    def alphas_cumprod(self, tau):
        """ᾱ(τ) for a scalar τ ∈ [1, K]."""
        return jnp.exp(self.log_alphas_cumprod(tau))

    def one_minus_alphas_cumprod(self, tau):
        return -jnp.expm1(self.log_alphas_cumprod(tau))  # exact where ᾱ is close to 1

    def beta(self, tau):
        """β(τ) = -d log ᾱ/dτ."""
        return -self._hermite(tau)[1]

    def model_time(self, tau):
        """The network's timestep at τ (any shape): timestep_map interpolated linearly, so that
        diffusion.wrap_model(model_fn, sde) calls the network at continuous times."""
        return jnp.interp(tau - 1.0, jnp.arange(self.timestep_map.shape[0],
                                                dtype=self.timestep_map.dtype), self.timestep_map)


def _eps_from_output(diffusion, mean_output, x, abar, one_minus_abar):
    """ε̂ at continuous level ᾱ from the mean output (ε, x0 or v; see GaussianDiffusion)."""
    if diffusion.model_mean_type == 'eps':
        return mean_output
    if diffusion.model_mean_type == 'v':
        return jnp.sqrt(one_minus_abar) * x + jnp.sqrt(abar) * mean_output
    return (x - jnp.sqrt(abar) * mean_output) / jnp.sqrt(one_minus_abar)


def probability_flow_drift(diffusion, model_fn, sde: ContinuousVP):
    """f̃(x, τ) = -½β(τ)(x + ∇log p_τ(x)) = -½β(τ)(x - ε̂(x, τ)/√(1-ᾱ(τ))): [B, ...] -> [B, ...]."""
    def drift(tau, x):
        abar, one_minus = sde.alphas_cumprod(tau), sde.one_minus_alphas_cumprod(tau)  # scalars
        taus = jnp.full((x.shape[0],), tau, sde.timestep_map.dtype)
        mean_output, _ = diffusion.split_model_output(wrap_model(model_fn, sde)(x, taus), x)
        eps = _eps_from_output(diffusion, mean_output.astype(x.dtype), x, abar, one_minus)
        return -0.5 * sde.beta(tau) * (x - eps / jnp.sqrt(one_minus))
    return drift


def _process_drift(process, model_fn):
    """dx/dt = process.velocity(x, t) at the scalar ODE time t: [B, ...] -> [B, ...]."""
    def drift(t, x):
        return process.velocity(model_fn, x, jnp.full((x.shape[0],), t, jnp.float32))
    return drift


def _standard_normal_logp(z):
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * jnp.sum(jnp.square(flat), axis=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _divergence(drift, tau, x, probe, hutchinson: str):
    """(f̃(x, τ), ∇·f̃ per example [B]): Hutchinson's z^T (∂f̃/∂x) z with a fixed probe z, or the
    exact trace from D forward-mode products (examples are independent, so one basis vector
    e_i, the same for every example, gives each example's ∂f̃_i/∂x_i)."""
    f = lambda y: drift(tau, y)
    if hutchinson != 'exact':
        out, jz = jax.jvp(f, (x,), (probe,))
        return out, jnp.sum((probe * jz).reshape(x.shape[0], -1), axis=1)
    dims = int(np.prod(x.shape[1:]))
    out = f(x)

    def diag(i):
        e = jax.nn.one_hot(i, dims, dtype=x.dtype).reshape(x.shape[1:])
        _, je = jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),))
        return je.reshape(x.shape[0], -1)[:, i]
    return out, jnp.sum(jax.lax.map(diag, jnp.arange(dims)), axis=0)


def ode_bpd(diffusion, model_fn, x0, rng, *, solver: str = 'dopri5', rtol: float = ODE_RTOL,
            atol: float = ODE_ATOL, num_steps: int = 0, hutchinson: str = 'rademacher',
            dequantization: str = 'uniform', max_steps: int = 4096):
    """Bits/dim of x0 under the probability-flow ODE of the model (Song et al. 2021, eq. 13, 39).

    With the drift f̃ of probability_flow_drift and x(1) = y (the dequantised x0),
        log p_1(y) = log N(x(K); 0, I) + ∫_1^K ∇·f̃(x(τ), τ) dτ,
    the instantaneous change of variables solved jointly with x(τ) by diffrax. ∇·f̃ is estimated
    with Hutchinson's z^T J z, one probe z per solve (E[zz^T] = I: Rademacher or Gaussian), or
    computed exactly ('exact', D Jacobian-vector products per evaluation: small D only). Then
        bpd = -log p_1(y)/(D ln 2) + 7  (7 = -log2 of the 2/256 bin width).
    See ContinuousVP for how the discrete schedule defines the SDE and the network's timestep.

    Any process (diffusion_jax.processes): for 'flow' and 'edm' the ODE is dx/dt =
    process.velocity from process.ode_limits()[0] (flow t = 0; EDM σ_min) to [1] (t = 1; σ_max)
    with process.prior_logp (N(0, I); N(0, σ_max² I)) in place of N(0, I) and the VP SDE.

    Args:
      diffusion: the (un-respaced or respaced) GaussianDiffusion the model was trained with, or
        a process (model_fn then is called as the process calls its network).
      model_fn: (x [B, ...], timesteps [B] float) -> model output (as for the bound).
      x0: [B, ...] data on the 256-level grid in [-1, 1]. The solve runs in x0's floating dtype
        (float32 for integer or half inputs; float64 inputs under `jax.enable_x64` give a float64
        solve, which the closed-form test uses so that its tolerance does not depend on how a
        CPU's float32 kernels round).
      rng: jax.random.key: dequantisation noise and the probe.
      solver: 'dopri5' | 'tsit5' (adaptive, PID step control with rtol/atol) or, with
        num_steps > 0, any of ODE_SOLVERS at num_steps equal steps.
      hutchinson: 'rademacher' | 'gaussian' | 'exact'. dequantization: 'uniform' | 'none'.
    Returns:
      dict(bpd=[B], prior_logp=[B], delta_logp=[B] (nats), nfe=[] int32 (evaluations of f̃, each
      one forward and one forward-mode pass of the network; the batch shares the steps; for the
      adaptive solvers 6·steps + 1, which undercounts by one for each rejected *first* attempt,
      whose first stage diffrax evaluates again), num_steps=[], num_rejected=[], ok=[] bool
      (False when max_steps ran out; bpd is then not valid)).
    rng is split into (dequantisation key, probe key), in that order.
    """
    _check_ode_options(solver, num_steps, hutchinson)
    x0 = jnp.asarray(x0)
    dtype = jnp.promote_types(x0.dtype if jnp.issubdtype(x0.dtype, jnp.floating)
                              else jnp.float32, jnp.float32)
    diffusion = getattr(diffusion, 'diffusion', diffusion)  # a GaussianProcess: its diffusion
    if isinstance(diffusion, processes.Process):
        # A continuous process: dx/dt = process.velocity from t_data to t_noise, its own prior.
        t0, t1 = diffusion.ode_limits()
        prior = diffusion.prior_logp
        drift = _process_drift(diffusion, model_fn)
    else:
        sde = ContinuousVP.from_diffusion(diffusion, dtype)
        t0, t1 = 1.0, sde.t_end
        prior = _standard_normal_logp
        drift = probability_flow_drift(diffusion, model_fn, sde)
    y, probe = _start_and_probe(x0, rng, dequantization, hutchinson, dtype)

    def vector_field(tau, state, args):  # pylint: disable=unused-argument
        dx, div = _divergence(drift, tau, state[0], probe, hutchinson)
        return dx, div

    sol = _solve(vector_field, (y, jnp.zeros((y.shape[0],), dtype)), t0, t1,
                 solver=solver, rtol=rtol, atol=atol, num_steps=num_steps, max_steps=max_steps)
    return _ode_result(sol, y, solver, prior)


def _start_and_probe(x0, rng, dequantization: str, hutchinson: str, dtype):
    """(y = the dequantised x0, the Hutchinson probe z), both [B, ...] in dtype; rng is split
    into (dequantisation key, probe key), in that order."""
    deq_key, probe_key = jax.random.split(rng)
    y = dequantize(x0, deq_key, dequantization).astype(dtype)
    if hutchinson == 'rademacher':
        return y, jax.random.rademacher(probe_key, y.shape, dtype)
    return y, jax.random.normal(probe_key, y.shape, dtype)


def _solve(vector_field, state, t0: float, t1: float, *, solver: str, rtol: float, atol: float,
           num_steps: int, max_steps: int):
    """diffrax's solution of d state/dτ = vector_field(τ, state) from t0 to t1: num_steps equal
    steps of `solver`, or (num_steps = 0) adaptive steps under a PID controller."""
    import diffrax  # pylint: disable=import-outside-toplevel
    method = {'dopri5': diffrax.Dopri5, 'tsit5': diffrax.Tsit5, 'heun': diffrax.Heun,
              'euler': diffrax.Euler}[solver]()
    if num_steps:
        controller, dt0 = diffrax.ConstantStepSize(), (t1 - t0) / num_steps
    else:
        # dt0 given, so the controller does not spend evaluations guessing the first step.
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), (t1 - t0) / 64
    return diffrax.diffeqsolve(diffrax.ODETerm(vector_field), method, t0, t1, dt0, state,
                               stepsize_controller=controller, max_steps=max_steps, throw=False)


def _ode_result(sol, y, solver: str, prior) -> dict:
    """ode_bpd's dict from the solution at τ = K: the prior's log density of x(K) plus the
    integrated divergence, in bits/dim, with the solver's statistics."""
    import diffrax  # pylint: disable=import-outside-toplevel
    z, delta_logp = sol.ys[0][-1], sol.ys[1][-1]
    dims = int(np.prod(y.shape[1:]))
    prior_logp = prior(z)
    bpd = -(prior_logp + delta_logp) / (dims * math.log(2.0)) + _BITS_PER_BIN_WIDTH
    steps = sol.stats['num_steps']
    nfe = steps * _EVALS_PER_STEP[solver] + (1 if _FSAL[solver] else 0)
    return dict(bpd=bpd, prior_logp=prior_logp, delta_logp=delta_logp,
                nfe=jnp.asarray(nfe, jnp.int32), num_steps=jnp.asarray(steps, jnp.int32),
                num_rejected=jnp.asarray(sol.stats['num_rejected_steps'], jnp.int32),
                ok=sol.result == diffrax.RESULTS.successful)


def _check_ode_options(solver, num_steps, hutchinson):
    if solver not in ODE_SOLVERS:
        raise ValueError(f'eval.ode_solver={solver!r}: use one of {", ".join(ODE_SOLVERS)}.')
    if not num_steps and solver not in ('dopri5', 'tsit5'):
        raise ValueError(f'eval.ode_solver={solver!r} has no error estimate: set '
                         'eval.ode_num_steps > 0 (fixed steps) or use dopri5/tsit5.')
    if num_steps < 0:
        raise ValueError(f'eval.ode_num_steps={num_steps}: use 0 (adaptive) or a step count > 0.')
    if hutchinson not in HUTCHINSON:
        raise ValueError(f'eval.ode_hutchinson={hutchinson!r}: use one of {", ".join(HUTCHINSON)}.')


@dataclasses.dataclass
class BpdAccumulator:
    """Running sums over a dataset split (float64 on the host) of per-image bound terms."""
    count: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    sq_sums: dict = dataclasses.field(default_factory=dict)

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            value = np.asarray(value, np.float64)
            self.sums[name] = self.sums.get(name, 0.0) + float(value.sum())
            self.sq_sums[name] = self.sq_sums.get(name, 0.0) + float(np.square(value).sum())
        self.count += int(np.asarray(next(iter(terms.values()))).shape[0])

    def mean(self, name: str) -> float:
        return self.sums[name] / max(self.count, 1)

    def stderr(self, name: str) -> float:
        """Standard error of the mean over images (spread of images and of the MC estimate)."""
        n = max(self.count, 1)
        var = max(self.sq_sums[name] / n - self.mean(name) ** 2, 0.0)
        return math.sqrt(var / max(n - 1, 1))

    def summary(self) -> dict:
        out = {'num_images': self.count}
        for name in self.sums:
            out[f'{name}_bpd'] = self.mean(name)
            out[f'{name}_bpd_stderr'] = self.stderr(name)
        return out
