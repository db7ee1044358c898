"""`--mode=sample`: draw samples from a trained run and write them, with the papers' figures.

    python -m diffusion_jax.main --workdir=runs/cifar10 --mode=sample \
        --config.sampling.method=ddim --config.sampling.num_steps=ddim50

The model, diffusion and data are the run's own (its config.json, via diffusion_jax.run); only
the sampling section comes from the command line.

Writes into <workdir>/samples/<step>/ (step = the checkpoint's):
  samples.npz        'images' uint8 [N, H, W, C] (or 'points' float32 [N, D] for point data),
                     plus 'labels' int32 [N] when the samples are class-conditional (a text
                     run's: the index of each sample's prompt in sampling_config.json's
                     'prompts')
  samples.png        a grid of the first images (a scatter plot of all the points)
  progressive.png    DDPM Fig. 6: x̂_0 along the chain, one row per example   (sampling.progressive)
  same_xt.png        DDPM Fig. 7: one x_t per row, then samples of p(x_0|x_t) (sampling.progressive)
  interpolation_ddpm.png, interpolation_ddim.png
                     DDPM Fig. 8 and DDIM Sec. 5.3 strips between pairs of generated images
                     (sampling.interpolation)
  sampling_config.json   the sampling section used, the checkpoint step, the number of
                         sampling steps and the run's diffusion section
Batches are sharded over every device ('data' mesh axis); each batch reuses one compiled sampler.
The batch-wise sampling itself is diffusion_jax.samplers.batches (the evaluation's FID uses it
without this driver); the old names draw_samples, sample_batches, parse_labels, respaced and
default_sampling_config stay importable from here.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import image_utils, latents, run, samplers, sharding, text as text_lib
from diffusion_jax.defaults import default_sampling_config  # noqa: F401  (the old name)
from diffusion_jax.respace import respaced  # noqa: F401  (the old name)
from diffusion_jax.run import CLASSIFIER_DIFFUSION_FIELDS  # noqa: F401  (the old name)
from diffusion_jax.run import load_classifier as _load_classifier
from diffusion_jax.samplers import batches
from diffusion_jax.samplers.batches import parse_labels  # noqa: F401  (the old name)

# Figure layout (presentation only): examples shown per figure and samples per shared x_t.
FIGURE_ROWS = 8
SAME_XT_SAMPLES = 7
GRID_IMAGES = 100


def _classifier(config):
    """The guiding classifier (run.load_classifier) when config.sampling asks for one."""
    return _load_classifier(config) if config.sampling.get('classifier_scale', 0.0) else None


def _guide(config, mesh=None):
    """The autoguidance guide (run.load_guide) when config.sampling asks for one."""
    return run.guide_for(config, mesh)


def _decoder(config, mesh):
    """A latent run's decoder (latents.make_decoder): its samples files hold decoded pixels."""
    autoencoder = latents.for_config(config, mesh)
    return None if autoencoder is None else latents.make_decoder(autoencoder)


def prompts_for(config, loaded):
    """A text run's PromptTable (diffusion_jax.text): sampling.prompt or the lines of
    sampling.prompts_file, encoded by the run's own encoder with the tokenizer stored in the
    run, and sampling.negative_prompt ('' by default) as classifier-free guidance's ∅;
    None for other runs."""
    if not text_lib.is_text(config):
        return None
    tok = text_lib.load_tokenizer(loaded.workdir)
    return text_lib.prompt_table(loaded.model, loaded.variables, tok,
                                 text_lib.sampling_prompts(config),
                                 config.sampling.get('negative_prompt', ''))


def _load_params(config, workdir, mesh):
    """The parameters of the run in workdir at sampling.checkpoint_step for the resolved config
    (run.load_resolved: nothing merged again), replicated on mesh."""
    return run.load_resolved(workdir, config, step=config.sampling.get('checkpoint_step',
                                                                        run.LATEST),
                             use_ema=config.sampling.get('use_ema', True), mesh=mesh)


def draw_samples(config, variables, mesh, num_samples: int, text=None):
    """samplers.batches.draw_samples with the run's guiding classifier loaded when
    config.sampling.classifier_scale > 0: (float32 [num_samples, ...] in [-1, 1], labels).
    text: a text run's PromptTable (prompts_for)."""
    return batches.draw_samples(config, variables, mesh, num_samples,
                                classifier=_classifier(config), guide=_guide(config, mesh),
                                decoder=_decoder(config, mesh), text=text)


