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
# # diffusion_jax quickstart: train, sample, score
#
# Trains a small DDPM with the library's one entry point, `train.train_and_evaluate`, watching
# the loss and the sample grids as they come; then samples with DDIM and with DPM-Solver++(2M),
# the fastest sampler the library has, and computes the test NLL (the full variational bound, in
# bits/dim). On a TPU or GPU it trains on Fashion-MNIST (28×28, 60,000 images); on a CPU on the
# 8×8 scikit-learn digits, which need no download.
#
# **How long on a TPU (an estimate, not a measurement).** XLA's cost analysis of this
# Fashion-MNIST train step (6.5M-parameter UNet, batch 128) counts 0.86 TFLOP per step. At a
# quarter of a v5e chip's 197 TFLOP/s bf16 peak (fp32 matmuls run as bf16 passes there by
# default) that is ≈ 18 ms per step, so the 4,000 steps below take ≈ 1.2 min, and with the
# compile, the tfds download and the grids **a recognisable Fashion-MNIST grid comes after
# about 3–5 minutes** on a Colab v5e-1 (a v6e-1 is faster). The training cell prints the
# throughput it measured, so the estimate can be checked on your runtime. On a 2-core CPU the
# digits run (1,500 steps) takes about 5 minutes.

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
import matplotlib.pyplot as plt

from configs import digits, fashion_mnist
from diffusion_jax import generate, guidance, models, notebook, run, samplers, sharding, train
from diffusion_jax.evaluation import evaluate

print(notebook.device_summary())

# %% [markdown]
# ## The config: Fashion-MNIST on an accelerator, the digits on a CPU
# Both are ordinary experiment configs (`configs/fashion_mnist.py`, `configs/digits.py`); the
# notebook only shortens the Fashion-MNIST schedule so that a grid comes in minutes.

# %%
if notebook.on_accelerator():
    config = fashion_mnist.get_config()
    config.data.source = 'tfds'  # Colab has no Debian IDX files; tfds downloads Fashion-MNIST
    config.data.download = True
    t = config.training
    t.num_train_steps = 4000  # ~8.5 epochs: enough for recognisable clothes (not a paper's)
    t.sample_every_steps = 1000  # a grid every 1,000 steps
    t.ema_decay = 0.999  # averages ~1,000 steps: the 0.9999 of 800k-step runs would lag here
    config.optim.warmup_steps = 500  # the template's 5,000 would be most of this run
    config.eval.num_batches = 4  # 1,024 of the 10,000 test images: the full bound is T = 1000 calls
else:
    config = digits.get_config()  # 1,500 steps, the offline default
t = config.training
t.log_every_steps = min(t.log_every_steps, 100)
num_samples = 64  # each sampler's grid
if smoke:
    t.num_train_steps, t.log_every_steps, t.sample_every_steps = 6, 2, 3
    t.checkpoint_every_steps, t.num_sample_images, t.batch_size = 6, 4, 8
    config.eval.batch_size, config.eval.num_batches = 8, 1
    num_samples = 4
workdir = f'runs/quickstart_{config.name}' + ('_smoke' if smoke else '')
print(config.name, 'for', t.num_train_steps, 'steps, batch', t.batch_size, '->', workdir)

# %% [markdown]
# ## Train
# `on_step` is called after every step with a copy of the train state (safe to keep; the
# loop's own state is donated to the next step). `notebook.TrainProgress` draws the progress bar
# with the last logged loss and shows each EMA sample grid the loop writes.
# Re-running the cell resumes from the run's latest checkpoint.

# %%
progress = notebook.TrainProgress(config, workdir)
start = time.perf_counter()
state = train.train_and_evaluate(config, workdir, on_step=progress)
progress.finish()
metrics = notebook.read_metrics(workdir)
print(f'{int(state.step)} steps in {time.perf_counter() - start:.0f} s wall (compile included); '
      f'last logged: loss {metrics["loss"][-1]:.4f}, {metrics["steps_per_sec"][-1]:.1f} steps/s, '
      f'{metrics["images_per_sec"][-1]:.0f} images/s')

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(metrics['step'], metrics['loss'])
ax.set(xlabel='step', ylabel='loss (L_simple)', yscale='log', title='training loss')
plt.show()

# %% [markdown]
# ## Sample: DDIM and DPM-Solver++(2M)
# `run.load` rebuilds the model and the diffusion from the run's stored config and restores the
# EMA parameters. DDIM (Song et al. 2021) runs 50 of the T steps; DPM-Solver++(2M) (Lu et al.
# 2022), a second-order multistep solver of the same probability-flow ODE, runs 20.

# %%
loaded = run.load(workdir)
model_fn = guidance.bind_model(loaded.model.apply, loaded.variables)
shape = (num_samples, *models.example_shape(loaded.model))
print('samplers in the library:', ', '.join(samplers.METHODS))
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, (method, steps) in zip(axes, [('ddim', 'ddim50'), ('dpmpp_2m', '20')]):
    chain = generate.respaced(loaded.diffusion, steps)
    tic = time.perf_counter()
    out = samplers.sample(chain, model_fn, jax.random.key(1), shape, method=method)['samples']
    out = jax.block_until_ready(out)
    notebook.show_images(out, f'{method}, {chain.num_timesteps} steps '
                              f'({time.perf_counter() - tic:.1f} s incl. compile)', ax=ax)
plt.show()

# %% [markdown]
# ## Test NLL
# The full bound L_T + Σ L_t + L_0 over the held-out split (all T terms per image, the
# protocol of Ho et al. 2020, Table 1), in bits/dim; also written to `eval/nll_<step>.json`.
# The digits' whole test split (359 images); on Fashion-MNIST the first 1,024 test images.

# %%
mesh = sharding.make_mesh()
nll = evaluate.evaluate_nll(loaded.config, workdir, sharding.replicate(loaded.variables, mesh),
                            loaded.step, mesh)
print(f'test NLL at step {loaded.step}: {nll["total_bpd"]:.3f} ± {nll["total_bpd_stderr"]:.3f} '
      f'bits/dim over {nll["num_images"]} images')
