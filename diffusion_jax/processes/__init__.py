"""Processes: the forward noising families a model can be trained and sampled with, behind one
interface (base.py's docstring lists it).

    from diffusion_jax import processes
    process = processes.get_process(config.diffusion)   # by config.diffusion.process
    terms = process.loss(model_fn, x0, key)               # dict(loss=[B], ...)
    x0_hat = process.denoise(model_fn, x_t, t)

  'gaussian'  GaussianProcess(GaussianDiffusion)  DDPM family, discrete steps (the default)
  'flow'      FlowMatching()                       rectified flow, SD3 convention
  'edm'       EDM()                                Karras et al. 2022 preconditioning
  'cold'      cold.ColdDiffusion                   Bansal et al. 2022's deterministic degradations
              (built at diffusion.image_shape, which config_validation.resolve derives; not a
              Gaussian-marginal Process: degrade/restore/loss and the 'cold' samplers)
min_snr_weight: min-SNR-γ (Hang et al. 2023). Adding a process: a module here with a Process
subclass and a `@register_process(name)` builder, imported below.
"""
from diffusion_jax.processes.base import (Process, check_name, get_process, names,
                                          register_process)
from diffusion_jax.processes.gaussian import GaussianProcess, check_weighting
from diffusion_jax.processes.flow import FlowMatching, shift_time
from diffusion_jax.processes.edm import EDM
from diffusion_jax.processes import cold as _cold  # noqa: F401  (registers 'cold')
from diffusion_jax.processes.weighting import WEIGHTINGS, min_snr_weight

PROCESSES = names()

__all__ = ['Process', 'GaussianProcess', 'FlowMatching', 'EDM', 'get_process', 'names',
           'register_process', 'check_name', 'check_weighting', 'shift_time', 'min_snr_weight',
           'WEIGHTINGS', 'PROCESSES']
