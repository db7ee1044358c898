"""`--mode=sample`: draw samples from a trained run and write them, with the papers' figures.

    python -m diffusion_jax.main --config=configs/cifar10.py --mode=sample \
        --config.sampling.method=ddim --config.sampling.num_steps=ddim50

Writes into <workdir>/samples/<step>/ (step = the checkpoint's):
  samples.npz        'images' uint8 [N, H, W, C] (or 'points' float32 [N, D] for point data),
                     plus 'labels' int32 [N] when the samples are class-conditional
  samples.png        a grid of the first images (a scatter plot of all the points)
  progressive.png    DDPM Fig. 6: x̂_0 along the chain, one row per example   (sampling.progressive)
  same_xt.png        DDPM Fig. 7: one x_t per row, then samples of p(x_0|x_t) (sampling.progressive)
  interpolation_ddpm.png, interpolation_ddim.png
                     DDPM Fig. 8 and DDIM Sec. 5.3 strips between pairs of generated images
                     (sampling.interpolation)
  sampling_config.json   the sampling section used
Batches are sharded over every device ('data' mesh axis); each batch reuses one compiled sampler.
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import guidance as guidance_lib
from diffusion_jax import image_utils, samplers, sharding
from diffusion_jax.respace import space_timesteps

# Figure layout (presentation only): examples shown per figure and samples per shared x_t.
FIGURE_ROWS = 8
SAME_XT_SAMPLES = 7
GRID_IMAGES = 100


def default_sampling_config() -> ml_collections.ConfigDict:
    """The `sampling` section of every experiment config."""
    c = ml_collections.ConfigDict()
    c.method = 'ancestral'  # 'ancestral' (DDPM Alg. 2) | 'ddim' | 'langevin' | 'pc'
    c.num_steps = ''  # respacing: '' = all T steps; '250' (even) or 'ddim50' (DDIM's stride)
    c.eta = 0.0  # DDIM's η: 0 deterministic, 1 the ancestral sampler with β̃ (Song et al. 2021)
    c.clip_denoised = True  # clip x̂_0 to [-1, 1] at every step (Ho et al.'s sampler)
    c.num_samples = 50_000  # samples to draw: 50k for FID (Ho et al. 2020, Sec. 4)
    c.batch_size = 256  # global batch per sampler call; a multiple of the device count
    c.guidance_scale = 0.0  # classifier-free w: ε = (1+w) ε(x,y) - w ε(x,∅); 0 = conditional
    c.classifier_scale = 0.0  # classifier guidance s (Dhariwal & Nichol 2021); 0 = off
    c.classifier_workdir = ''  # workdir of the noisy classifier run (its config.json + checkpoint)
    c.labels = ''  # class labels: '' random uniform, '3' all class 3, '0,1,2' cycled
    c.use_ema = True  # sample with the EMA parameters (Ho et al. 2020, App. B)
    c.progressive = False  # also write DDPM Fig. 6 (x̂_0 along the chain) and Fig. 7 (same x_t)
    c.progress_every = 0  # chain steps between Fig. 6 columns; 0 = K/10 (11 columns)
    c.interpolation = False  # also write DDPM (Fig. 8) and DDIM (Sec. 5.3) interpolation strips
    c.interpolation_t_frac = 0.5  # DDPM's interpolation depth t/T: t = 500 of 1000 (Fig. 8)
    c.interpolation_lambdas = 11  # λ = 0, 0.1, …, 1 (DDPM Fig. 8)
    c.langevin_snr = samplers.DEFAULT_SNR  # r of the Langevin step (Song et al. 2021: 0.16)
    c.langevin_steps = samplers.DEFAULT_LANGEVIN_STEPS  # Langevin steps per level / per PC step
    c.seed = 0  # seeds x_T, the chain's noise and the random labels
    return c


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def respaced(diffusion, num_steps):
    """The diffusion over `num_steps` ('' / None / 0: unchanged; '250', 'ddim50', '10,20')."""
    if num_steps in ('', None, 0):
        return diffusion
    return diffusion.respace(space_timesteps(diffusion.num_timesteps, str(num_steps)))


def parse_labels(labels, num_classes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count] int32 labels: '' / None random uniform, an int (or '3') one class, a sequence
    (or '0,1,2') cycled."""
    if labels in ('', None):
        return rng.integers(0, num_classes, count).astype(np.int32)
    if isinstance(labels, str):
        labels = [int(v) for v in labels.split(',') if v.strip()]
    values = np.atleast_1d(np.asarray(labels, np.int64))
    if values.size == 0 or values.min() < 0 or values.max() >= num_classes:
        raise ValueError(f'sampling.labels={labels!r}: labels must lie in [0, {num_classes}).')
    return np.resize(values, count).astype(np.int32)


