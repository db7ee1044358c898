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

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import checkpointing, diffusion as diffusion_lib, image_utils
from diffusion_jax import input_pipeline, logging_utils, models, sharding, timestep_sampling

logger = logging_utils.logger.getChild('train')

NUM_QUARTILES = 4  # loss reported per quarter of [0, T), as improved DDPM logs it
SAMPLERS = ('uniform', 'loss_aware')


@flax.struct.dataclass
class TrainState:
    """Everything a step updates; checkpointed as a whole."""
    step: jax.Array  # int32 scalar: steps done
    params: Any  # the model's 'params' collection (float32)
    ema_params: Any  # exponential moving average of params (used to sample and evaluate)
    opt_state: Any  # optax state
    sampler_state: Any  # timestep sampler state (diffusion_jax.timestep_sampling)


def default_workdir(config) -> str:
    return os.path.join('runs', config.get('name', 'run'))


def create_optimizer(optim_config):
    """Adam(W) with linear warm-up from 0 and global-norm clipping: (transform, lr schedule)."""
    o = optim_config
    if o.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    else:
        schedule = optax.constant_schedule(o.learning_rate)
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.weight_decay > 0:
        chain.append(optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay))
    else:
        chain.append(optax.adam(schedule, o.b1, o.b2, o.eps))
    return optax.chain(*chain), schedule


def create_train_state(config, model, optimizer, rng) -> TrainState:
    """A fresh state on the host's default device: params from init, EMA = params."""
    params = models.init_params(model, rng)['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        # Copies, so that params and EMA never share a buffer (both are donated).
        ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params),
        sampler_state=timestep_sampling.init(config.diffusion.timestep_sampler,
                                             config.diffusion.num_timesteps))


def abstract_train_state(config, model, optimizer, mesh) -> TrainState:
    """The state's shapes, dtypes and (replicated) shardings, computed without initialising:
    the target a checkpoint is restored into."""
    def build(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=optimizer.init(params),
                          sampler_state=timestep_sampling.init(config.diffusion.timestep_sampler,
                                                               config.diffusion.num_timesteps))
    shapes = jax.eval_shape(build, models.param_shapes(model)['params'])
    repl = sharding.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


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


def _step_metrics(loss, terms, t, grads, lr, num_timesteps: int) -> dict:
    """Scalars of one step; per-quartile sums and counts so intervals can be averaged exactly."""
    quartile = (t * NUM_QUARTILES) // num_timesteps
    onehot = jax.nn.one_hot(quartile, NUM_QUARTILES, dtype=jnp.float32)
    grad_norm = optax.global_norm(grads)
    out = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr,
               q_sum=onehot.T @ terms['loss'], q_count=jnp.sum(onehot, axis=0),
               finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    for name in ('mse', 'vb', 'accuracy'):
        if name in terms:
            out[name] = jnp.mean(terms[name])
    return out


def _classifier_loss(model, diffusion, x0, t, noise, labels, dropout_rng, params):
    """The noisy-image classifier's objective (Dhariwal & Nichol 2021, Sec. 4): cross-entropy of
    p_φ(y | x_t, t) on x_t ~ q(x_t | x_0) at uniformly drawn t, so that ∇ log p_φ(y|x_t) is
    meaningful at every noise level the sampler visits."""
    x_t = diffusion.q_sample(x0, t, noise)
    logits = model.apply({'params': params}, x_t, jnp.asarray(diffusion.timestep_map)[t],
                         train=True, rngs={'dropout': dropout_rng})
    labels = labels.astype(jnp.int32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.mean(xent), dict(loss=xent, accuracy=accuracy)


def make_train_step(config, model, diffusion, optimizer, schedule) -> Callable:
    """train_step(state, batch, rng) -> (state, metrics); pure, to be jitted over a mesh."""
    num_classes = config.model.get('num_classes', 0)
    label_dropout = config.training.label_dropout
    is_classifier = config.model.name == 'classifier'
    decay = config.training.ema_decay

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 4)
        x0 = batch['image']
        t, weights = timestep_sampling.sample(state.sampler_state, t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        if is_classifier:
            loss_fn = functools.partial(_classifier_loss, model, diffusion, x0, t, noise,
                                        batch['label'], dropout_rng)
        else:
            y = _labels(batch['label'], num_classes, label_dropout, label_rng)

            def loss_fn(params):
                def model_fn(x_t, t_model):
                    return model.apply({'params': params}, x_t, t_model, y, train=True,
                                       rngs={'dropout': dropout_rng})
                terms = diffusion.training_losses(model_fn, x0, t, noise)
                return jnp.mean(weights * terms['loss']), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        # The loss-aware sampler tracks L_t itself: the 'vb' term where there is one.
        sampler_state = timestep_sampling.update(state.sampler_state, t,
                                                 terms.get('vb', terms['loss']))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state, sampler_state=sampler_state)
        return new_state, _step_metrics(loss, terms, t, grads, schedule(state.step),
                                        diffusion.num_timesteps)

    return train_step


