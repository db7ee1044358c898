"""Training: the train state, one jitted data-parallel step, and the loop `train_and_evaluate`.

One step (Ho et al. 2020, Algorithm 1, with improved DDPM's options):
    t ~ p(t) (uniform or loss-aware), ε ~ N(0, I), y -> ∅ with prob. label_dropout,
    loss = mean_b w_b · L(x0_b, t_b, ε_b)      (w = 1/(T p(t)), 1 for uniform sampling)
    θ <- Adam(θ, clip(∇θ loss)), θ_ema <- d θ_ema + (1 - d) θ, sampler history <- (t, L_t).
The step is one XLA program over the device mesh: the batch sharded along 'data', the state
replicated and donated, so the gradient all-reduce is XLA's. Its randomness is
fold_in(key(seed), step), and batch s is a pure function of (seed, s) (input_pipeline), so a
resumed run replays the stream of an uninterrupted one: on CPU the final parameters are
bit-identical. (On GPU/TPU, XLA's reductions may not be deterministic.)

Workdir: config.json, train.log, metrics.jsonl, tensorboard/, checkpoints/<step>/,
samples/<step>/ema_grid.{png,npz}.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import checkpointing, cold, config_validation, diffusion as diffusion_lib
from diffusion_jax import guidance, image_utils
from diffusion_jax import input_pipeline, latents as latents_lib, logging_utils, models
from diffusion_jax import distill, processes, run as run_lib, samplers, text as text_lib
from diffusion_jax import sharding, timestep_sampling
from diffusion_jax.defaults import default_workdir  # noqa: F401  (the old name)
from diffusion_jax.samplers.batches import guidance_interval, sampling_target, self_conditioned
from diffusion_jax.timestep_sampling import SAMPLERS  # noqa: F401  (the old name)
# The train state lives in the run layer (a checkpoint holds it); the old names stay here.
from diffusion_jax.train_state import (TrainState, abstract_train_state,  # noqa: F401
                                       create_optimizer, create_train_state)

logger = logging_utils.logger.getChild('train')

NUM_QUARTILES = 4  # loss reported per quarter of [0, T), as improved DDPM logs it
# How the start-up line "estimated peak memory per device" was obtained.
PEAK_MEMORY_SOURCES = {
    sharding.MEMORY_ANALYSIS: "XLA's memory_analysis of the compiled train step: arguments + "
                              'outputs - donated + temporaries',
    sharding.ARRAYS: 'from the arrays: train state + batch only, without activations (this '
                     'backend has no memory_analysis)'}
LATENT_STREAM = 0x1A7E  # fold_in(key(seed), .) seeds the posterior samples of a latent run


def _labels(labels, num_classes: int, label_dropout: float, rng):
    """y for a conditional model, each label replaced by the null label num_classes with
    probability label_dropout (classifier-free guidance, Ho & Salimans 2021); None if
    the model is unconditional."""
    if num_classes == 0:
        return None
    labels = labels.astype(jnp.int32)
    if label_dropout > 0:
        drop = jax.random.bernoulli(rng, label_dropout, labels.shape)
        labels = jnp.where(drop, num_classes, labels)
    return labels


def caption_drop(rng, caption_dropout: float, batch: int):
    """drop [B] bool: which captions of the batch are replaced by the empty prompt (caption
    dropout, classifier-free guidance's ∅ of latent diffusion), drawn as guidance.drop_condition
    draws it; all False without dropout."""
    if caption_dropout <= 0:
        return jnp.zeros((batch,), bool)
    return jax.random.bernoulli(rng, caption_dropout, (batch,))


def text_condition(model, params, ex):
    """The condition of a text run's (micro)batch: its captions encoded by the jointly trained
    encoder (model.encode of ex['input_ids'] / ['attention_mask'], so the gradient reaches the
    encoder), the rows where ex['drop'] replaced by the empty prompt's encoding (its tokens are
    encoded in their place: the encoder reads each caption on its own)."""
    ids, mask = text_lib.empty_prompt(ex['input_ids'].shape[-1])
    drop = ex['drop'][:, None]
    ids = jnp.where(drop, jnp.asarray(ids, ex['input_ids'].dtype), ex['input_ids'])
    mask = jnp.where(drop, jnp.asarray(mask, ex['attention_mask'].dtype), ex['attention_mask'])
    return model.apply({'params': params}, ids, mask, method='encode')


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _step_metrics(loss, terms, t, grad_norm, lr, num_timesteps: int) -> dict:
    """Scalars of one step; per-quartile sums and counts so intervals can be averaged exactly."""
    quartile = (t * NUM_QUARTILES) // num_timesteps
    onehot = jax.nn.one_hot(quartile, NUM_QUARTILES, dtype=jnp.float32)
    out = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr,
               q_sum=onehot.T @ terms['loss'], q_count=jnp.sum(onehot, axis=0))
    for name in ('mse', 'vb', 'accuracy', 'kl'):
        if name in terms:
            out[name] = jnp.mean(terms[name])
    return out


def _classifier_loss(model, diffusion, x0, t, noise, labels, dropout_rng, params):
    """The noisy-image classifier's objective (Dhariwal & Nichol 2021, Sec. 4): cross-entropy of
    p_φ(y | x_t, t) on x_t ~ q(x_t | x_0) at uniformly drawn t, so that ∇ log p_φ(y|x_t) is
    meaningful at every noise level the sampler visits."""
    x_t = diffusion.q_sample(x0, t, noise)
    logits = diffusion_lib.wrap_model(
        lambda x, t_model: model.apply({'params': params}, x, t_model, train=True,
                                       rngs={'dropout': dropout_rng}), diffusion)(x_t, t)
    labels = labels.astype(jnp.int32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.mean(xent), dict(loss=xent, accuracy=accuracy)


def self_condition_input(key, first_pass_x0: Callable, x0):
    """The x̂_0 a self-conditioned network is trained with (Chen et al. 2022, "Analog Bits",
    Algorithm 1): with probability ½ (one coin for the batch, key) the stop-gradient x̂_0 of a
    first pass fed zeros, first_pass_x0(zeros) [B, ...]; else zeros. The first pass runs only
    on the coin's heads (lax.cond)."""
    zeros = jnp.zeros_like(x0)
    return jax.lax.cond(jax.random.bernoulli(key, 0.5),
                        lambda: jax.lax.stop_gradient(first_pass_x0(zeros).astype(x0.dtype)),
                        lambda: zeros)


