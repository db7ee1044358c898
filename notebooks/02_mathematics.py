# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The mathematics of diffusion models, on pictures
#
# Each figure sits beside its equation and is computed with the library's functions
# (`GaussianDiffusion`, `schedules`, `evaluation.likelihood`, `samplers`), not re-implemented
# here. Notation as in Ho et al. 2020 (DDPM), with 0-indexed timesteps t ∈ [0, T): the decoder
# term L_0 sits at t = 0. Two small models are trained first (a few minutes on a CPU): a UNet on
# the 8×8 digits and an MLP on the swiss roll.

# %% [markdown]
# Installs the package on Colab (or any machine where it does not import yet). `REPO_URL` is
# the project's repository: **its public URL is not fixed yet, so it is defined once here; edit it
# if it differs.** The clone is needed because `configs/` lives beside the package.

# %%
REPO_URL = 'https://github.com/diffusion-jax/diffusion_jax'  # placeholder, see above
import importlib.util, pathlib, subprocess, sys  # noqa: E401


def _repo_root():
    places = [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
    spec = importlib.util.find_spec('diffusion_jax')
    if spec is not None and spec.origin:
        places.append(pathlib.Path(spec.origin).resolve().parents[1])
    return next((p for p in places if (p / 'configs' / 'cifar10.py').exists()), None)


ROOT = _repo_root()
if ROOT is None:  # one install: the repository, with the notebooks' extra (matplotlib)
    subprocess.run(f'git clone -q --depth 1 {REPO_URL} diffusion_jax_repo && {sys.executable} '
                   '-m pip install -q "./diffusion_jax_repo[experiments]"', shell=True, check=True)
    ROOT = pathlib.Path('diffusion_jax_repo').resolve()
sys.path.insert(0, str(ROOT))

# %% tags=["parameters"]
smoke = False  # True: tiny sizes (CI runs every notebook so); the same code path

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from configs import digits, swissroll
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import generate, guidance, input_pipeline, notebook, run, samplers, schedules
from diffusion_jax import train
from diffusion_jax.evaluation import likelihood

print(notebook.device_summary())
key = jax.random.key(0)

# %% [markdown]
# ## Two small trained models
# The digits default (`configs/digits.py`: T = 200, linear β, ε-prediction) and the swiss roll
# (`configs/swissroll.py`: T = 100, cosine β, a 4×256 MLP).

# %%
configs_ = {'digits': digits.get_config(), 'swissroll': swissroll.get_config()}
for config in configs_.values():
    config.training.sample_every_steps = 0  # this notebook samples itself, below
    if smoke:
        t = config.training
        t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps = 4, 2, 4
        t.batch_size = 8
workdirs = {name: f'runs/mathematics_{name}' + ('_smoke' if smoke else '') for name in configs_}
for name, config in configs_.items():
    progress = notebook.TrainProgress(config, workdirs[name], show_grids=False)
    train.train_and_evaluate(config, workdirs[name], on_step=progress)
    progress.finish()
net = run.load(workdirs['digits'])  # EMA parameters, model and diffusion from the stored config
roll = run.load(workdirs['swissroll'])
diffusion = net.diffusion
T = diffusion.num_timesteps
model_fn = guidance.bind_model(net.model.apply, net.variables)
roll_fn = guidance.bind_model(roll.model.apply, roll.variables)
test = input_pipeline.get_dataset(net.config.data, 'test')
x0 = jnp.asarray(test.get(np.arange(8))['image'])  # [8, 8, 8, 1] real held-out digits

# %% [markdown]
# ## The forward process q(x_t | x_0)
# $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I)$, so
# $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ in one step
# (`diffusion.q_sample`). Rows: 8 test digits; columns: t = 0, T/8, …, T-1.

# %%
levels = np.linspace(0, T - 1, 9).astype(int)
noise = jax.random.normal(key, x0.shape)
row = [diffusion.q_sample(x0, jnp.full((8,), t), noise) for t in levels]
grid = jnp.stack(row, axis=1).reshape(-1, *x0.shape[1:])  # example-major: one row per digit
notebook.show_images(grid, 'x_t for t = ' + ', '.join(map(str, levels)), ncols=len(levels))
plt.show()

# %% [markdown]
# ## ᾱ_t of the linear and the cosine schedule
# Linear β (Ho et al. 2020) against the cosine ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2)
# (Nichol & Dhariwal 2021, eq. 17): the linear schedule destroys the signal well before T, the
# cosine one more evenly. Both from `schedules.get_beta_schedule`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name in ('linear', 'cosine'):
    d = diffusion_lib.GaussianDiffusion(schedules.get_beta_schedule(name, 1000))
    axes[0].plot(d.alphas_cumprod, label=name)
    axes[1].plot(np.log(d.alphas_cumprod / d.one_minus_alphas_cumprod), label=name)
axes[0].set(xlabel='t (T = 1000)', ylabel='ᾱ_t')
axes[1].set(xlabel='t (T = 1000)', ylabel='log SNR = log ᾱ_t/(1-ᾱ_t)')
axes[0].legend()
plt.show()

# %% [markdown]
# ## The posterior q(x_{t-1} | x_t, x_0)
# $q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)$ with
# $\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0
# + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t$ and
# $\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$
# (`diffusion.q_posterior_mean_variance`). Left: x_0, x_t, μ̃_t and a draw of x_{t-1} at
# t = T/2; right: β̃_t against β_t, the two fixed variances of p_θ (`fixed_small`, `fixed_large`).

# %%
t_mid = jnp.full((8,), T // 2)
x_t = diffusion.q_sample(x0, t_mid, noise)
mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t_mid)
draw = mean + jnp.exp(0.5 * log_var) * jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
notebook.show_images(jnp.concatenate([x0, x_t, mean, draw]),
                     'rows: x_0, x_t, μ̃_t, x_{t-1} ~ q', ncols=8, ax=axes[0])
axes[1].semilogy(diffusion.betas, label='β_t (fixed_large)')
axes[1].semilogy(diffusion.posterior_variance[1:], label='β̃_t (fixed_small)')
axes[1].set(xlabel='t', title=f'T = {T}')
axes[1].legend()
plt.show()

# %% [markdown]
# ## The bound, term by term, for the trained digits model
# $L = L_T + \sum_{t \ge 1} L_t + L_0$, with
# $L_t = D_{KL}(q(x_{t-1}\mid x_t,x_0)\,\|\,p_\theta(x_{t-1}\mid x_t))$, the decoder
# $L_0 = -\log p_\theta(x_0 \mid x_1)$ (discretised Gaussian over 256 pixel values) and the prior
# $L_T = D_{KL}(q(x_T \mid x_0)\,\|\,\mathcal N(0, I))$, in bits/dim
# (`likelihood.full_bpd`: one network call per t). Most of the bound is in the last few steps.

# %%
n_nll = 8 if smoke else 128
x_nll = jnp.asarray(test.get(np.arange(n_nll))['image'])
terms = likelihood.full_bpd(diffusion, model_fn, x_nll, jax.random.key(1))
vb = np.asarray(terms['vb']).mean(axis=0)  # [T]: L_t averaged over the images
fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(np.arange(1, T), vb[1:], label='L_t (t ≥ 1)')
ax.semilogy([0], [vb[0]], 'o', label='L_0 (decoder)')
ax.set(xlabel='t', ylabel='bits/dim')
ax.legend()
plt.show()
print(f'over {n_nll} test digits: total {np.mean(terms["total"]):.3f} bits/dim = '
      f'L_T {np.mean(terms["prior"]):.2e} + Σ L_t {np.mean(terms["kl_sum"]):.3f} + '
      f'L_0 {np.mean(terms["decoder"]):.3f}')

# %% [markdown]
# ## Reverse trajectories on the swiss roll
# Ancestral sampling $x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z$ from $x_{T-1} \sim \mathcal N(0, I)$
# (DDPM Algorithm 2), stopped at a few levels with `samplers.reverse_from` (start and stop are
# traced: one compile serves every segment).

# %%
K = roll.diffusion.num_timesteps
n_points = 200 if smoke else 2000
x = jax.random.normal(jax.random.key(2), (n_points, 2))
stops = [K - 1, 3 * K // 4, K // 2, K // 4, 0]
frames = [x]
for i, (a, b) in enumerate(zip(stops[:-1], stops[1:])):
    x = samplers.reverse_from(roll.diffusion, roll_fn, jax.random.key(10 + i), x, a,
                              stop=b + 1 if b else 0)
    frames.append(x)
fig, axes = plt.subplots(1, len(frames), figsize=(3 * len(frames), 3))
for ax, frame, level in zip(axes, frames, ['x_T'] + [f'x_{b}' for b in stops[1:-1]] + ['x_0']):
    ax.scatter(*np.asarray(frame).T, s=1)
    ax.set(title=level, xlim=(-2, 2), ylim=(-2, 2), aspect='equal')
paths = np.stack([np.asarray(f[:20]) for f in frames])  # [levels, 20, 2]
axes[-1].plot(paths[..., 0], paths[..., 1], lw=0.5, color='gray')
plt.show()

# %% [markdown]
# ## Progressive x̂_0 (DDPM Fig. 6)
# Along the chain the network's prediction
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta(x_t,t))/\sqrt{\bar\alpha_t}$ sharpens
# from the data mean to the sample: coarse features first, details last
# (`samplers.sample(..., progress_steps=...)`). Rows: samples; columns: t from T-1 to 0.

# %%
show_steps = [int(s) for s in np.linspace(T - 1, 0, 11)]
out = samplers.sample(diffusion, model_fn, jax.random.key(3), (6, *x0.shape[1:]),
                      progress_steps=show_steps)
prog = jnp.swapaxes(out['progressive'], 0, 1).reshape(-1, *x0.shape[1:])
notebook.show_images(prog, 'x̂_0 at t = ' + ', '.join(map(str, show_steps)), ncols=11)
plt.show()

# %% [markdown]
# ## Interpolation
# DDPM (Ho et al. 2020, Sec. 4.3): encode two test digits to x_t with the same noise,
# $\bar x_t = (1-\lambda)x_t + \lambda x'_t$, decode with the reverse chain
# (`samplers.interpolate_ddpm`, t = T/2). DDIM (Song et al. 2021, Sec. 5.3): encode with the
# deterministic ODE to x_T, slerp the codes, decode with η = 0 (`samplers.interpolate_ddim`,
# 50 steps). Rows: pairs; columns: λ = 0, 0.1, …, 1.

# %%
lambdas = np.linspace(0.0, 1.0, 11)
a, b = x0[:3], x0[3:6]
ddpm = samplers.interpolate_ddpm(diffusion, model_fn, jax.random.key(4), a, b, T // 2, lambdas)
ddim = samplers.interpolate_ddim(generate.respaced(diffusion, 'ddim50'), model_fn, a, b, lambdas)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, strip, title in ((axes[0], ddpm, 'DDPM, t = T/2'), (axes[1], ddim, 'DDIM slerp')):
    notebook.show_images(jnp.swapaxes(strip, 0, 1).reshape(-1, *a.shape[1:]), title, ncols=11,
                         ax=ax)
plt.show()

# %% [markdown]
# ## Langevin dynamics through the score
# The ε-network is a score model: $\nabla_x \log q(x_t) \approx s_\theta = -\epsilon_\theta(x_t,
# t)/\sqrt{1-\bar\alpha_t}$ (`diffusion.score_from_eps`). Left: that field at t = 5 on the swiss
# roll's plane. Right: points drawn uniformly moved by Langevin steps
# $x \leftarrow x + \epsilon\, s_\theta(x) + \sqrt{2\epsilon}\, z$ at the same level
# (`samplers.langevin_correct`, the step size of Song et al. 2021's corrector), which pull them
# onto the roll.

# %%
level = 5
g = np.linspace(-1.5, 1.5, 21)
grid_xy = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), jnp.float32)
tt = jnp.full((grid_xy.shape[0],), level)
eps = roll_fn(grid_xy, jnp.asarray(roll.diffusion.timestep_map)[tt])  # the network sees original t
score = roll.diffusion.score_from_eps(grid_xy, tt, eps)
start_pts = jax.random.uniform(jax.random.key(5), (n_points, 2), minval=-1.5, maxval=1.5)
moved = samplers.langevin_correct(roll.diffusion, roll_fn, jax.random.key(6), start_pts, level,
                                  n_steps=20 if smoke else 200)
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
s = np.asarray(score) / (np.linalg.norm(score, axis=1, keepdims=True) + 1e-8)
axes[0].quiver(*np.asarray(grid_xy).T, *s.T)
axes[0].set(title=f'score direction at t = {level}', aspect='equal')
axes[1].scatter(*np.asarray(start_pts).T, s=1, alpha=0.3, label='start (uniform)')
axes[1].scatter(*np.asarray(moved).T, s=1, label='after Langevin')
axes[1].set(title='Langevin on s_θ', aspect='equal', xlim=(-1.5, 1.5), ylim=(-1.5, 1.5))
axes[1].legend(markerscale=8)
plt.show()
