"""Batch-wise sample generation: a run's model, parameters and config.sampling, sampled in
batches of sampling.batch_size over the device mesh, in memory (draw_samples) or streamed
(sample_batches). The library under `--mode=sample` (diffusion_jax.generate), the evaluation's
FID/IS (diffusion_jax.evaluation.sample_quality) and the experiments; it writes nothing.

    samples, labels = batches.draw_samples(loaded.config, loaded.variables, mesh, 64)

config: a resolved config (diffusion_jax.run.resolve_config / run.load(...).config) with the
trained model/diffusion sections and a sampling section; variables: the model's {'params': ...},
replicated on the mesh. Classifier guidance (sampling.classifier_scale > 0) needs the guiding
classifier, loaded by the caller from its run (diffusion_jax.run.load_classifier).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import guidance as guidance_lib
from diffusion_jax import cold, models, processes, sharding
from diffusion_jax.diffusion import create_diffusion
from diffusion_jax import logging_utils
from diffusion_jax.logging_utils import format_duration
from diffusion_jax.respace import respaced
from diffusion_jax.samplers import chain


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


class Sampler:
    """The model, parameters, guidance and options of a run: sample(rng, shape, y) -> the
    samplers.sample dict. classifier: (grad_fn, num_classes) of the guiding noisy classifier
    (run.load_classifier), needed when sampling.classifier_scale > 0. guide: the weak model of
    autoguidance (run.load_guide: .model, .variables, .config), needed when
    sampling.guidance_model_workdir is set and sampling.guidance_scale > 0; the scale then
    guides towards the main model and away from the guide instead of the unconditional model.
    text: a text run's encoded prompts (diffusion_jax.text.PromptTable: .condition(indices)
    and .uncond, the negative prompt's); y is then a prompt index per sample, and
    classifier-free guidance's ∅ is text.uncond."""

    def __init__(self, config, model, variables, diffusion, mesh, classifier=None, guide=None,
                 decoder=None, text=None):
        s = config.sampling
        self.text = text
        if getattr(model, 'text_encoder', '') and text is None:
            raise ValueError('a text run samples from prompts: pass text=diffusion_jax.text.'
                             'prompt_table(...) (sampling.prompt or sampling.prompts_file).')
        # A latent run's decoder (latents.make_decoder, loaded by the caller): 'samples' are
        # then decoded pixels and 'latents' what the chain produced.
        self.decoder = decoder
        self.guide = None
        if s.get('guidance_model_workdir', '') and s.guidance_scale:
            if guide is None:
                raise ValueError(f'sampling.guidance_model_workdir={s.guidance_model_workdir!r} '
                                 'needs the guide loaded: pass guide=run.load_guide(config) (or '
                                 'set sampling.guidance_scale=0).')
            self.guide = guide
        self.config, self.model, self.variables = config, model, variables
        self.diffusion, self.mesh = diffusion, mesh
        # Cold diffusion (diffusion.process='cold') starts at its fully degraded prior's x_T.
        self.prior = (cold.run_prior(config, diffusion)
                      if isinstance(diffusion, cold.ColdDiffusion) else None)
        self.num_classes = int(config.model.get('num_classes', 0) or 0)
        self.grad_fn, classifier_classes = None, 0
        if s.classifier_scale:
            if classifier is None:
                raise ValueError(f'sampling.classifier_scale={s.classifier_scale} needs the '
                                 'guiding classifier: pass classifier=run.load_classifier(config) '
                                 '(or set sampling.classifier_scale=0).')
            self.grad_fn, classifier_classes = classifier
        # Labels are drawn for a conditional model or for a classifier to guide towards; a
        # text run's "labels" index its prompts.
        self.label_classes = (len(text.prompts) if text is not None
                              else self.num_classes or classifier_classes)
        self.options = dict(method=s.method, eta=s.eta, clip_denoised=s.clip_denoised,
                            langevin_snr=s.langevin_snr, langevin_steps=s.langevin_steps,
                            ddim_guidance=s.get('ddim_guidance', 'auto'),
                            dynamic_threshold=s.get('dynamic_threshold', 0.0),
                            self_condition=self_conditioned(config))

    def model_fn(self, y):
        w = self.config.sampling.guidance_scale
        if self.text is not None:  # prompt indices -> their context (all the first: y None)
            cond = self.text.condition(jnp.zeros((1,), jnp.int32) if y is None else y)
            if w:
                return guidance_lib.classifier_free_model_fn(
                    self.model.apply, self.variables, cond, w, uncond=self.text.uncond,
                    guidance_rescale=self.config.sampling.get('guidance_rescale', 0.0),
                    interval=guidance_interval(self.config),
                    channels=self.config.sampling.get('guidance_channels', 0))
            return guidance_lib.bind_model(self.model.apply, self.variables, cond)
        if self.guide is not None:
            guide_classes = int(self.guide.config.model.get('num_classes', 0) or 0)
            return guidance_lib.autoguidance_model_fn(
                guidance_lib.bind_model(self.model.apply, self.variables,
                                        y if self.num_classes else None),
                guidance_lib.bind_model(self.guide.model.apply, self.guide.variables,
                                        y if guide_classes else None), w,
                guidance_rescale=self.config.sampling.get('guidance_rescale', 0.0),
                interval=guidance_interval(self.config))
        if self.num_classes and w:
            return guidance_lib.classifier_free_model_fn(
                self.model.apply, self.variables, y, w, null_label=self.num_classes,
                guidance_rescale=self.config.sampling.get('guidance_rescale', 0.0),
                interval=guidance_interval(self.config),
                channels=self.config.sampling.get('guidance_channels', 0))
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
        out = chain.sample(self.diffusion, self.model_fn(y), rng, shape,
                           guidance=self.guidance(y), mesh=self.mesh_for(shape[0]), **options)
        if self.decoder is not None:
            out = dict(out, latents=out['samples'], samples=self.decoder(out['samples']))
        return out