def sample_batches(config, variables, mesh, num_samples: int, *, uint8: bool = False,
                   text=None):
    """samplers.batches.sample_batches with the guiding classifier loaded (see draw_samples)."""
    return batches.sample_batches(config, variables, mesh, num_samples, uint8=uint8,
                                  classifier=_classifier(config), guide=_guide(config, mesh),
                                  decoder=_decoder(config, mesh), text=text)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def run_sampling(config, workdir: str) -> str:
    """`--mode=sample`: config.sampling.num_samples samples of the run in workdir; returns the
    output folder, workdir/samples/<step>.

    The model, diffusion and data come from the run's stored config.json (diffusion_jax.run):
    config (None: the stored one) contributes its sampling section (and training/optim), never
    the trained sections. sampling.checkpoint_step picks the checkpoint (-1: latest).
    """
    return run_resolved(run.resolve_config(workdir, config, mode='sample'), workdir)


def run_resolved(config, workdir: str) -> str:
    """run_sampling for a config that run.resolve_config returned (main calls this)."""
    mesh = sharding.make_mesh()
    s = config.sampling
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sharding.use_compile_cache(config.get('compile_cache_dir', sharding.AUTO_CACHE))
    loaded = _load_params(config, workdir, mesh)
    step = loaded.step
    prompts = prompts_for(config, loaded)
    sampler, example_shape = batches.build_sampler(config, loaded.variables, mesh,
                                                   _classifier(config), _guide(config, mesh),
                                                   _decoder(config, mesh), prompts)
    diffusion = sampler.diffusion
    # The steps run: the respaced chain's K, or a continuous process's num_steps.
    num_run = int(getattr(diffusion, 'num_timesteps', 0) or int(s.num_steps))
    folder = os.path.join(workdir, 'samples', str(step))
    logging.info('sampling %d with %s over %d of the run\'s T=%d steps (checkpoint %d), batch %d '
                 'on %d devices', s.num_samples, s.method, num_run,
                 config.diffusion.num_timesteps, step, s.batch_size, mesh.devices.size)

    key_samples, key_progressive, key_interpolation = jax.random.split(jax.random.key(s.seed), 3)
    labels = batches.labels_for(sampler, s.num_samples)
    samples = batches.draw(sampler, key_samples, (s.batch_size, *example_shape), s.num_samples, labels)
    _write_samples(folder, samples, labels)
    if s.progressive:
        _write_progressive(folder, sampler, key_progressive, example_shape, labels)
    if s.interpolation:
        _write_interpolations(folder, sampler, key_interpolation, samples, labels)
    if jax.process_index() == 0:
        # The sampling section, plus what it ran on: the checkpoint and the trained diffusion.
        extra = {} if prompts is None else {'prompts': prompts.prompts}  # labels index them
        image_utils.write_json(os.path.join(folder, 'sampling_config.json'), dict(
            s.to_dict(), step=step, sampling_timesteps=num_run,
            diffusion=config.diffusion.to_dict(), **extra))
    return folder


def _is_points(samples) -> bool:
    return samples.ndim == 2


def _points_image(points):
    from diffusion_jax import logging_utils  # pylint: disable=import-outside-toplevel
    return logging_utils.points_image(points)


def _write_samples(folder, samples, labels):
    if jax.process_index() != 0:
        return
    extra = {} if labels is None else {'labels': labels}
    if _is_points(samples):
        image_utils.save_npz(os.path.join(folder, 'samples.npz'),
                             points=samples.astype(np.float32), **extra)
        image_utils.save_png(os.path.join(folder, 'samples.png'), _points_image(samples))
        return
    images = image_utils.to_uint8(samples)
    image_utils.save_npz(os.path.join(folder, 'samples.npz'), images=images, **extra)
    image_utils.save_grid(os.path.join(folder, 'samples.png'), images[:GRID_IMAGES])


def _strip(path, rows):
    """rows [R, C, H, W, ch] floats in [-1, 1] -> one PNG, a row per r."""
    rows = np.asarray(rows)
    image_utils.save_grid(path, image_utils.to_uint8(rows.reshape(-1, *rows.shape[2:])),
                          ncols=rows.shape[1])


