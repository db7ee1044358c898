"""Sampling from a trained diffusion: a registry of samplers over a (respaced) chain, their
runners, and editing (DDIM inversion, interpolation, same-x_t samples).

    from diffusion_jax import samplers
    out = samplers.sample(diffusion, model_fn, rng, shape, method='dpmpp_2m')  # dict(samples=...)

Layout (one sampler = one registered unit in one module, with its equation in the docstring):
  registry.py    register_sampler / get_sampler / names / nfe: the list of methods
  common.py      options, per-step constants, x̂_0 with clipping/thresholding and guidance
  ancestral.py   'ancestral'  DDPM Algorithm 2                                   NFE K
  ddim.py        'ddim'       Song et al. 2021 eq. 12 (η)                        NFE K
  langevin.py    'langevin', 'pc'  Song & Ermon 2019 Alg. 1; Song et al. 2021 Alg. 5
                                                                  NFE K (langevin_steps + 1)
  dpm_solver.py  'dpmpp_2m', 'dpmpp_3m'  DPM-Solver++ multistep (Lu et al. 2022)  NFE K
  unipc.py       'unipc'      UniPC bh2, order 2 (Zhao et al. 2023)              NFE K
  heun.py        'heun'       EDM Algorithm 1 (Karras et al. 2022)               NFE 2K - 1
  consistency.py 'consistency' multistep consistency sampling (Song et al. 2023, Alg. 1) NFE K
  cold.py        'cold', 'cold_naive'  Bansal et al. 2022 Algorithms 2 and 1 over a
                 diffusion_jax.cold.ColdDiffusion; cold_restore, cold_generate     NFE T
  chain.py       sample, reverse_from, langevin_correct: one jit per (method, options, K, shape)
  options.py     which method-specific sampling.* fields each method reads (refused otherwise,
                 config_validation) and the spacing warning of the multistep solvers
  process_solvers.py  the samplers over a continuous process (diffusion_jax.processes 'flow',
                 'edm'): 'euler', 'heun' (EDM Alg. 2 with churn), 'ddim', 'dpmpp_2m', 'dpmpp_3m',
                 'unipc' through the process's x̂_0 and λ (the dpm_solver/unipc updates);
                 `sample(process, ...)` dispatches there
  editing.py     ddim_encode (inversion='reference' | 'target_level'), interpolate_ddim,
                 interpolate_ddpm, same_xt_samples, slerp
  edit.py        repaint (Lugmayr et al. 2022, with resampling), sdedit (Meng et al. 2022),
                 ddim_edit (invert, decode with another label/scale), make_mask
  process_edit.py  the three edits on a continuous process's grid and marginals (edit.py
                 dispatches there when given a 'flow' or 'edm' process)
  batches.py     a run's samples in batches over the mesh: draw_samples, sample_batches
                 (imported as diffusion_jax.samplers.batches; --mode=sample and FID use it)
Samplers call the network as ctx.model_fn(x, t) with their own step indices t: common.context
wraps the caller's model_fn with diffusion.wrap_model, the one place the index becomes the
network's timestep.
Guidance stays in diffusion_jax.guidance: it builds model-side pytrees (classifier-free model_fn,
classifier gradient) that train.py, generate.py and the experiments use without a sampler; how
a sampler applies a classifier's gradient (and in which order with clipping) is in common.py.
"""
# Import order registers the samplers: METHODS lists them in this order.
from diffusion_jax.samplers import ancestral, ddim, langevin  # noqa: F401
from diffusion_jax.samplers import dpm_solver, unipc, heun  # noqa: F401  (isort: skip)
from diffusion_jax.samplers import cold  # noqa: F401  (isort: skip)
from diffusion_jax.samplers.cold import cold_generate, cold_restore
from diffusion_jax.samplers import consistency  # noqa: F401  (isort: skip)
from diffusion_jax.samplers.edit import (MASKS, ddim_edit, make_mask, repaint, repaint_schedule,
                                         sdedit, sdedit_start)
from diffusion_jax.samplers.ancestral import ancestral_step
from diffusion_jax.samplers.chain import langevin_correct, reverse_from, sample
from diffusion_jax.samplers.common import (DDIM_GUIDANCE, DEFAULT_LANGEVIN_STEPS, DEFAULT_SNR,
                                           condition_score, dynamic_threshold, guided_model_output)
from diffusion_jax.samplers.ddim import ddim_step
from diffusion_jax.samplers.editing import (INVERSIONS, ddim_encode, ddim_encode_step,
                                            ddim_reverse_step, interpolate_ddim, interpolate_ddpm,
                                            same_xt_samples, slerp)
from diffusion_jax.samplers.langevin import annealed_step_size, langevin_step, snr_step_size
from diffusion_jax.samplers.registry import get_sampler, names, nfe, register_sampler
from diffusion_jax.samplers import process_solvers  # noqa: E402  (after the chain's modules)
from diffusion_jax.samplers import options  # noqa: E402,F401
from diffusion_jax.samplers import process_edit  # noqa: E402
from diffusion_jax.guidance import (ClassifierGuidance, bind_model, classifier_free_model_fn,
                                    classifier_grad_fn, classifier_guidance)

METHODS = names()  # every registered method name, from the registry

__all__ = ['METHODS', 'INVERSIONS', 'DDIM_GUIDANCE', 'DEFAULT_SNR', 'DEFAULT_LANGEVIN_STEPS',
           'sample', 'reverse_from', 'cold_restore', 'cold_generate', 'repaint', 'sdedit',
           'ddim_edit', 'make_mask', 'repaint_schedule', 'sdedit_start', 'MASKS',
           'ddim_encode', 'interpolate_ddpm', 'interpolate_ddim',
           'same_xt_samples', 'slerp', 'langevin_correct', 'ancestral_step', 'ddim_step',
           'ddim_encode_step', 'ddim_reverse_step', 'langevin_step', 'snr_step_size',
           'annealed_step_size', 'guided_model_output', 'condition_score', 'dynamic_threshold',
           'register_sampler', 'get_sampler', 'names', 'nfe', 'process_solvers', 'process_edit',
           'ClassifierGuidance',
           'classifier_guidance', 'classifier_grad_fn', 'classifier_free_model_fn', 'bind_model']