CHURN_FIELDS = ('s_churn', 's_tmin', 's_tmax', 's_noise')


def self_conditioned(config) -> bool:
    """Whether the run's network was trained with self-conditioning (training.self_condition;
    absent in runs trained before the field existed)."""
    return bool(config.get('training', {}).get('self_condition', False))


def sampling_target(config, diffusion):
    """(what samplers.sample runs over, its extra options) for config.sampling: the respaced
    GaussianDiffusion for diffusion.process='gaussian' (the default), the ColdDiffusion of
    'cold' (diffusion_jax.cold), else the run's process (diffusion_jax.processes) with
    num_steps = K and the churn options."""
    s = config.sampling
    if config.diffusion.get('process', 'gaussian') == 'gaussian':
        extra = {}
        if s.get('method') == 'consistency':
            extra['consistency'] = consistency_parameters(config, diffusion)
        return respaced(diffusion, s.get('num_steps', '')), extra
    if cold.is_cold(config.diffusion):
        return cold.create_for_config(config), {}  # all T levels (a cold chain is not respaced)
    options = {k: float(s[k]) for k in CHURN_FIELDS if k in s}
    return processes.get_process(config.diffusion), dict(options, num_steps=int(s.num_steps))


def consistency_parameters(config, diffusion) -> tuple[float, float]:
    """(σ_min, σ_data) of a consistency-distilled run: σ_min = σ̃ at timestep 0 of the
    un-respaced diffusion (the level f(x, σ_min) = x is pinned to), σ_data =
    config.distill.sigma_data."""
    distill = config.get('distill', None)
    if distill is None or 'sigma_data' not in distill:
        raise ValueError("sampling.method='consistency' samples a consistency-distilled run "
                         '(config.distill.method=consistency); this run has no distill section.')
    return (float(np.asarray(diffusion.sqrt_recipm1_alphas_cumprod)[0]),
            float(distill.sigma_data))


def guidance_interval(config):
    """(lo, hi, σ of the network's time input) of sampling.guidance_interval, or None."""
    bounds = guidance_lib.parse_guidance_interval(config.sampling.get('guidance_interval', ''))
    if bounds is None:
        return None
    return (*bounds, processes.get_process(config.diffusion).network_sigma())


def build_sampler(config, variables, mesh, classifier=None, guide=None, decoder=None, text=None):
    """(Sampler over config.sampling's respaced diffusion or the run's process, the model's
    example shape). classifier, guide, decoder, text: see Sampler (with a decoder the example
    shape is still the latent one)."""
    model = models.get_model(config.model)
    base = None if cold.is_cold(config.diffusion) else create_diffusion(config.diffusion)
    target, extra = sampling_target(config, base)
    sampler = Sampler(config, model, variables, target, mesh, classifier, guide, decoder, text)
    sampler.options.update(extra)
    return sampler, models.data_shape(model, self_conditioned(config))


def labels_for(sampler, count: int):
    """Labels for a conditional model or a guiding classifier (sampling.labels), else None."""
    if not sampler.label_classes:
        return None
    if sampler.text is not None:  # the prompts, cycled (sampling.prompts_file: one per line)
        return np.arange(count, dtype=np.int32) % sampler.label_classes
    s = sampler.config.sampling
    return parse_labels(s.labels, sampler.label_classes, count, np.random.default_rng(s.seed))


def draw_samples(config, variables, mesh, num_samples: int, *, classifier=None, guide=None,
                 decoder=None, text=None):
    """num_samples samples of the run's model with config.sampling's sampler, in memory.

    config: the run's config (run.load(...).config: the trained model/diffusion sections);
    variables: the model's {'params': ...} (replicated on the mesh). Returns (float32 numpy
    [num_samples, ...] in [-1, 1], labels [num_samples] int32 or None). Used by the evaluation
    (FID/IS) and by experiments that sweep sampler settings. classifier, guide, decoder, text:
    see Sampler (a latent run's samples are the decoded pixels; a text run's labels are prompt
    indices).
    """
    s = config.sampling
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sampler, example_shape = build_sampler(config, variables, mesh, classifier, guide, decoder,
                                           text)
    labels = labels_for(sampler, num_samples)
    samples = draw(sampler, jax.random.key(s.seed), (s.batch_size, *example_shape),
                    num_samples, labels)
    return samples, labels