def _autoencoder_loss(model, x0, rng, reconstruction: str, kl_weight: float, params):
    """The KL autoencoder's objective without its perceptual and adversarial terms (Rombach et
    al. 2022, App. G; LDM's LPIPSWithDiscriminator without LPIPS and GAN), per image:

        L = Σ_pixels ρ(x - x̂) + β·KL(q(z|x) || N(0, I)),   x̂ = decode(μ + σ·ε),
        KL = ½ Σ_latent (μ² + σ² - 1 - log σ²),   ρ = |·| ('l1', LDM's) or (·)² ('l2'),

    summed over pixels and latent entries and averaged over the batch, as LDM does (so its
    β = 1e-6 is on this scale). Returns (mean L, per-image terms)."""
    mean, logvar = model.apply({'params': params}, x0, method='encode')
    z = latents_lib.from_moments(mean, logvar, 1.0, rng)
    x_hat = model.apply({'params': params}, z, method='decode')
    diff = x0 - x_hat
    rho = jnp.abs(diff) if reconstruction == 'l1' else jnp.square(diff)
    axes = tuple(range(1, x0.ndim))
    rec = jnp.sum(rho, axis=axes)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)
    loss = rec + kl_weight * kl
    return jnp.mean(loss), dict(loss=loss, mse=jnp.mean(jnp.square(diff), axis=axes), kl=kl)


def _train_net(model, params, y, dropout_rng, self_cond=None):
    """The network in training mode (dropout on) as model_fn(x, t): model.apply on x, or on
    [x, self_cond] for a self-conditioned network (guidance.with_self_cond)."""
    return lambda x, t: model.apply({'params': params}, guidance.with_self_cond(x, self_cond), t,
                                    y, train=True, rngs={'dropout': dropout_rng})


def accumulate_gradients(loss_fn: Callable, params, examples: dict, rng, microbatch: int = 0):
    """((loss, terms), grads) of loss_fn(params, examples, rng) -> (mean loss, terms), the
    batch's mean loss and its gradient, computed microbatch examples at a time (gradient
    accumulation, training.microbatch; 0 or the batch size: the whole batch at once).

    examples: per-example arrays [B, ...] (None leaves allowed); terms: per-example [B] arrays.
    With B = n·m (m = microbatch), chunk j holds examples j, j + n, j + 2n, ... [m, ...]: the
    reshape [B] -> [m, n] keeps each device's contiguous share of a batch sharded over the
    devices on that device (m a multiple of the device count), so no chunk moves data. A
    lax.scan over the n chunks sums the chunk means and gradients; divided by n that is

        loss = (1/n) Σ_j mean_{b ∈ j} L_b = mean_b L_b,   grads = (1/n) Σ_j ∇ mean_{b ∈ j} L_b,

    the whole batch's, up to float32 summation order. Only one chunk's activations are alive
    at a time. Chunk j's dropout key is fold_in(rng, j) (the masks are another draw than the
    whole batch's, of the same law); terms come back in the order of the examples.
    """
    batch = jax.tree.leaves(examples)[0].shape[0]
    if not microbatch or microbatch == batch:
        return jax.value_and_grad(loss_fn, has_aux=True)(params, examples, rng)
    n = batch // microbatch
    chunks = jax.tree.map(lambda a: a.reshape(microbatch, n, *a.shape[1:]).swapaxes(0, 1),
                          examples)

    def body(carry, chunk_index):
        chunk, index = chunk_index
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, chunk, jax.random.fold_in(rng, index))
        loss_sum, grad_sum = carry
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), terms

    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, grad_sum), terms = jax.lax.scan(body, init, (chunks, jnp.arange(n)))
    terms = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(batch, *a.shape[2:]), terms)
    return (loss_sum / n, terms), jax.tree.map(lambda g: g / n, grad_sum)