def _progress_steps(num_steps: int, every: int) -> list[int]:
    every = every or max(1, num_steps // 10)
    return sorted(set(range(num_steps - 1, -1, -every)) | {0}, reverse=True)


def _write_progressive(folder, sampler, key, example_shape, labels):
    """DDPM Fig. 6 (x̂_0 at every progress_every-th step) and Fig. 7 (shared x_t)."""
    s = sampler.config.sampling
    num = s.batch_size
    y = None if labels is None else np.resize(labels, num)
    steps = _progress_steps(sampler.diffusion.num_timesteps, s.progress_every)
    out = sampler.sample(key, (num, *example_shape), y, progress_steps=steps)
    prog = np.asarray(sharding.to_host(out['progressive']))  # [K, B, ...]
    if jax.process_index() == 0:
        if len(example_shape) == 1:  # points: one scatter panel per step
            panels = [_points_image(p) for p in prog]
            image_utils.save_png(os.path.join(folder, 'progressive.png'),
                                 np.concatenate(panels, axis=1))
        else:
            _strip(os.path.join(folder, 'progressive.png'),
                   np.swapaxes(prog[:, :FIGURE_ROWS], 0, 1))
    if len(example_shape) > 1:
        _write_same_xt(folder, sampler, jax.random.fold_in(key, 1), example_shape, y)


def _write_same_xt(folder, sampler, key, example_shape, y):
    """Rows for x_t at 3/4, 1/2 and 1/4 of the chain, all on one trajectory from one x_T: x_t
    (clipped to [-1, 1] for display), then SAME_XT_SAMPLES ancestral samples of p_θ(x_0 | x_t).
    Classifier guidance is not applied here; classifier-free guidance is (it is the model_fn)."""
    d, num = sampler.diffusion, SAME_XT_SAMPLES
    # The chain to x_t runs on num copies of one x_T (one row kept), so that it and the draws
    # from x_t share one compiled program (reverse_from on a batch of num).
    model_fn = sampler.model_fn(None if y is None else jnp.full((num,), y[0], jnp.int32))
    # A self-conditioned chain feeds each step the previous step's x̂_0; the draws from x_t start
    # their own history (zeros at step t), as every sampler does at its first step.
    opts = dict(clip_denoised=sampler.config.sampling.clip_denoised,
                self_condition=sampler.options['self_condition'])
    x_T = np.repeat(np.asarray(jax.random.normal(key, (1, *example_shape))), num, axis=0)
    rows = []
    for i, frac in enumerate((0.75, 0.5, 0.25)):
        t = int(frac * (d.num_timesteps - 1))
        # (Host copies in between: the outputs live on the parameters' mesh, and an input placed
        # differently from the first call's would compile the program again.)
        x_t = sharding.to_host(samplers.reverse_from(
            d, model_fn, jax.random.fold_in(key, 2 * i + 2), x_T, d.num_timesteps - 1,
            stop=t + 1, **opts))[:1]
        draws = samplers.reverse_from(d, model_fn, jax.random.fold_in(key, 2 * i + 3),
                                      np.repeat(x_t, num, axis=0), t, **opts)
        rows.append(np.concatenate([x_t, sharding.to_host(draws)]))
    if jax.process_index() == 0:
        _strip(os.path.join(folder, 'same_xt.png'), np.stack(rows))


def _write_interpolations(folder, sampler, key, samples, labels):
    """Strips between pairs (samples[i], samples[P + i]), the two images at the ends. A
    class-conditional model is run with the first image's label (classifier guidance is not
    applied: the strips show the model's own latent space)."""
    if _is_points(samples) or len(samples) < 2:
        logging.info('interpolation figures are drawn for images only; skipped.')
        return
    s, d = sampler.config.sampling, sampler.diffusion
    pairs = min(FIGURE_ROWS, len(samples) // 2)
    x_a, x_b = jnp.asarray(samples[:pairs]), jnp.asarray(samples[pairs:2 * pairs])
    lambdas = jnp.linspace(0.0, 1.0, s.interpolation_lambdas)
    num = len(lambdas)
    y = None
    if sampler.num_classes:
        y = np.tile(labels[:pairs], num)  # the batches are [λ, pair]-ordered
    mesh = sampler.mesh_for(pairs * num)
    t = int(round(s.interpolation_t_frac * (d.num_timesteps - 1)))
    ddpm = samplers.interpolate_ddpm(d, sampler.model_fn(sampler.place(y)), key, x_a, x_b, t,
                                     lambdas, clip_denoised=s.clip_denoised, mesh=mesh,
                                     self_condition=sampler.options['self_condition'])
    # DDIM encodes the [2·pairs] batch, then decodes [λ, pair]: both must split over the mesh.
    both = mesh if sampler.mesh_for(2 * pairs) is not None else None
    encode_y = None if y is None else np.concatenate([y[:pairs], y[:pairs]])
    ddim = samplers.interpolate_ddim(d, sampler.model_fn(sampler.place(encode_y)), x_a, x_b,
                                     lambdas, mesh=both,
                                     decode_model_fn=sampler.model_fn(sampler.place(y)),
                                     inversion=s.get('inversion', 'reference'),
                                     self_condition=sampler.options['self_condition'])
    ddpm, ddim = sharding.to_host((ddpm, ddim))
    if jax.process_index() != 0:
        return
    for name, strip in (('ddpm', ddpm), ('ddim', ddim)):
        rows = np.concatenate([np.asarray(x_a)[:, None], np.swapaxes(np.asarray(strip), 0, 1),
                               np.asarray(x_b)[:, None]], axis=1)
        _strip(os.path.join(folder, f'interpolation_{name}.png'), rows)