def sample_batches(config, variables, mesh, num_samples: int, *, uint8: bool = False,
                   classifier=None, guide=None, decoder=None, text=None):
    """Yields (samples, labels) batch by batch: draw_samples without holding all of them.

    samples: numpy [b, ...] float32 in [-1, 1], or with uint8=True the pixels
    round((x + 1)·127.5) clipped to [0, 255] as uint8 (image_utils.to_uint8, computed on the
    device so a quarter of the bytes cross to the host); labels [b] int32 or None. The batches
    together hold exactly num_samples. Host memory stays one batch (FID-50k of LSUN-256 would
    otherwise be ≈ 39 GB of float32 on the host).
    """
    s = config.sampling
    sharding.check_global_batch(s.batch_size, mesh, 'sampling.batch_size')
    sampler, example_shape = build_sampler(config, variables, mesh, classifier, guide, decoder,
                                           text)
    labels = labels_for(sampler, num_samples)
    batch = s.batch_size
    for i, x in enumerate(draw_batches(sampler, jax.random.key(s.seed),
                                        (batch, *example_shape), num_samples, labels,
                                        _device_uint8 if uint8 else None)):
        yield x, None if labels is None else labels[i * batch:i * batch + len(x)]


@jax.jit
def _device_uint8(x):
    # The same arithmetic as image_utils.to_uint8 (float32, round half to even).
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def batch_sizes(num_samples: int, batch: int, num_devices: int) -> list[int]:
    """The size of each batch: `batch` but the last (or only) one, which holds the rest rounded
    up to a multiple of the device count (so it still shards), never more than `batch`.
    4 samples with sampling.batch_size=256 on 8 devices: one batch of 8, not 256."""
    full, rest = divmod(num_samples, batch)
    last = min(batch, -(-rest // num_devices) * num_devices) if rest else 0
    return [batch] * full + ([last] if last else [])


def draw_batches(sampler, key, batch_shape, num_samples: int, labels, transform=None):
    """Host numpy batches of batch_shape[0] samples, the last (or only) one only as large as
    what is left needs (batch_sizes: one more compiled program when it is smaller, instead of
    sampling a whole batch to keep a few), cut to num_samples; transform (on the device) applied.

    Batch i + 1 is dispatched before batch i is fetched: the device samples the next batch
    while the host copies (and the caller scores) this one, instead of idling in between.
    """
    batch = batch_shape[0]
    sizes = batch_sizes(num_samples, batch, sampler.mesh.devices.size)
    num_batches = len(sizes)
    start = time.time()

    def dispatch(i):
        size, y = sizes[i], None
        if labels is not None:
            y = np.resize(labels[i * batch:i * batch + size], size)
        x = sampler.sample(jax.random.fold_in(key, i), (size, *batch_shape[1:]), y)['samples']
        return x if transform is None else transform(x)

    bar = logging_utils.progress_bar(num_batches, 'sample', unit='batch')
    try:
        yield from _fetch_batches(dispatch, num_batches, num_samples, batch, start, bar)
    finally:
        bar.close()


def _fetch_batches(dispatch, num_batches: int, num_samples: int, batch: int, start: float,
                   bar):
    # The first batch is fetched before the next is dispatched, so that its compile (or
    # persistent-cache load) and run time are measured alone.
    with sharding.CompileClock() as clock:
        x = np.asarray(sharding.to_host(dispatch(0)))
    first = time.time() - start
    logging.info('batch 1/%d: %s, ETA %s', num_batches, clock.report(),
                 format_duration((first - clock.seconds) * (num_batches - 1)))
    pending = None
    for i in range(num_batches):
        if i:
            current = pending
        pending = dispatch(i + 1) if i + 1 < num_batches else None
        if i:
            x = np.asarray(sharding.to_host(current))
            if (i + 1) % 10 == 0 or i + 1 == num_batches:
                per_batch = (time.time() - start - first) / i
                logging.info('batch %d/%d, %.2f samples/s, ETA %s', i + 1, num_batches,
                             batch / per_batch, format_duration(per_batch * (num_batches - i - 1)))
        bar.update(1)
        yield x[:num_samples - i * batch]


def draw(sampler, key, batch_shape, num_samples: int, labels):
    """num_samples samples in batches of batch_shape[0]. Returns float32 numpy [num_samples, ...]."""
    return np.concatenate(list(draw_batches(sampler, key, batch_shape, num_samples, labels)))