def make_train_step(config, model, diffusion, optimizer, schedule) -> Callable:
    """train_step(state, batch, rng) -> (state, metrics); pure, to be jitted over a mesh.

    A step whose loss, gradient or new parameters are not all finite changes nothing but
    state.step and state.skipped: params, EMA, optimiser and sampler state are selected from
    the input state (jnp.where inside the program, so no NaN ever reaches them). Once
    state.skipped exceeds training.skip_nonfinite_steps (default 0) every further step is
    such a no-op too, so the state the loop stops with is the one before the offending step;
    metrics['halt'] tells the loop to stop.

    training.microbatch = m > 0 computes the gradient m examples at a time inside the step
    (accumulate_gradients): the same parameters as the whole batch at once up to float32
    summation order, with one microbatch's activations in memory instead of the batch's.
    """
    max_skips = config.training.get('skip_nonfinite_steps', 0)
    num_classes = config.model.get('num_classes', 0)
    label_dropout = config.training.label_dropout
    is_text = text_lib.is_text(config)
    caption_dropout = float(config.training.get('caption_dropout', 0.0) or 0.0)
    is_classifier = config.model.name == 'classifier'
    is_autoencoder = config.model.name == 'autoencoder'
    decay = config.training.ema_decay
    # The process of diffusion.process (diffusion_jax.processes): 'gaussian' keeps the
    # GaussianDiffusion path below unchanged (min-SNR multiplies its per-example loss);
    # 'flow' and 'edm' draw their own times and noise in process.loss.
    # 'cold' (diffusion_jax.cold) trains through the same path: its training_losses is the L1
    # restoration loss.
    cold_run = cold.is_cold(config.diffusion)
    process = None if cold_run else processes.get_process(config.diffusion)
    continuous = process is not None and not isinstance(process, processes.GaussianProcess)
    min_snr = process is not None and not continuous and process.loss_weighting != 'none'
    self_condition = self_conditioned(config)
    microbatch = config.training.get('microbatch', 0)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 4)
        x0 = batch['image']
        t, weights = timestep_sampling.sample(state.sampler_state, t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        # Self-conditioning's coin: its own stream, so the others are those of a run without it.
        # One coin for the whole batch: every microbatch sees the same.
        sc_rng = jax.random.fold_in(rng, 4)
        # Every per-example random draw is made here for the whole batch (`examples`, [B, ...]
        # leaves), so that a microbatch trains on its slice of the very draw the whole batch
        # would: loss_fn(params, examples, dropout_rng) -> (mean loss, per-example terms).
        # The condition: labels, or (text) captions whose dropout is drawn here for the whole
        # batch and which are encoded inside loss_fn, under the gradient (text_condition).
        if is_text:
            cond_examples = dict(input_ids=batch['input_ids'],
                                 attention_mask=batch['attention_mask'],
                                 drop=caption_drop(label_rng, caption_dropout,
                                                   batch['input_ids'].shape[0]))
            condition = lambda params, ex: text_condition(model, params, ex)
        else:
            cond_examples = dict(y=_labels(batch['label'], num_classes, label_dropout, label_rng))
            condition = lambda params, ex: ex['y']
        if continuous:
            t_draw, noise_draw, _ = process.draw(x0, noise_rng)  # the draw process.loss makes
            examples = dict(x0=x0, t=t_draw, noise=noise_draw, **cond_examples)

            def loss_fn(params, ex, dropout_rng):
                net = functools.partial(_train_net, model, params, condition(params, ex),
                                        dropout_rng)
                model_fn = net()
                if self_condition:  # the first pass sees the very x_t that process.loss draws
                    _, _, x_t = process.draw(ex['x0'], None, ex['t'], ex['noise'])
                    model_fn = net(self_condition_input(
                        sc_rng, lambda z: process.denoise(net(z), x_t, ex['t']), ex['x0']))
                terms = process.loss(model_fn, ex['x0'], None, ex['t'], ex['noise'])
                return jnp.mean(terms['loss']), terms
        elif is_autoencoder:  # microbatching is refused (config_validation): ε is drawn inside
            examples = dict(x0=x0)
            loss_fn = lambda params, ex, _: _autoencoder_loss(
                model, ex['x0'], noise_rng, config.training.get('reconstruction_loss', 'l1'),
                config.training.get('kl_weight', 1e-6), params)
        elif is_classifier:
            examples = dict(x0=x0, t=t, noise=noise, label=batch['label'])
            loss_fn = lambda params, ex, dropout_rng: _classifier_loss(
                model, diffusion, ex['x0'], ex['t'], ex['noise'], ex['label'], dropout_rng, params)
        else:
            examples = dict(x0=x0, t=t, noise=noise, weights=weights, **cond_examples)

            def loss_fn(params, ex, dropout_rng):
                net = functools.partial(_train_net, model, params, condition(params, ex),
                                        dropout_rng)
                model_fn = net()
                x0, t, noise = ex['x0'], ex['t'], ex['noise']
                if self_condition:
                    x_t = diffusion.q_sample(x0, t, noise)  # the x_t training_losses makes
                    model_fn = net(self_condition_input(sc_rng, lambda z: diffusion.p_mean_variance(
                        diffusion_lib.wrap_model(net(z), diffusion)(x_t, t), x_t, t,
                        clip_denoised=False)['pred_x0'], x0))
                # A cold run's random-centre mask draws its centres from the training key.
                extra = {'key': noise_rng} if cold_run else {}
                terms = diffusion.training_losses(model_fn, x0, t, noise, **extra)
                if min_snr:
                    terms = dict(terms, loss=process.loss_weight(t) * terms['loss'])
                return jnp.mean(ex['weights'] * terms['loss']), terms

        (loss, terms), grads = accumulate_gradients(loss_fn, state.params, examples,
                                                    dropout_rng, microbatch)
        if continuous:  # the loss per quarter of the process's training law (its quantile)
            steps = diffusion.num_timesteps
            t = jnp.minimum(jnp.floor(terms.pop('quantile') * steps), steps - 1).astype(jnp.int32)
            terms = {k: v for k, v in terms.items() if k in ('loss', 'mse')}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        # The loss-aware sampler tracks L_t itself: the 'vb' term where there is one.
        sampler_state = state.sampler_state if continuous else timestep_sampling.update(
            state.sampler_state, t, terms.get('vb', terms['loss']))
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        apply = finite & (state.skipped <= max_skips)
        skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state),
            sampler_state=keep(sampler_state, state.sampler_state), skipped=skipped)
        metrics = _step_metrics(loss, terms, t, grad_norm, schedule(state.step),
                                diffusion.num_timesteps)
        metrics.update(finite=finite, skipped=skipped, halt=skipped > max_skips)
        return new_state, metrics

    return train_step