def _load_classifier(sampling_config):
    """grad_log_prob of the noisy classifier in sampling.classifier_workdir, and its class count.

    The classifier run's own config.json says which network it is; its raw (not EMA)
    parameters are loaded, as guided-diffusion keeps no EMA for classifiers.
    """
    from diffusion_jax import checkpointing, models  # pylint: disable=import-outside-toplevel
    workdir = sampling_config.classifier_workdir
    stored = checkpointing.stored_config(workdir) if workdir else None
    if stored is None:
        raise ValueError(f'sampling.classifier_scale={sampling_config.classifier_scale} needs '
                         'sampling.classifier_workdir: the workdir of a trained classifier run '
                         f'(with config.json); got {workdir!r}.')
    config = ml_collections.ConfigDict(stored)
    model = models.get_model(config.model)
    variables, _ = checkpointing.load_params_for_inference(config, workdir, use_ema=False)
    return guidance_lib.classifier_grad_fn(model, variables), int(config.model.num_classes)


def _load_params(config, workdir):
    from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
    return checkpointing.load_params_for_inference(config, workdir,
                                                   use_ema=config.sampling.use_ema)


class _Sampler:
    """The model, parameters, guidance and options of a run: sample(rng, y) -> [B, ...]."""

    def __init__(self, config, model, variables, diffusion, mesh):
        s = config.sampling
        self.config, self.model, self.variables = config, model, variables
        self.diffusion, self.mesh = diffusion, mesh
        self.num_classes = int(config.model.get('num_classes', 0) or 0)
        self.grad_fn, classifier_classes = None, 0
        if s.classifier_scale:
            self.grad_fn, classifier_classes = _load_classifier(s)
        # Labels are drawn for a conditional model or for a classifier to guide towards.
        self.label_classes = self.num_classes or classifier_classes
        self.options = dict(method=s.method, eta=s.eta, clip_denoised=s.clip_denoised,
                            langevin_snr=s.langevin_snr, langevin_steps=s.langevin_steps)

    def model_fn(self, y):
        w = self.config.sampling.guidance_scale
        if self.num_classes and w:
            return guidance_lib.classifier_free_model_fn(self.model.apply, self.variables, y, w,
                                                         null_label=self.num_classes)
        return guidance_lib.bind_model(self.model.apply, self.variables,
                                       y if self.num_classes else None)

    def guidance(self, y):
        if self.grad_fn is None:
            return None
        return guidance_lib.classifier_guidance(self.grad_fn, y,
                                                self.config.sampling.classifier_scale)

    def mesh_for(self, batch: int):
        """The mesh when the batch splits evenly over it (figures may not), else one device."""
        return self.mesh if batch % self.mesh.devices.size == 0 else None

    def place(self, y):
        if y is None:
            return None
        if self.mesh_for(len(y)) is None:
            return jnp.asarray(y)
        return jax.make_array_from_callback(y.shape, sharding.data_sharding(self.mesh),
                                            lambda index: y[index])

    def sample(self, rng, shape, y=None, **overrides):
        y = self.place(y)
        options = dict(self.options, **overrides)
        return samplers.sample(self.diffusion, self.model_fn(y), rng, shape,
                               guidance=self.guidance(y), mesh=self.mesh_for(shape[0]), **options)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def run_sampling(config, workdir: str) -> str:
    """Samples config.sampling.num_samples from the latest checkpoint in workdir; returns the
    output folder, workdir/samples/<step>."""
    s = config.sampling
    mesh = sharding.make_mesh()
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    variables, step = _load_params(config, workdir)
    sampler, example_shape = _build_sampler(config, sharding.replicate(variables, mesh), mesh)
    diffusion = sampler.diffusion
    folder = os.path.join(workdir, 'samples', str(step))
    logging.info('sampling %d with %s over %d steps (checkpoint %d), batch %d on %d devices',
                 s.num_samples, s.method, diffusion.num_timesteps, step, s.batch_size,
                 mesh.devices.size)

    key_samples, key_progressive, key_interpolation = jax.random.split(jax.random.key(s.seed), 3)
    labels = _labels_for(sampler, s.num_samples)
    samples = _draw(sampler, key_samples, (s.batch_size, *example_shape), s.num_samples, labels)
    _write_samples(folder, samples, labels)
    if s.progressive:
        _write_progressive(folder, sampler, key_progressive, example_shape, labels)
    if s.interpolation:
        _write_interpolations(folder, sampler, key_interpolation, samples, labels)
    if jax.process_index() == 0:
        image_utils.write_json(os.path.join(folder, 'sampling_config.json'), s.to_dict())
    return folder


