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
# # Guidance: classifier-free and classifier
#
# 1. A class-conditional UNet on the 8×8 digits trained with label dropout: each label is
#    replaced by the null label ∅ with probability p_uncond, so one network is both
#    ε_θ(x_t, y) and ε_θ(x_t, ∅) (Ho & Salimans 2022).
# 2. Classifier-free guidance over w: $\tilde\epsilon = (1+w)\,\epsilon_\theta(x_t, y) -
#    w\,\epsilon_\theta(x_t, \varnothing)$ (`guidance.classifier_free_model_fn`).
# 3. A noisy classifier p_φ(y | x_t, t) (`configs/digits_classifier.py`, ADM's classifier at
#    8×8) and classifier guidance over s: the ancestral mean is shifted by
#    $s\,\Sigma\,\nabla_{x_t}\log p_\phi(y\mid x_t)$ (Dhariwal & Nichol 2021, Alg. 1), here
#    guiding the same network's unconditional ε_θ(x_t, ∅).
#
# Grids have one row per class 0–9. Each guided grid is also scored by the classifier at t = 0:
# the share of samples it assigns to the class asked for. (For classifier guidance the judge is
# the classifier that guided, so that share overstates how recognisable the samples are.)

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
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from configs import digits, digits_classifier
from diffusion_jax import generate, guidance, models, notebook, run, samplers, train

print(notebook.device_summary())

# %% [markdown]
# ## Train the conditional model and the noisy classifier
# The conditional model is `configs/digits.py` with `model.num_classes = 10` and
# `training.label_dropout = 0.1` (p_uncond = 0.1, one of the two best values in Ho & Salimans
# 2022, Sec. 4.1); the classifier is `configs/digits_classifier.py` unchanged (same T and β).

# %%
cond = digits.get_config()
cond.name = 'digits_conditional'
cond.model.num_classes = 10  # y ∈ {0..9}; the embedding has an 11th row for the null label ∅
cond.training.label_dropout = 0.1  # p_uncond (Ho & Salimans 2022)
cond.training.sample_every_steps = 0  # the grids below are drawn by this notebook
clf = digits_classifier.get_config()
per_class = 8  # samples per class in each grid
if smoke:
    for config in (cond, clf):
        t = config.training
        t.num_train_steps, t.log_every_steps, t.checkpoint_every_steps = 4, 2, 4
        t.batch_size = 8
    per_class = 1
workdirs = {c.name: f'runs/guidance_{c.name}' + ('_smoke' if smoke else '') for c in (cond, clf)}
for config in (cond, clf):
    progress = notebook.TrainProgress(config, workdirs[config.name], show_grids=False)
    train.train_and_evaluate(config, workdirs[config.name], on_step=progress)
    progress.finish()
net = run.load(workdirs[cond.name])  # EMA parameters
classifier = run.load(workdirs[clf.name], use_ema=False)  # raw parameters, as guided-diffusion

# %%
num_classes = int(net.config.model.num_classes)
y = jnp.repeat(jnp.arange(num_classes), per_class)  # row c of a grid: class c
shape = (y.shape[0], *models.example_shape(net.model))
chain = generate.respaced(net.diffusion, '50')  # 50 evenly spaced steps of the T = 200 chain


def class_accuracy(samples):
    """Share of samples the noisy classifier, at t = 0, assigns to the class asked for."""
    logits = classifier.model.apply(classifier.variables, samples,
                                    jnp.zeros((samples.shape[0],), jnp.int32))
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == y))


# %% [markdown]
# ## Classifier-free guidance over w
# w = 0 is the conditional model itself; larger w trades diversity for class fidelity.

# %%
ws = [0.0, 1.0, 3.0]
fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws), 4))
for ax, w in zip(axes, ws):
    fn = guidance.classifier_free_model_fn(net.model.apply, net.variables, y, w, num_classes)
    out = samplers.sample(chain, fn, jax.random.key(0), shape, method='ancestral')['samples']
    notebook.show_images(out, f'w = {w}: classifier agrees {class_accuracy(out):.0%}',
                         ncols=per_class, ax=ax)
plt.show()

# %% [markdown]
# ## Classifier guidance over s
# The unconditional ε_θ(x_t, ∅) of the same network, guided towards y by the classifier's
# gradient (`guidance.classifier_guidance(guidance.classifier_grad_fn(...), y, s)`, passed to the
# ancestral sampler). s = 0 is unguided: its classes are whatever the model draws.

# %%
unconditional = guidance.bind_model(net.model.apply, net.variables,
                                    jnp.full_like(y, num_classes))  # y = ∅ for every sample
grad_fn = guidance.classifier_grad_fn(classifier.model, classifier.variables)
scales = [0.0, 2.0, 8.0]
fig, axes = plt.subplots(1, len(scales), figsize=(4 * len(scales), 4))
for ax, s in zip(axes, scales):
    out = samplers.sample(chain, unconditional, jax.random.key(1), shape, method='ancestral',
                          guidance=guidance.classifier_guidance(grad_fn, y, s))['samples']
    notebook.show_images(out, f's = {s}: classifier agrees {class_accuracy(out):.0%}',
                         ncols=per_class, ax=ax)
plt.show()