def make_multi_step(train_step: Callable, steps_per_call: int) -> Callable:
    """K = steps_per_call train steps in one program: multi_step(state, batches, rng) ->
    (state, metrics), batches {key: [K, B, ...]} (input_pipeline.stack_batches), each metric
    stacked [K, ...] in step order. A lax.scan over train_step, so step k of the call sees
    exactly the state, batch and randomness (fold_in(rng, state.step)) that the k-th of K
    separate calls would: it saves K - 1 dispatches and host round trips per call, which is
    what limits small models (VDM's steps per jitted call). K = 1 returns train_step itself.
    """
    if steps_per_call == 1:
        return train_step

    def multi_step(state: TrainState, batches: dict, rng: jax.Array, *extra):
        return jax.lax.scan(lambda s, batch: train_step(s, batch, rng, *extra), state, batches)

    return multi_step


def compile_train_step(train_step, mesh, state, batch, rng, batch_axis: int = 0, extra=()):
    """AOT-compiles the step for the mesh (batch over 'data' along batch_axis, 1 for the
    stacked batches of make_multi_step; the rest replicated, state donated). extra: further
    arguments after rng, replicated (a distillation's teacher params: an argument, not a
    constant, so a new round's teacher needs no recompile). Calling the result never
    retraces: one compile per run, by construction."""
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh, batch_axis)
    state_sh = sharding.state_shardings(mesh, state)
    jitted = jax.jit(train_step, in_shardings=(state_sh, data, repl) + (repl,) * len(extra),
                     out_shardings=(state_sh, repl), donate_argnums=0)
    return jitted.lower(state, batch, rng, *extra).compile()


def make_sample_fn(config, model, diffusion, num: int, mesh=None, decoder=None, tokenizer=None,
                   prompts=()) -> Callable:
    """sample_fn(params, rng) -> [num, ...] samples with config.sampling's method, step count
    and classifier-free guidance scale; a conditional model cycles through the classes, a text
    run (tokenizer given) through `prompts` (the training grid: the training captions), else
    sampling.prompt / prompts_file. The sampler compiles once: the parameters are a jit
    argument, not a constant. decoder (a latent run: latents.make_decoder): applied to the
    samples, so they are pixels."""
    s = config.sampling
    shape = (num, *models.data_shape(model, self_conditioned(config)))
    prior, process_options = None, {}
    # Cold diffusion starts at its fully degraded prior's x_T, and is not respaced.
    if isinstance(diffusion, cold.ColdDiffusion):
        prior = cold.run_prior(config, diffusion)
    else:
        diffusion, process_options = sampling_target(config, diffusion)
    num_classes = config.model.get('num_classes', 0)
    y = jnp.arange(num, dtype=jnp.int32) % num_classes if num_classes else None
    options = {k: s[k] for k in ('method', 'eta', 'clip_denoised', 'langevin_snr',
                                 'langevin_steps', 'ddim_guidance', 'dynamic_threshold') if k in s}
    options.update(process_options)
    if self_conditioned(config):
        options['self_condition'] = True
    if mesh is not None and num % mesh.devices.size == 0:
        options['mesh'] = mesh

    if tokenizer is not None:  # the given prompts (the training grid: the captions), else sampling's
        prompts = list(prompts) or text_lib.sampling_prompts(config)
        y = jnp.arange(num, dtype=jnp.int32) % len(prompts)

    def sample_fn(params, rng):
        variables = {'params': params}
        # The training grids guide classifier-free only: an autoguided run's guide is loaded by
        # --mode=sample / eval (run.load_guide), not by the train loop.
        if tokenizer is not None:  # the prompts encoded by these parameters' text encoder
            table = text_lib.prompt_table(model, variables, tokenizer, prompts,
                                          s.get('negative_prompt', ''))
            cond = table.condition(y)
            if s.get('guidance_scale', 0.0):
                model_fn = guidance.classifier_free_model_fn(
                    model.apply, variables, cond, s.guidance_scale, uncond=table.uncond,
                    guidance_rescale=s.get('guidance_rescale', 0.0),
                    interval=guidance_interval(config), channels=s.get('guidance_channels', 0))
            else:
                model_fn = guidance.bind_model(model.apply, variables, cond)
        elif y is not None and s.get('guidance_scale', 0.0) and not s.get(
                'guidance_model_workdir', ''):
            model_fn = guidance.classifier_free_model_fn(
                model.apply, variables, y, s.guidance_scale, num_classes,
                guidance_rescale=s.get('guidance_rescale', 0.0),
                interval=guidance_interval(config), channels=s.get('guidance_channels', 0))
        else:
            model_fn = guidance.bind_model(model.apply, variables, y)
        x_T = None if prior is None else prior.sample(rng, shape)
        out = samplers.sample(diffusion, model_fn, rng, shape, x_T=x_T, **options)['samples']
        return out if decoder is None else decoder(out)

    return sample_fn