def _build_sampler(config, variables, mesh):
    """(_Sampler over config.sampling's respaced diffusion, the model's example shape)."""
    from diffusion_jax import models  # pylint: disable=import-outside-toplevel
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    model = models.get_model(config.model)
    diffusion = respaced(create_diffusion(config.diffusion), config.sampling.num_steps)
    return _Sampler(config, model, variables, diffusion, mesh), models.example_shape(model)


def _labels_for(sampler, count: int):
    """Labels for a conditional model or a guiding classifier (sampling.labels), else None."""
    if not sampler.label_classes:
        return None
    s = sampler.config.sampling
    return parse_labels(s.labels, sampler.label_classes, count, np.random.default_rng(s.seed))


def draw_samples(config, variables, mesh, num_samples: int):
    """num_samples samples of the run's model with config.sampling's sampler, in memory.

    variables: the model's {'params': ...} (replicated on the mesh). Returns (float32 numpy
    [num_samples, ...] in [-1, 1], labels [num_samples] int32 or None). Used by the evaluation
    (FID/IS) and by experiments that sweep sampler settings.
    """
    s = config.sampling
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sampler, example_shape = _build_sampler(config, variables, mesh)
    labels = _labels_for(sampler, num_samples)
    samples = _draw(sampler, jax.random.key(s.seed), (s.batch_size, *example_shape),
                    num_samples, labels)
    return samples, labels


def _draw(sampler, key, batch_shape, num_samples: int, labels):
    """num_samples samples in batches of batch_shape[0] (the last one drawn whole and cut, so
    every batch runs the same compiled program). Returns float32 numpy [num_samples, ...]."""
    batch = batch_shape[0]
    num_batches = math.ceil(num_samples / batch)
    out, start = [], time.time()
    for i in range(num_batches):
        y = None
        if labels is not None:
            y = np.resize(labels[i * batch:(i + 1) * batch], batch)
        x = sampler.sample(jax.random.fold_in(key, i), batch_shape, y)['samples']
        out.append(np.asarray(sharding.to_host(x)))
        if i == 0 or (i + 1) % 10 == 0 or i + 1 == num_batches:
            logging.info('batch %d/%d, %.2f samples/s', i + 1, num_batches,
                         (i + 1) * batch / (time.time() - start))
    return np.concatenate(out)[:num_samples]


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
    opts = dict(clip_denoised=sampler.config.sampling.clip_denoised)
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
                                     lambdas, clip_denoised=s.clip_denoised, mesh=mesh)
    # DDIM encodes the [2·pairs] batch, then decodes [λ, pair]: both must split over the mesh.
    both = mesh if sampler.mesh_for(2 * pairs) is not None else None
    encode_y = None if y is None else np.concatenate([y[:pairs], y[:pairs]])
    ddim = samplers.interpolate_ddim(d, sampler.model_fn(sampler.place(encode_y)), x_a, x_b,
                                     lambdas, mesh=both,
                                     decode_model_fn=sampler.model_fn(sampler.place(y)))
    ddpm, ddim = sharding.to_host((ddpm, ddim))
    if jax.process_index() != 0:
        return
    for name, strip in (('ddpm', ddpm), ('ddim', ddim)):
        rows = np.concatenate([np.asarray(x_a)[:, None], np.swapaxes(np.asarray(strip), 0, 1),
                               np.asarray(x_b)[:, None]], axis=1)
        _strip(os.path.join(folder, f'interpolation_{name}.png'), rows)
