"""`--mode=sample`: draw samples from a trained run and write them, with the papers' figures.

    python -m diffusion_jax.main --workdir=runs/cifar10 --mode=sample \
        --config.sampling.method=ddim --config.sampling.num_steps=ddim50

The model, diffusion and data are the run's own (its config.json, via diffusion_jax.run); only
the sampling section comes from the command line.

Writes into <workdir>/samples/<step>/ (step = the checkpoint's):
  samples.npz        'images' uint8 [N, H, W, C] (or 'points' float32 [N, D] for point data),
                     plus 'labels' int32 [N] when the samples are class-conditional
  samples.png        a grid of the first images (a scatter plot of all the points)
  progressive.png    DDPM Fig. 6: x̂_0 along the chain, one row per example   (sampling.progressive)
  same_xt.png        DDPM Fig. 7: one x_t per row, then samples of p(x_0|x_t) (sampling.progressive)
  interpolation_ddpm.png, interpolation_ddim.png
                     DDPM Fig. 8 and DDIM Sec. 5.3 strips between pairs of generated images
                     (sampling.interpolation)
  sampling_config.json   the sampling section used, the checkpoint step, the number of
                         sampling steps and the run's diffusion section
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
from diffusion_jax import cold, image_utils, samplers, sharding
from diffusion_jax.logging_utils import format_duration
from diffusion_jax.respace import space_timesteps

# Figure layout (presentation only): examples shown per figure and samples per shared x_t.
FIGURE_ROWS = 8
SAME_XT_SAMPLES = 7
GRID_IMAGES = 100


def default_sampling_config() -> ml_collections.ConfigDict:
    """The `sampling` section of every experiment config."""
    c = ml_collections.ConfigDict()
    # One of samplers.METHODS: 'ancestral' (DDPM Alg. 2) | 'ddim' | 'langevin' | 'pc' |
    # 'dpmpp_2m' | 'dpmpp_3m' (DPM-Solver++, Lu et al. 2022) | 'unipc' (Zhao et al. 2023) |
    # 'heun' (EDM Alg. 1, Karras et al. 2022; 2K-1 network calls) | 'cold' / 'cold_naive'
    # (Bansal et al. 2022 Alg. 2 / 1; diffusion.process='cold' runs only)
    c.method = 'ancestral'
    c.num_steps = ''  # respacing: '' = all T steps; '250' (even) or 'ddim50' (DDIM's stride)
    c.eta = 0.0  # DDIM's η: 0 deterministic, 1 the ancestral sampler with β̃ (Song et al. 2021)
    c.clip_denoised = True  # clip x̂_0 to [-1, 1] at every step (Ho et al.'s sampler)
    # Dynamic thresholding of x̂_0 (Saharia et al. 2022, Imagen, Sec. 2.3: p = 0.995): the
    # percentile p in [0, 1); 0 = off. Every method applies it before the clip.
    c.dynamic_threshold = 0.0
    c.num_samples = 64  # samples to draw: a grid to look at (FID-scale: eval.num_samples)
    c.checkpoint_step = -1  # which checkpoint to sample; -1: the latest valid one
    c.batch_size = 256  # global batch per sampler call; a multiple of the device count
    c.guidance_scale = 0.0  # classifier-free w: ε = (1+w) ε(x,y) - w ε(x,∅); 0 = conditional
    # Guidance rescale φ of Lin et al. 2023 (eq. 15-16; they use 0.7) for classifier-free
    # guidance: the guided output takes the conditional's std, mixed with weight φ; 0 = off.
    c.guidance_rescale = 0.0
    c.classifier_scale = 0.0  # classifier guidance s (Dhariwal & Nichol 2021); 0 = off
    # How guided DDIM composes the classifier's shift with clipping: 'condition_score'
    # (guided-diffusion: ε from the clipped x̂_0, shifted, guided x̂_0 unclipped) | 'eps_shift'
    # (the shifted raw ε̂, then clip; this project's earlier order). Equal without clipping.
    c.ddim_guidance = 'condition_score'
    c.classifier_workdir = ''  # workdir of the noisy classifier run (its config.json + checkpoint)
    c.labels = ''  # class labels: '' random uniform, '3' all class 3, '0,1,2' cycled
    c.use_ema = True  # sample with the EMA parameters (Ho et al. 2020, App. B)
    c.progressive = False  # also write DDPM Fig. 6 (x̂_0 along the chain) and Fig. 7 (same x_t)
    c.progress_every = 0  # chain steps between Fig. 6 columns; 0 = K/10 (11 columns)
    c.interpolation = False  # also write DDPM (Fig. 8) and DDIM (Sec. 5.3) interpolation strips
    c.interpolation_t_frac = 0.5  # DDPM's interpolation depth t/T: t = 500 of 1000 (Fig. 8)
    c.interpolation_lambdas = 11  # λ = 0, 0.1, …, 1 (DDPM Fig. 8)
    # DDIM inversion for the interpolation strips: 'reference' (guided-diffusion's
    # ddim_reverse_sample, ε at the input's level, t -> t+1) | 'target_level' (ε_θ(x_{t-1}, t))
    c.inversion = 'reference'
    c.langevin_snr = samplers.DEFAULT_SNR  # r of the Langevin step (Song et al. 2021: 0.16)
    c.langevin_steps = samplers.DEFAULT_LANGEVIN_STEPS  # Langevin steps per level / per PC step
    c.seed = 0  # seeds x_T, the chain's noise and the random labels
    return c


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def respaced(diffusion, num_steps):
    """The diffusion over `num_steps` ('' / None / 0: unchanged; '250', 'ddim50', '10,20',
    'trailing20', 'linspace20', 'logsnr20', 'karras20': see diffusion_jax.respace)."""
    if num_steps in ('', None, 0):
        return diffusion
    return diffusion.respace(space_timesteps(diffusion.num_timesteps, str(num_steps),
                                             alphas_cumprod=np.asarray(diffusion.alphas_cumprod)))


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


# The schedule fields a guiding classifier must share with the diffusion model it guides.
CLASSIFIER_DIFFUSION_FIELDS = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end')


def _load_classifier(config):
    """grad_log_prob of the noisy classifier in sampling.classifier_workdir, and its class count.

    The classifier run's own config.json says which network it is; its raw (not EMA)
    parameters are loaded, as guided-diffusion keeps no EMA for classifiers. It must have been
    trained on the same forward process (T, schedule, β endpoints) as the model it guides:
    its gradients are meaningful only at the noise levels it was trained on.
    """
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    s = config.sampling
    workdir = s.classifier_workdir
    if not workdir or not run.Run(workdir).has_config():
        raise ValueError(f'sampling.classifier_scale={s.classifier_scale} needs '
                         'sampling.classifier_workdir: the workdir of a trained classifier run '
                         f'(with config.json); got {workdir!r}.')
    stored = run.Run(workdir).config
    for field in CLASSIFIER_DIFFUSION_FIELDS:
        mine, theirs = config.diffusion.get(field), stored.diffusion.get(field)
        if mine != theirs:
            raise ValueError(
                f'sampling.classifier_workdir={workdir!r} holds a classifier trained with '
                f'diffusion.{field}={theirs!r}, but this run has diffusion.{field}={mine!r}: '
                'train the classifier with the same diffusion section.')
    loaded = run.load(workdir, use_ema=False)
    return (guidance_lib.classifier_grad_fn(loaded.model, loaded.variables),
            int(loaded.config.model.num_classes))


def _load_params(config, workdir, mesh):
    """The run in workdir (diffusion_jax.run.load) with config's sampling section applied, at
    sampling.checkpoint_step; the parameters replicated on mesh."""
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    step = config.sampling.get('checkpoint_step', run.LATEST) if config is not None else None
    use_ema = config.sampling.get('use_ema', True) if config is not None else True
    return run.load(workdir, config, step=step, use_ema=use_ema, mesh=mesh)


class _Sampler:
    """The model, parameters, guidance and options of a run: sample(rng, y) -> [B, ...]."""

    def __init__(self, config, model, variables, diffusion, mesh):
        s = config.sampling
        self.config, self.model, self.variables = config, model, variables
        self.diffusion, self.mesh = diffusion, mesh
        # Cold diffusion (diffusion.process='cold') starts at its fully degraded prior's x_T.
        self.prior = (cold.run_prior(config, diffusion)
                      if isinstance(diffusion, cold.ColdDiffusion) else None)
        self.num_classes = int(config.model.get('num_classes', 0) or 0)
        self.grad_fn, classifier_classes = None, 0
        if s.classifier_scale:
            self.grad_fn, classifier_classes = _load_classifier(config)
        # Labels are drawn for a conditional model or for a classifier to guide towards.
        self.label_classes = self.num_classes or classifier_classes
        self.options = dict(method=s.method, eta=s.eta, clip_denoised=s.clip_denoised,
                            langevin_snr=s.langevin_snr, langevin_steps=s.langevin_steps,
                            ddim_guidance=s.get('ddim_guidance', 'condition_score'),
                            dynamic_threshold=s.get('dynamic_threshold', 0.0))

    def model_fn(self, y):
        w = self.config.sampling.guidance_scale
        if self.num_classes and w:
            return guidance_lib.classifier_free_model_fn(
                self.model.apply, self.variables, y, w, null_label=self.num_classes,
                guidance_rescale=self.config.sampling.get('guidance_rescale', 0.0))
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
        if self.prior is not None:
            options['x_T'] = self.prior.sample(rng, shape)
        return samplers.sample(self.diffusion, self.model_fn(y), rng, shape,
                               guidance=self.guidance(y), mesh=self.mesh_for(shape[0]), **options)


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
    from diffusion_jax import config_validation  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh()
    loaded = _load_params(config, workdir, mesh)
    config = config_validation.resolve(loaded.config, 'sample')
    s, step = config.sampling, loaded.step
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sampler, example_shape = _build_sampler(config, loaded.variables, mesh)
    diffusion = sampler.diffusion
    folder = os.path.join(workdir, 'samples', str(step))
    logging.info('sampling %d with %s over %d of the run\'s T=%d steps (checkpoint %d), batch %d '
                 'on %d devices', s.num_samples, s.method, diffusion.num_timesteps,
                 config.diffusion.num_timesteps, step, s.batch_size, mesh.devices.size)

    key_samples, key_progressive, key_interpolation = jax.random.split(jax.random.key(s.seed), 3)
    labels = _labels_for(sampler, s.num_samples)
    samples = _draw(sampler, key_samples, (s.batch_size, *example_shape), s.num_samples, labels)
    _write_samples(folder, samples, labels)
    if s.progressive:
        _write_progressive(folder, sampler, key_progressive, example_shape, labels)
    if s.interpolation:
        _write_interpolations(folder, sampler, key_interpolation, samples, labels)
    if jax.process_index() == 0:
        # The sampling section, plus what it ran on: the checkpoint and the trained diffusion.
        image_utils.write_json(os.path.join(folder, 'sampling_config.json'), dict(
            s.to_dict(), step=step, sampling_timesteps=int(diffusion.num_timesteps),
            diffusion=config.diffusion.to_dict()))
    return folder


def _build_sampler(config, variables, mesh):
    """(_Sampler over config.sampling's respaced diffusion, the model's example shape)."""
    from diffusion_jax import models  # pylint: disable=import-outside-toplevel
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    model = models.get_model(config.model)
    if cold.is_cold(config.diffusion):
        diffusion = cold.create_for_config(config)  # all T levels (no respacing)
    else:
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

    config: the run's config (run.load(...).config: the trained model/diffusion sections);
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


def sample_batches(config, variables, mesh, num_samples: int, *, uint8: bool = False):
    """Yields (samples, labels) batch by batch: draw_samples without holding all of them.

    samples: numpy [b, ...] float32 in [-1, 1], or with uint8=True the pixels
    round((x + 1)·127.5) clipped to [0, 255] as uint8 (image_utils.to_uint8, computed on the
    device so a quarter of the bytes cross to the host); labels [b] int32 or None. The batches
    together hold exactly num_samples. Host memory stays one batch (FID-50k of LSUN-256 would
    otherwise be ≈ 39 GB of float32 on the host).
    """
    s = config.sampling
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sampler, example_shape = _build_sampler(config, variables, mesh)
    labels = _labels_for(sampler, num_samples)
    batch = s.batch_size
    for i, x in enumerate(_draw_batches(sampler, jax.random.key(s.seed),
                                        (batch, *example_shape), num_samples, labels,
                                        _device_uint8 if uint8 else None)):
        yield x, None if labels is None else labels[i * batch:i * batch + len(x)]


@jax.jit
def _device_uint8(x):
    # The same arithmetic as image_utils.to_uint8 (float32, round half to even).
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _draw_batches(sampler, key, batch_shape, num_samples: int, labels, transform=None):
    """Host numpy batches of batch_shape[0] samples (the last one drawn whole and cut, so every
    batch runs the same compiled program), transform (on the device) applied.

    Batch i + 1 is dispatched before batch i is fetched: the device samples the next batch
    while the host copies (and the caller scores) this one, instead of idling in between.
    """
    batch = batch_shape[0]
    num_batches = math.ceil(num_samples / batch)
    start = time.time()

    def dispatch(i):
        y = None
        if labels is not None:
            y = np.resize(labels[i * batch:(i + 1) * batch], batch)
        x = sampler.sample(jax.random.fold_in(key, i), batch_shape, y)['samples']
        return x if transform is None else transform(x)

    pending = dispatch(0)
    for i in range(num_batches):
        current, pending = pending, dispatch(i + 1) if i + 1 < num_batches else None
        x = np.asarray(sharding.to_host(current))
        if i == 0:  # the ETA as soon as there is one (this batch includes the compilation)
            first = time.time() - start
            logging.info('batch 1/%d took %.1fs (with compilation), ETA %s', num_batches, first,
                         format_duration(first * (num_batches - 1)))
        elif (i + 1) % 10 == 0 or i + 1 == num_batches:
            per_batch = (time.time() - start - first) / i
            logging.info('batch %d/%d, %.2f samples/s, ETA %s', i + 1, num_batches,
                         batch / per_batch, format_duration(per_batch * (num_batches - i - 1)))
        yield x[:num_samples - i * batch]


def _draw(sampler, key, batch_shape, num_samples: int, labels):
    """num_samples samples in batches of batch_shape[0]. Returns float32 numpy [num_samples, ...]."""
    return np.concatenate(list(_draw_batches(sampler, key, batch_shape, num_samples, labels)))


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
                                     decode_model_fn=sampler.model_fn(sampler.place(y)),
                                     inversion=s.get('inversion', 'reference'))
    ddpm, ddim = sharding.to_host((ddpm, ddim))
    if jax.process_index() != 0:
        return
    for name, strip in (('ddpm', ddpm), ('ddim', ddim)):
        rows = np.concatenate([np.asarray(x_a)[:, None], np.swapaxes(np.asarray(strip), 0, 1),
                               np.asarray(x_b)[:, None]], axis=1)
        _strip(os.path.join(folder, f'interpolation_{name}.png'), rows)