def write_samples(workdir: str, step: int, samples, writer) -> str:
    """samples/<step>/ema_grid.png (a grid, or a scatter plot of points) and ema_grid.npz;
    returns the PNG's path. (--mode=sample writes samples.* into the same folder.)"""
    folder = os.path.join(workdir, 'samples', str(step))
    samples = np.asarray(sharding.to_host(samples))  # gathered from every host
    png = os.path.join(folder, 'ema_grid.png')
    if jax.process_index() != 0:
        return png
    if samples.ndim == 2:  # points, e.g. the swiss roll
        image = logging_utils.points_image(samples)
        image_utils.save_npz(os.path.join(folder, 'ema_grid.npz'), points=samples)
        image_utils.save_png(png, image)
    else:
        images = image_utils.to_uint8(samples)
        image_utils.save_npz(os.path.join(folder, 'ema_grid.npz'), images=images)
        image_utils.save_grid(png, images)
        image = image_utils.make_grid(images)
    writer.image(step, 'samples', image)
    return png


# ----------------------------------------------------------------------------------------------
# Checks before anything is written
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    config: Any  # the validated config, derived fields filled in (what config.json stores)
    model: Any
    diffusion: diffusion_lib.GaussianDiffusion
    mesh: Any
    train_ds: input_pipeline.Dataset
    teacher: Any = None  # a distillation's teacher EMA params (diffusion_jax.distill), else None
    autoencoder: Any = None  # latents.Autoencoder of a latent run (data.latents), else None
    tokenizer: Any = None  # a text run's tokenizer (diffusion_jax.text), else None
    new_tokenizer: bool = False  # built from the captions now: written with config.json


def prepare_run(config, workdir: str) -> _Run:
    """Every check of config and workdir, in the order a user would fix them; writes nothing.

    config: validated whole (run.resolve_config); when the workdir holds a run, it must keep
    its model/diffusion/data/optim/distill sections (diffusion_jax.run.check_resume).
    """
    teacher = None
    if distill.is_distillation(config):
        distill.check_config(config)
        config = distill.derive(config)  # the student's sampler, stored in config.json
    model = models.get_model(config.model)
    diffusion = cold.create_for_config(config)  # Gaussian, or process='cold'
    mesh = sharding.make_mesh(fsdp=config.get('sharding', {}).get('fsdp', 1))
    sharding.check_global_batch(config.training.batch_size, mesh, 'training.batch_size')
    config_validation.check_microbatch(config, mesh.devices.size)
    run_lib.check_resume(workdir, config)
    resume_step = checkpointing.check_compatible(workdir, models.param_shapes(model)['params'])
    check_resume_step(resume_step, config.training.get('steps_per_call', 1), workdir)
    if distill.is_distillation(config):  # read only: the teacher's workdir is never written
        teacher, _ = distill.load_teacher(config)
    autoencoder = latents_lib.for_config(config, mesh)
    cache = config.data.get('latents_cache', '') if autoencoder is not None else ''
    if cache:
        train_ds = latents_lib.cache_dataset(cache, config.data.train_split,
                                             config.data.get('num_classes', 0))
    else:
        train_ds = input_pipeline.get_dataset(config.data, config.data.train_split)
    tokenizer, new_tokenizer = None, False
    if text_lib.is_text(config):  # captions -> token ids with the run's (or a new) vocabulary
        tokenizer, new_tokenizer = text_lib.tokenizer_for_training(config, workdir,
                                                                   train_ds.captions)
        train_ds = text_lib.with_tokens(train_ds, tokenizer, config.model.text.max_length)
    return _Run(config, model, diffusion, mesh, train_ds, teacher=teacher,
                autoencoder=autoencoder, tokenizer=tokenizer, new_tokenizer=new_tokenizer)


def check_resume_step(step: int | None, steps_per_call: int, workdir: str) -> None:
    """A call runs training.steps_per_call steps from a multiple of it: raise (one line) when
    the checkpoint a run resumes from is not one."""
    if step is None or step % steps_per_call == 0:
        return
    raise ValueError(
        f'training.steps_per_call={steps_per_call} does not divide step {step}, the checkpoint '
        f'in {checkpointing.checkpoint_dir(workdir)} this run resumes from (calls of '
        f'{steps_per_call} steps start at multiples of {steps_per_call}): resume with '
        f'--config.training.steps_per_call={math.gcd(step, steps_per_call)} and change it at a checkpoint that is '
        f'a multiple of {steps_per_call}.')


