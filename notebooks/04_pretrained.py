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
# # Published checkpoints: convert, check, sample
#
# Converts one of the published PyTorch checkpoints (here improved DDPM's CIFAR-10 model,
# `cifar10_uncond_50M_500K.pt` from the improved-diffusion README) into a run of this codebase
# with `diffusion_jax.convert`, checks that the converted network computes what the PyTorch
# network computes, and samples from the run. `configs/pretrained.py` lists every preset.
#
# Download the checkpoint yourself (our CI machines cannot) into this folder. In smoke mode the
# notebook instead writes a random-weight checkpoint of a small variant of the same
# architecture, so the code path is the same and runs in seconds.

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
smoke = False  # True: a random-weight small variant instead of the downloaded checkpoint

# %%
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import torch

from diffusion_jax import convert, main, run
from diffusion_jax.convert import torch_reference

PRESET, SOURCE = 'cifar10_uncond_50M_500K', 'improved-diffusion'
SRC = pathlib.Path('cifar10_uncond_50M_500K.pt')
WORKDIR = pathlib.Path('runs') / f'pretrained_{PRESET}'
# Smoke: the same architecture, narrower and shallower, with T = 10 (and the matching
# rescale_timesteps factor 1000/T).
OVERRIDES = {'model.ch': 32, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1,
             'model.attn_resolutions': (16,), 'model.num_heads': 2, 'model.image_size': 32,
             'diffusion.num_timesteps': 10, 'model.timestep_scale': 100.0} if smoke else None

# %%
if smoke:
    SRC = pathlib.Path('random_weights.pt')
    reference = torch_reference.randomize_(torch_reference.build(
        convert.preset_config(PRESET, OVERRIDES).model))
    torch.save(reference.state_dict(), SRC)
on_disk = convert.convert(SRC, SOURCE, PRESET, WORKDIR, overrides=OVERRIDES)
print(f'{WORKDIR}: step {on_disk.latest_step()}')

# %% [markdown]
# ## The converted network equals the PyTorch one
# The PyTorch network of OpenAI's layout (`torch_reference`) with the checkpoint's weights and
# ours, on the same inputs. The reference is called with the timesteps its diffusion feeds it:
# t·1000/T for models trained with `rescale_timesteps`.

# %%
loaded = run.load(str(WORKDIR))
reference = torch_reference.build(loaded.config.model)
reference.load_state_dict(convert.read_state_dict(SRC))
reference = reference.float()
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
t = np.array([1, loaded.config.diffusion.num_timesteps - 1], np.int32)
ours = np.asarray(loaded.model.apply(loaded.variables, x, t))
with torch.no_grad():
    theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                       torch.from_numpy(t * loaded.config.model.timestep_scale).float())
theirs = theirs.numpy().transpose(0, 2, 3, 1)
print(f'relative difference: {np.linalg.norm(ours - theirs) / np.linalg.norm(theirs):.2e}')

# %% [markdown]
# ## Sample
# The `--mode=sample` driver on the converted run, with 100 respaced steps (the learned
# variances of improved DDPM keep quality at a tenth of T = 4000, Nichol & Dhariwal Sec. 4).

# %%
config = run.get_config(str(WORKDIR))
config.sampling.num_samples = 8 if smoke else 64
config.sampling.batch_size = 8 if smoke else 64
config.sampling.num_steps = '3' if smoke else '100'
resolved, workdir = main.resolve_command(config, str(WORKDIR), 'sample', {})
main.run(resolved, workdir, 'sample')
path = next(pathlib.Path(workdir, 'samples').rglob('samples.npz'))
with np.load(path) as stored:
    images = stored[stored.files[0]]
fig, axes = plt.subplots(1, 8, figsize=(12, 1.8))
for ax, image in zip(axes, images):
    ax.imshow(image)
    ax.axis('off')
plt.show()

# %% [markdown]
# The bound in bits/dim on the CIFAR-10 test set (needs the tfds data; all 4000 terms):
#
#     python -m diffusion_jax.main --workdir=runs/pretrained_cifar10_uncond_50M_500K --mode=eval