def compile_train_step(train_step, mesh, state, batch, rng):
    """AOT-compiles the step for the mesh (batch over 'data', the rest replicated, state
    donated). Calling the result never retraces: one compile per run, by construction."""
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    jitted = jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                     donate_argnums=0)
    return jitted.lower(state, batch, rng).compile()


def make_sample_fn(config, model, diffusion, num: int, mesh=None) -> Callable:
    """sample_fn(params, rng) -> [num, ...] samples with config.sampling's method, step count
    and classifier-free guidance scale; a conditional model cycles through the classes. The
    sampler compiles once: the parameters are a jit argument, not a constant."""
    # pylint: disable-next=import-outside-toplevel
    from diffusion_jax import generate, guidance, samplers
    s = config.sampling
    diffusion = generate.respaced(diffusion, s.get('num_steps', ''))
    shape = (num, *models.example_shape(model))
    num_classes = config.model.get('num_classes', 0)
    y = jnp.arange(num, dtype=jnp.int32) % num_classes if num_classes else None
    options = {k: s[k] for k in ('method', 'eta', 'clip_denoised') if k in s}
    if mesh is not None and num % mesh.devices.size == 0:
        options['mesh'] = mesh

    def sample_fn(params, rng):
        variables = {'params': params}
        if y is not None and s.get('guidance_scale', 0.0):
            model_fn = guidance.classifier_free_model_fn(model.apply, variables, y,
                                                         s.guidance_scale, num_classes)
        else:
            model_fn = guidance.bind_model(model.apply, variables, y)
        return samplers.sample(diffusion, model_fn, rng, shape, **options)['samples']

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
    model: Any
    diffusion: diffusion_lib.GaussianDiffusion
    mesh: Any
    train_ds: input_pipeline.Dataset


def _check_data_matches_model(config) -> None:
    data, model = config.data, config.model
    if 'data_dim' in model:
        return
    for data_field, model_field in (('image_size', 'image_size'), ('channels', 'in_channels')):
        if data[data_field] != model[model_field]:
            raise ValueError(
                f'data.{data_field}={data[data_field]} but model.{model_field}='
                f'{model[model_field]}: set both to the same value.')
    if model.get('num_classes', 0) and model.num_classes != data.num_classes:
        raise ValueError(f'model.num_classes={model.num_classes} but data.num_classes='
                         f'{data.num_classes}: a conditional model needs the dataset\'s labels.')


def prepare_run(config, workdir: str) -> _Run:
    """Every check of config and workdir, in the order a user would fix them; writes nothing."""
    if config.diffusion.timestep_sampler not in SAMPLERS:
        raise ValueError(f'diffusion.timestep_sampler={config.diffusion.timestep_sampler!r} is '
                         f'not valid; choose one of {", ".join(SAMPLERS)}.')
    model = models.get_model(config.model)
    diffusion = diffusion_lib.create_diffusion(config.diffusion)
    _check_data_matches_model(config)
    mesh = sharding.make_mesh()
    sharding.check_global_batch(config.training.batch_size, mesh, 'training.batch_size')
    train_ds = input_pipeline.get_dataset(config.data, config.data.train_split)
    checkpointing.check_compatible(workdir, config, models.param_shapes(model)['params'])
    return _Run(model, diffusion, mesh, train_ds)