def _write_config(config, workdir: str) -> None:
    """config.json; on a resume with changed cadence/length the old one is kept (run.py)."""
    run_lib.write_config(workdir, config, resumed_step=checkpointing.latest_step(workdir))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _Preemption:
    """SIGTERM and SIGINT ask the loop to stop: it saves at the current step, waits for the
    write and returns (exit status 0). A second signal exits at once (status 128 + signum).

    Several processes stop at one agreed step: JAX's preemption notifier owns SIGTERM there
    (multihost_utils.reached_preemption_sync_point, asked after every call with the call count,
    returns True on every process at the same call), and a SIGINT flag is OR-ed over the processes at steps that all
    processes visit alike (`sync=True`: log, sample and checkpoint steps).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            signums = [signal.SIGINT]
            if jax.process_count() == 1:  # else JAX's preemption notifier handles SIGTERM
                signums.append(signal.SIGTERM)
            self._previous = {s: signal.signal(s, self._handle) for s in signums}
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        name = signal.Signals(signum).name
        if self.requested:
            logger.warning('%s again: exiting now, without saving.', name)
            os._exit(128 + signum)  # pylint: disable=protected-access
        logger.warning('%s: saving a checkpoint at the current step and stopping (send it '
                       'again to exit at once).', name)
        self.requested = True

    def should_stop(self, call: int, sync: bool) -> bool:
        """call: the number of jitted calls done, counted from step 0 (step // steps_per_call).
        JAX's sync point is the largest id any process reported + 1, tested for equality, so
        the id must advance by one per call: with the step count (advancing by K) it would be
        skipped for every K > 1 and a preempted run would never stop."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        preempted = multihost_utils.reached_preemption_sync_point(call)
        return (sharding.any_process(self.requested) if sync else False) or preempted

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _per_step(metrics, steps_per_call: int) -> list[dict]:
    """The host metrics of one call as one dict per step (make_multi_step stacks them [K])."""
    host = jax.device_get(metrics)
    if steps_per_call == 1:
        return [host]
    return [{k: v[i] for k, v in host.items()} for i in range(steps_per_call)]


def _summarize(pending: list[dict], steps_per_call: int = 1) -> dict:
    """Mean metrics of the applied (finite) steps since the last report (pending: the metrics
    of each call), and how many steps were skipped as non-finite."""
    host = [m for call in pending for m in _per_step(call, steps_per_call)]
    good = [m for m in host if m['finite']]
    out = {'skipped_steps': float(host[-1]['skipped'])} if host[-1]['skipped'] else {}
    if not good:
        return out
    out.update({k: float(np.mean([m[k] for m in good]))
                for k in ('loss', 'mse', 'vb', 'accuracy', 'kl', 'grad_norm') if k in good[0]})
    q_sum, q_count = (np.sum([m[k] for m in good], axis=0) for k in ('q_sum', 'q_count'))
    out.update({f'loss_q{i}': float(q_sum[i] / q_count[i]) for i in range(NUM_QUARTILES)
                if q_count[i] > 0})
    out['learning_rate'] = float(host[-1]['learning_rate'])
    return out


def _check_finite(metrics, step: int, max_skips: int, ckpt, steps_per_call: int = 1) -> None:
    """Warns about each skipped non-finite step of a call (metrics: the call's, `step`: its
    last step); raises FloatingPointError at the first step that stops the run (the state then
    is the one before that step: make_train_step)."""
    scalars = {k: metrics[k] for k in metrics if k not in ('q_sum', 'q_count')}
    first = step - steps_per_call + 1
    for i, m in enumerate(_per_step(scalars, steps_per_call)):
        _check_finite_step(m, first + i, max_skips, ckpt)


def _check_finite_step(m: dict, step: int, max_skips: int, ckpt) -> None:
    if m['finite']:
        return
    terms = ', '.join(f'{k}={float(m[k]):.4g}' for k in ('loss', 'mse', 'vb', 'grad_norm')
                      if k in m)
    if not m['halt']:
        logger.warning('step %d: non-finite loss or gradient (%s): update skipped (%d of '
                       'training.skip_nonfinite_steps=%d)', step, terms, int(m['skipped']),
                       max_skips)
        return
    ckpt.wait()
    last = (f'step {ckpt.last_good} in {checkpointing.checkpoint_dir(ckpt.workdir)}'
            if ckpt.last_good is not None else 'none')
    count = f'; {int(m["skipped"])} non-finite steps' if max_skips else ''
    raise FloatingPointError(
        f'training stopped at step {step}: the loss or gradient is non-finite ({terms}'
        f'{count}); last good '
        f'checkpoint: {last}. Lower optim.learning_rate, set optim.grad_clip > 0, check the '
        'data, or set training.skip_nonfinite_steps=N to skip up to N such steps.')


@jax.jit
def snapshot(state: TrainState) -> TrainState:
    """A copy of state in fresh buffers (same shardings), one dispatch for the whole pytree: what
    `train_and_evaluate` hands its on_step hook, since the next step donates state's buffers."""
    return jax.tree.map(jnp.copy, state)


class _Throughput:
    """Steps/s and images/s of the train steps alone: time spent sampling, checkpointing and
    on the on_step hook (inside `excluded`) is not counted."""

    def __init__(self, step: int, batch_size: int, num_steps: int):
        self.start, self.step, self.paused = time.perf_counter(), step, 0.0
        self.batch_size, self.num_steps = batch_size, num_steps

    @contextlib.contextmanager
    def excluded(self, state):
        jax.block_until_ready(state)  # the steps dispatched so far are train time
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def report(self, summary: dict, step: int) -> str:
        """Adds steps_per_sec and images_per_sec since the last report; returns the ETA."""
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.start - self.paused, 1e-9)
        summary['steps_per_sec'] = rate
        summary['images_per_sec'] = rate * self.batch_size
        self.start, self.step, self.paused = now, step, 0.0
        return logging_utils.format_duration(
            (self.num_steps - step) / rate if rate > 0 else math.inf)


