"""diffusion_jax: denoising diffusion probabilistic models in JAX/Flax.

The core is a set of pure, jit-able functions over explicit pytrees:
  schedules          β schedules (linear, cosine, quadratic, sigmoid, const, jsd, scaled_linear)
  diffusion          GaussianDiffusion: q(x_t|x_0), posterior, p_θ, the variational bound, losses
  respace            strided schedules for fast sampling
  timestep_sampling  uniform and loss-aware importance sampling of t
  sharding           data parallelism with jax.jit over a device Mesh
"""
from diffusion_jax import diffusion
from diffusion_jax import respace
from diffusion_jax import schedules
from diffusion_jax import sharding
from diffusion_jax import timestep_sampling
from diffusion_jax.diffusion import GaussianDiffusion
from diffusion_jax.schedules import get_beta_schedule

__version__ = '0.1.0'