def _write_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        image_utils.atomic_write(
            os.path.join(workdir, checkpointing.CONFIG_FILE),
            config.to_json(indent=2, sort_keys=True).encode())


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _Preemption:
    """SIGTERM sets a flag; the loop saves and returns at the next step (exit status 0)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        logger.warning('SIGTERM: saving a checkpoint and stopping.')
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _summarize(pending: list[dict], step: int) -> dict:
    """Mean metrics of the steps since the last report; raises on a non-finite loss/gradient."""
    host = jax.device_get(pending)
    bad = [i for i, m in enumerate(host) if not m['finite']]
    if bad:
        m = host[bad[0]]
        raise FloatingPointError(
            f'the loss or gradient became non-finite at step {step - len(host) + 1 + bad[0]} '
            f'(loss={m["loss"]}, grad_norm={m["grad_norm"]}): lower optim.learning_rate, set '
            'optim.grad_clip > 0, or check the data.')
    out = {k: float(np.mean([m[k] for m in host]))
           for k in ('loss', 'mse', 'vb', 'accuracy', 'grad_norm')
           if k in host[0]}
    q_sum, q_count = (np.sum([m[k] for m in host], axis=0) for k in ('q_sum', 'q_count'))
    out.update({f'loss_q{i}': float(q_sum[i] / q_count[i]) for i in range(NUM_QUARTILES)
                if q_count[i] > 0})
    out['learning_rate'] = float(host[-1]['learning_rate'])
    return out


def train_and_evaluate(config, workdir: str | None = None, *,
                       on_step: Callable[[int, TrainState], None] | None = None) -> TrainState:
    """Trains config's model in workdir (resuming from its latest checkpoint); returns the state.

    on_step(step, state), if given, runs after every step (step = steps done): a hook for
    notebooks and tests.
    """
    workdir = workdir or default_workdir(config)
    run = prepare_run(config, workdir)
    _write_config(config, workdir)
    writer = logging_utils.MetricWriter(workdir)
    ckpt = checkpointing.Checkpointer(workdir, config.training.keep_checkpoints)
    tc, mesh = config.training, run.mesh
    optimizer, schedule = create_optimizer(config.optim)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(tc.seed), 3)
    if ckpt.latest_step() is None:
        state = sharding.replicate(create_train_state(config, run.model, optimizer, init_rng),
                                   mesh)
    else:
        state = ckpt.restore(abstract_train_state(config, run.model, optimizer, mesh))
        logger.info('resumed from %s at step %d', checkpointing.checkpoint_dir(workdir),
                    int(state.step))
    start = int(jax.device_get(state.step))
    logger.info('%s: %s parameters, %d devices, global batch %d, workdir %s', config.get('name'),
                f'{models.count_params(state.params):,}', mesh.devices.size, tc.batch_size,
                workdir)
    batches = input_pipeline.prefetch(input_pipeline.train_iterator(
        run.train_ds, tc.batch_size, tc.seed, start, config.data.random_flip),
        config.data.get('prefetch', 2))
    sample_fn = None
    can_sample = bool(tc.sample_every_steps) and config.model.name != 'classifier'
    pending, step, last_saved = [], start, None
    try:
        with _Preemption() as preemption:
            for step in range(start + 1, tc.num_train_steps + 1):
                batch = sharding.shard_batch(next(batches), mesh)
                if step == start + 1:
                    logger.info('compiling the train step (first step takes a while)...')
                    t0 = time.perf_counter()
                    train_step = compile_train_step(
                        make_train_step(config, run.model, run.diffusion, optimizer, schedule),
                        mesh, state, batch, train_rng)
                    logger.info('compiled in %.1fs', time.perf_counter() - t0)
                    timer = (time.perf_counter(), start)
                state, metrics = train_step(state, batch, train_rng)
                pending.append(metrics)
                if on_step is not None:
                    on_step(step, state)
                stop = preemption.should_stop(step) or step == tc.num_train_steps
                if step % tc.log_every_steps == 0 or stop:
                    summary = _summarize(pending, step)
                    pending = []
                    timer, eta = _add_throughput(summary, timer, step, tc)
                    writer.scalars(step, summary, note=f'ETA {eta}')
                # A noisy classifier has nothing to sample.
                if can_sample and (step % tc.sample_every_steps == 0
                                              or step == tc.num_train_steps):
                    sample_fn = sample_fn or make_sample_fn(config, run.model, run.diffusion,
                                                            tc.num_sample_images, mesh)
                    samples = sample_fn(state.ema_params, jax.random.fold_in(sample_rng, step))
                    logger.info('samples: %s', write_samples(workdir, step, samples, writer))
                if step % tc.checkpoint_every_steps == 0 or stop:
                    if pending:
                        _summarize(pending, step)  # never save a non-finite state
                    ckpt.save(state)
                    last_saved = step
                if stop:
                    break
    finally:
        batches.close()
        ckpt.close()
        writer.close()
    if last_saved is not None:
        logger.info('checkpoint at step %d in %s', last_saved,
                    checkpointing.checkpoint_dir(workdir))
    return state


def _add_throughput(summary: dict, timer, step: int, tc):
    """Adds steps/s and images/s since the last report; returns (new timer, ETA text)."""
    now = time.perf_counter()
    t_prev, step_prev = timer
    rate = (step - step_prev) / max(now - t_prev, 1e-9)
    summary['steps_per_sec'] = rate
    summary['images_per_sec'] = rate * tc.batch_size
    eta = (tc.num_train_steps - step) / rate if rate > 0 else math.inf
    return (now, step), logging_utils.format_duration(eta)