def _initial_state(config, run, optimizer, ckpt, init_rng) -> TrainState:
    """The newest readable checkpoint's state, or a fresh one; placed on the mesh by
    sharding.state_shardings (replicated, or FSDP-sharded)."""
    state = ckpt.restore(abstract_train_state(config, run.model, optimizer, run.mesh))
    if state is None:
        state = create_train_state(config, run.model, optimizer, init_rng)
        if run.teacher is not None:  # a distillation's student starts as the teacher's EMA
            params = distill.initial_params(jax.device_get(run.teacher))
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                                  opt_state=optimizer.init(params))
        return sharding.shard_state(state, run.mesh)
    # The one line of a restore in training (experiments/fault_injection.py reads it).
    logger.info('resumed from %s at step %d', checkpointing.checkpoint_dir(ckpt.workdir),
                int(state.step))
    return state


def train_and_evaluate(config, workdir: str | None = None, *,
                       on_step: Callable[[int, TrainState], None] | None = None) -> TrainState:
    """Trains config's model in workdir (resuming from its newest readable checkpoint);
    returns the state.

    Each jitted call runs training.steps_per_call = K steps (make_multi_step; K = 1 by
    default): the loop logs, samples, checkpoints, checks for non-finite steps and for a stop
    request between calls, so those cadences and num_train_steps are multiples of K
    (config_validation), and the parameters after any step are those of K = 1.
    on_step(step, state), if given, runs after every call (step = steps done): a hook for
    notebooks and tests. Its state is a copy (`snapshot`), safe to keep: the loop's own state
    is donated to the next call, which would leave a kept reference reading deleted buffers.
    A SIGTERM/SIGINT stops the run after the current call with a checkpoint (_Preemption); a
    non-finite step stops it (FloatingPointError) unless training.skip_nonfinite_steps allows
    skipping it; a failed save raises checkpointing.SaveError.
    """
    workdir = workdir or default_workdir(config)
    return run_resolved(run_lib.resolve_config(workdir, config, mode='train'), workdir,
                        on_step=on_step)


def run_resolved(config, workdir: str, *,
                 on_step: Callable[[int, TrainState], None] | None = None) -> TrainState:
    """train_and_evaluate for a config that run.resolve_config returned (main calls this)."""
    run = prepare_run(config, workdir)
    sharding.use_compile_cache(run.config.get('compile_cache_dir', sharding.AUTO_CACHE))
    _write_config(run.config, workdir)
    if run.new_tokenizer:  # the vocabulary is part of the run: sampling reads it from here
        text_lib.save_tokenizer(workdir, run.tokenizer)
    loop = _Loop(run, workdir, on_step)
    try:
        state = loop.train()
    finally:
        loop.close()
    if loop.last_saved is not None:
        logger.info('checkpoint at step %d in %s', loop.last_saved,
                    checkpointing.checkpoint_dir(workdir))
    return state


class _Loop:
    """train_and_evaluate's loop, one method per thing it does between calls of K steps."""

    def __init__(self, run: _Run, workdir: str, on_step):
        self.run, self.workdir, self.on_step = run, workdir, on_step
        config = self.config = run.config
        self.writer = logging_utils.MetricWriter(workdir)
        self.tc = tc = config.training
        self.max_skips = tc.get('skip_nonfinite_steps', 0)
        self.k = tc.get('steps_per_call', 1)
        self.batch_axis = 0 if self.k == 1 else 1  # stacked batches are [K, B, ...]
        self.optimizer, self.schedule = create_optimizer(config.optim)
        self.init_rng, self.train_rng, self.sample_rng = jax.random.split(
            jax.random.key(tc.seed), 3)
        self.teacher = None  # a distillation's teacher params, per round (distill.Teacher)
        if run.teacher is not None:
            self.teacher = distill.Teacher(config, run.teacher, workdir, self.optimizer,
                                           run.mesh)
        self.ckpt = checkpointing.Checkpointer(
            workdir, tc.keep_checkpoints,
            preserve=self.teacher.preserved_steps() if self.teacher is not None else ())
        self.batches = self.sample_fn = self.previous = self.last_saved = None
        self.throughput = self.bar = None
        self.pending = []
        self.can_sample = bool(tc.sample_every_steps) and config.model.name not in (
            'classifier', 'autoencoder')
        self.encode = self.decoder = None
        if run.autoencoder is not None:  # a latent run: batches of pixels (or cached moments)
            self.encode = latents_lib.make_batch_encoder(
                run.autoencoder, config.data.get('latent_noise', True),
                from_cache=bool(config.data.get('latents_cache', '')),
                out_sharding=sharding.data_sharding(run.mesh, self.batch_axis))
            self.decoder = latents_lib.make_decoder(run.autoencoder)
            # ε of the posterior sample: a stream of its own, folded with the step.
            self.latent_rng = jax.random.fold_in(jax.random.key(tc.seed), LATENT_STREAM)

    def train(self) -> TrainState:
        state, start = self._start()
        k, tc = self.k, self.tc
        # steps done / num_train_steps with rate and ETA on the console (process 0).
        self.bar = logging_utils.progress_bar(tc.num_train_steps, 'train', initial=start)
        with _Preemption() as preemption:
            # step: the steps done after this call (calls end at multiples of k).
            for step in range(start + k, tc.num_train_steps + 1, k):
                batch = sharding.shard_batch(next(self.batches), self.run.mesh, self.batch_axis)
                if self.encode is not None:  # step - k: the first step of this call
                    batch = self.encode(batch, jax.random.fold_in(self.latent_rng, step - k))
                extra = ()
                if self.teacher is not None:  # a new round resets the student first
                    state = self.teacher.before_call(state, step - k)
                    extra = (self.teacher.params,)
                if step == start + k:
                    train_step = self._compile(state, batch, start, extra)
                state, metrics = train_step(state, batch, self.train_rng, *extra)
                if self._after_call(step, state, metrics, preemption):
                    break
        self.ckpt.wait()
        return state

    def _start(self):
        """(the initial state, its step), and the batch stream from that step on."""
        config, tc, run = self.config, self.tc, self.run
        state = _initial_state(config, run, self.optimizer, self.ckpt, self.init_rng)
        start = int(jax.device_get(state.step))
        check_resume_step(start, self.k, self.workdir)  # an older checkpoint, if the newest was damaged
        logger.info('%s: %s parameters, %d devices, global batch %d, %d step(s) per call, '
                    'workdir %s', config.get('name'), f'{models.count_params(state.params):,}',
                    run.mesh.devices.size, tc.batch_size, self.k, self.workdir)
        logger.info('params+opt per device: %.2f MiB (sharding.fsdp=%d)',
                    sharding.bytes_per_device((state.params, state.opt_state)) / 2**20,
                    sharding.fsdp_size(run.mesh))
        self.batches = input_pipeline.prefetch(input_pipeline.stack_batches(
            input_pipeline.train_iterator(run.train_ds, tc.batch_size, tc.seed, start,
                                          config.data.random_flip), self.k),
            config.data.get('prefetch', 2))
        return state, start

    def _compile(self, state, batch, start: int, extra=()):
        logger.info('compiling the train step (first step takes a while)...')
        with sharding.CompileClock() as clock:
            train_step = compile_train_step(
                make_multi_step(self._train_step(), self.k),
                self.run.mesh, state, batch, self.train_rng, self.batch_axis, extra)
        logger.info('compiled in %.1fs%s', clock.seconds,
                    f' ({clock.cache_hits} from the persistent cache)' if clock.cache_hits else '')
        peak, source = sharding.peak_memory_per_device(train_step, (state, batch))
        logger.info('estimated peak memory per device: %.2f MiB (%s)', peak / 2**20,
                    PEAK_MEMORY_SOURCES[source])
        self.throughput = _Throughput(start, self.tc.batch_size, self.tc.num_train_steps)
        return train_step

    def _train_step(self):
        if self.run.teacher is not None:
            return distill.make_distill_step(self.config, self.run.model, self.run.diffusion,
                                             self.optimizer, self.schedule, _step_metrics)
        return make_train_step(self.config, self.run.model, self.run.diffusion, self.optimizer,
                               self.schedule)

    def _after_call(self, step: int, state, metrics, preemption) -> bool:
        """Everything between calls, in order; True when the loop stops after this call."""
        tc, k = self.tc, self.k
        self.bar.update(k)
        self.pending.append(metrics)
        if self.previous is not None:  # one call behind: the device stays busy meanwhile
            _check_finite(self.previous, step - k, self.max_skips, self.ckpt, k)
        self.previous = metrics
        if self.on_step is not None:
            with self.throughput.excluded(state):
                self.on_step(step, snapshot(state))
        sample_now = self.can_sample and (step % tc.sample_every_steps == 0
                                          or step == tc.num_train_steps)
        round_end = self.teacher is not None and self.teacher.is_round_end(step)
        save_now = step % tc.checkpoint_every_steps == 0 or round_end
        log_now = step % tc.log_every_steps == 0
        # Checked before sampling, so that a pending stop does not wait for it.
        preempted = preemption.should_stop(step // k, sync=log_now or save_now or sample_now)
        if preempted:
            logger.warning('stopping at step %d (process %d of %d): saving a checkpoint',
                           step, jax.process_index(), jax.process_count())
        stop = preempted or step == tc.num_train_steps
        if log_now or save_now or sample_now or stop:
            _check_finite(metrics, step, self.max_skips, self.ckpt, k)
            self.previous = None  # checked
        if log_now or stop:
            self._log(step)
        if sample_now and (step == tc.num_train_steps or not stop):
            with self.throughput.excluded(state):
                self._sample(step, state)
        if save_now or stop:
            with self.throughput.excluded(state):
                self.ckpt.save(state)  # finite: _check_finite passed at this step
                # Until it commits, a crash would fall back one more interval.
                self.ckpt.wait()
                self.writer.flush()  # the logs up to this checkpoint (a URI workdir's too)
            self.last_saved = step
            if round_end:  # committed: tag it with the round's step count
                self.teacher.record(step)
        return stop

    def _log(self, step: int) -> None:
        summary = _summarize(self.pending, self.k)
        self.pending = []
        eta = self.throughput.report(summary, step)
        self.writer.scalars(step, summary, note=f'ETA {eta}')
        if 'loss' in summary:
            self.bar.set_postfix(loss=f'{summary["loss"]:.4g}', refresh=False)

    def _sample(self, step: int, state) -> None:
        captions = self.run.train_ds.captions
        self.sample_fn = self.sample_fn or make_sample_fn(
            self.config, self.run.model, self.run.diffusion, self.tc.num_sample_images,
            self.run.mesh, self.decoder, self.run.tokenizer,
            sorted(set(captions)) if captions else ())
        samples = self.sample_fn(state.ema_params, jax.random.fold_in(self.sample_rng, step))
        logger.info('samples: %s', write_samples(self.workdir, step, samples, self.writer))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.batches is not None:
            self.batches.close()
        self.ckpt.close()
        self.writer.close()
