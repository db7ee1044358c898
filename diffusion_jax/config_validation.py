"""The whole config checked up front, before anything compiles, reads data or writes a file.

    config = config_validation.resolve(config, mode='train', typed={'diffusion.model_var_type':
                                                                     'learned_range'})

`resolve` returns a new ConfigDict with the derived fields filled in, or raises one ValueError
whose message starts with `section.field=value`, says what is wrong and how to fix it (main.py
prints it as one `error:` line). The checks, in the order a user would fix them, are listed in
CHECKS (the README's table is made from the same list).

Derived fields ("typed once"): the model's input size and channels follow `data.image_size` /
`data.channels`, and its output channels follow `diffusion.model_var_type` (2·C for a learned
variance, C otherwise; for the MLP: out_dim from data_dim). A field is derived when it is None or
when the user typed the field it follows but not the field itself (`typed`, the dotted paths given
on the command line); a value set explicitly that does not fit is an error naming both fields.
"""
from __future__ import annotations

import ml_collections
from absl import logging

from diffusion_jax import cold

MODES = ('train', 'eval', 'sample', 'edit')
LEARNED_VARIANCES = ('learned', 'learned_range')
BATCH_FIELDS = ('training.batch_size', 'sampling.batch_size', 'eval.batch_size')
# Integer fields that may be -1: "the latest checkpoint".
LATEST_ALLOWED = ('sampling.checkpoint_step', 'eval.checkpoint_step', 'distill.teacher_step',
                  'sampling.guidance_model_step')

CHECKS = (
    ('--mode', 'one of train, eval, sample, edit'),
    ('any count (`*batch_size`, `*_steps`, `num_*`, `keep_checkpoints`, ...)', 'not negative'),
    ('training/sampling/eval.batch_size', '> 0'),
    ('training.num_train_steps, log_every_steps, checkpoint_every_steps (train)', '> 0'),
    ('training.steps_per_call (train)', '>= 1; num_train_steps and the log/checkpoint/sample '
     'cadences multiples of it; a resumed checkpoint step too'),
    ('training.microbatch (train)', '0, or a divisor of training.batch_size that the device '
     "count divides; not for model.name='autoencoder' or a distillation"),
    ('diffusion.*', 'a valid schedule, mean/variance/loss type, timestep sampler'),
    ('diffusion.process', "a registered process (gaussian, flow, edm); loss_weighting='min_snr' "
     "and timestep_sampler='loss_aware' with gaussian only"),
    ('model.image_size / in_channels', 'equal data.image_size / data.channels (derived)'),
    ('data.latents', "'' or an autoencoder run (config.json, model.name='autoencoder', a "
     'checkpoint) of data.image_size/channels images; sets data.latent_size/latent_channels '
     '(derived)'),
    ('model.out_channels (out_dim)', '2·C for a learned diffusion.model_var_type, C otherwise '
     '(derived)'),
    ('model.learn_sigma (DiT)', 'True exactly for a learned diffusion.model_var_type (derived)'),
    ('model.num_classes', '0 or data.num_classes'),
    ('sampling.method', 'a registered sampler (diffusion_jax.samplers) the process runs'),
    ('sampling.num_steps', 'a valid respacing of diffusion.num_timesteps (gaussian), an '
     'integer K >= 1 (flow, edm)'),
    ('sampling.s_churn > 0', "method='heun'"),
    ('sampling.eta, langevin_snr, langevin_steps, ddim_guidance, dynamic_threshold, s_churn, '
     's_tmin, s_tmax, s_noise (where the sampler runs)', 'their default unless sampling.method '
     'reads them (samplers.options.fields_read)'),
    ('sampling.dynamic_threshold, eta, ddim_guidance', "0, 0, 'auto' for flow and edm (the "
     'gaussian chain\'s options)'),
    ('sampling.guidance_interval', "'' or 'lo,hi' with 0 <= lo < hi"),
    ('sampling.guidance_channels', 'in [0, model.in_channels]'),
    ('sampling.guidance_scale > 0', 'model.num_classes > 0 and training.label_dropout > 0 '
     '(unless sampling.guidance_model_workdir: autoguidance)'),
    ('sampling.guidance_model_workdir', 'a run of the same process, schedule, prediction, data '
     'shape and self-conditioning; its model.num_classes 0 or this run\'s (checked on load)'),
    ('training.self_condition', "model.name 'unet' or 'mlp'; diffusion.process gaussian, flow or "
     'edm; model.in_channels (in_dim) = 2·C (derived)'),
    ('training.label_dropout > 0', 'model.num_classes > 0'),
    ('model.text_encoder', "'' or 'small' / 'clip' (a UNet, model.num_classes=0, a captioned "
     "data.dataset such as 'digit_pairs'); model.context_dim = model.text.hidden_size (derived)"),
    ('training.caption_dropout', 'in [0, 1); > 0 needs model.text_encoder'),
    ('sampling.prompt / prompts_file / negative_prompt', 'a text run only; not both prompt and '
     'prompts_file; prompts_file an existing file with a prompt per line; --mode=sample of a '
     'text run needs one of them'),
    ('sampling.guidance_scale > 0 (text run)', 'training.caption_dropout > 0'),
    ('--mode=eval (text run)', 'eval.nll=False and eval.sample_quality=False (not yet wired)'),
    ('--mode=edit (text run)', 'refused (not yet wired; the library edit functions take a '
     'prompt-bound model_fn)'),
    ('eval.nll_estimator / eval.feature_space', "a known name; 'ode' for flow and edm"),
)


def _is_count(name: str) -> bool:
    return (name.endswith('batch_size') or name.endswith('_steps') or name.startswith('num_')
            or name.endswith('_every') or name == 'keep_checkpoints'
            or name.endswith('_per_image') or name.endswith('_step'))


def _leaves(tree, prefix=''):
    for key, value in tree.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            yield from _leaves(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f'--mode={mode!r} is not a mode: use one of {", ".join(MODES)}.')


def _check_counts(config, mode: str) -> None:
    for path in BATCH_FIELDS:
        section, field = path.split('.')
        if section in config and field in config[section] and config[section][field] <= 0:
            raise ValueError(f'{path}={config[section][field]} must be > 0: the number of '
                             'examples per step (a multiple of the device count).')
    for path, value in _leaves(config):
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        low = -1 if path in LATEST_ALLOWED else 0
        if _is_count(path.rsplit('.', 1)[-1]) and value < low:
            raise ValueError(f'{path}={value} is negative: counts and step numbers cannot be; '
                             f'set it to a number >= 0'
                             f'{" (or -1 for the latest checkpoint)" if low < 0 else ""}.')
    if mode == 'train':
        t = config.training
        for field, why in (('num_train_steps', 'the number of optimiser steps to train for'),
                           ('log_every_steps', 'how often metrics are written'),
                           ('checkpoint_every_steps', 'how often a checkpoint is saved')):
            if t[field] <= 0:
                raise ValueError(f'training.{field}={t[field]} must be > 0: {why} '
                                 f'(e.g. --config.training.{field}=1000).')
        _check_steps_per_call(t)
        check_microbatch(config)


def check_microbatch(config, num_devices: int | None = None) -> None:
    """training.microbatch (gradient accumulation, train.accumulate_gradients): 0 (the whole
    batch at once) or a divisor of training.batch_size; with num_devices, also a multiple of
    it (every microbatch is split over all devices). Not for the autoencoder or a distillation,
    which draw their noise inside the loss."""
    t = config.training
    m, batch = t.get('microbatch', 0), t.batch_size
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f'training.microbatch={m!r} must be an integer >= 0: the examples per '
                         'gradient-accumulation step (0: the whole batch at once).')
    if not m:
        return
    if batch % m:
        divisors = [d for d in range(m, 0, -1) if batch % d == 0]
        raise ValueError(f'training.microbatch={m} does not divide training.batch_size={batch}: '
                         'the step sums the gradients of batch_size / microbatch equal chunks; '
                         f'set --config.training.microbatch={divisors[0]} (a divisor of {batch}) '
                         'or 0 for the whole batch at once.')
    if num_devices is not None and m % num_devices:
        raise ValueError(f'training.microbatch={m} is not divisible by the {num_devices} devices: '
                         'each microbatch is split over every device; set '
                         f'--config.training.microbatch to a multiple of {num_devices} that '
                         f'divides training.batch_size={batch}, or 0.')
    name = config.model.get('name')
    distill = config.get('distill', {}).get('teacher_workdir', '')
    if name == 'autoencoder' or distill:
        what = "model.name='autoencoder'" if name == 'autoencoder' else 'a distillation'
        raise ValueError(f'training.microbatch={m} is not supported for {what} (its loss draws '
                         'its noise per call, so chunks would not add up to the batch); set '
                         'training.microbatch=0.')


def _check_steps_per_call(t) -> None:
    """The loop acts between calls of training.steps_per_call steps (train.make_multi_step)."""
    k = t.get('steps_per_call', 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f'training.steps_per_call={k!r} must be an integer >= 1: the train steps '
                         'run per jitted call (1: one step per call).')
    for field in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
                  'sample_every_steps'):
        value = t.get(field, 0)
        if value % k:
            lower, upper = value // k * k, (value // k + 1) * k
            other = f' (or {lower})' if lower else ''
            raise ValueError(
                f'training.{field}={value} is not a multiple of training.steps_per_call={k}: '
                f'the loop logs, saves, samples and stops only between calls of {k} steps; set '
                f'--config.training.{field}={upper}{other} or a steps_per_call that divides it.')


def _check_diffusion(config) -> None:
    from diffusion_jax import timestep_sampling  # pylint: disable=import-outside-toplevel
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    d = config.diffusion
    if d.get('timestep_sampler', 'uniform') not in timestep_sampling.SAMPLERS:
        raise ValueError(f'diffusion.timestep_sampler={d.timestep_sampler!r} is not valid; '
                         f'choose one of {", ".join(timestep_sampling.SAMPLERS)}.')
    from diffusion_jax import processes  # pylint: disable=import-outside-toplevel
    try:
        if cold.is_cold(d):
            processes.get_process(d)  # the 'cold' builder checks its own fields
        else:
            create_diffusion(d)
    except ValueError as err:
        text = str(err)
        raise ValueError(text if text.startswith('diffusion.') else f'diffusion.{text}') from err
    _check_process(d)


def _check_process(d) -> None:
    """diffusion.process and what depends on it (diffusion_jax.processes), one line each."""
    from diffusion_jax import processes  # pylint: disable=import-outside-toplevel
    name = d.get('process', 'gaussian')
    processes.check_name(name)
    weighting = d.get('loss_weighting', 'none')
    if name != 'gaussian' and weighting != 'none':
        raise ValueError(f'diffusion.loss_weighting={weighting!r} applies to diffusion.process='
                         f"'gaussian' (ε/x0/v-prediction, Hang et al. 2023); {name!r} weights its "
                         "loss through its own time law (and λ(σ) for edm): set "
                         "loss_weighting='none'.")
    # 'cold' trains through the discrete chain's timestep sampler (its levels are steps).
    if name not in ('gaussian', 'cold') and d.get('timestep_sampler', 'uniform') != 'uniform':
        raise ValueError(f'diffusion.timestep_sampler={d.timestep_sampler!r} applies to the '
                         f"discrete gaussian process; {name!r} draws its own training times: set "
                         "timestep_sampler='uniform'.")
    processes.get_process(d)  # the process's own fields (diffusion.flow.*, diffusion.edm.*)


def _expected_out(model, config) -> tuple[str, int]:
    """(the output field of this network, its value implied by the variance type)."""
    learned = config.diffusion.model_var_type in LEARNED_VARIANCES
    if 'data_dim' in model:
        return 'out_dim', int(model.data_dim) * (2 if learned else 1)
    # The data's channels: a self-conditioned network's input has twice as many ([x_t, x̂_0]).
    channels = int(model.in_channels) // (2 if _self_condition(config) else 1)
    return 'out_channels', channels * (2 if learned else 1)


def _self_condition(config) -> bool:
    return bool(config.get('training', {}).get('self_condition', False))


def _check_self_condition(config) -> None:
    """training.self_condition (Chen et al. 2022) needs a denoiser whose input channels can
    double: the UNet or the MLP, on the gaussian, flow or edm process."""
    if not _self_condition(config):
        return
    name, process = config.model.get('name'), config.diffusion.get('process', 'gaussian')
    if name not in ('unet', 'mlp'):
        raise ValueError(f'training.self_condition=True feeds x̂_0 as extra input channels of '
                         f"the 'unet' or 'mlp' network, not model.name={name!r}; set "
                         'training.self_condition=False.')
    if process not in ('gaussian', 'flow', 'edm'):
        raise ValueError(f'training.self_condition=True applies to diffusion.process='
                         f"'gaussian', 'flow' or 'edm', not {process!r}; set "
                         'training.self_condition=False.')


# Embedded datasets whose examples carry captions (input_pipeline.Dataset.captions).
CAPTIONED_DATASETS = ('digit_pairs',)
TEXT_ENCODERS = ('small', 'clip')


def is_text(config) -> bool:
    return bool(config.get('model', {}).get('text_encoder', ''))


def _derive_text(config, typed) -> None:
    """A text run (model.text_encoder): a UNet without labels on captioned data; its
    cross-attention width model.context_dim follows model.text.hidden_size."""
    model, data = config.model, config.data
    kind = model.get('text_encoder', '') or ''
    dropout = config.get('training', {}).get('caption_dropout', 0.0) or 0.0
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f'training.caption_dropout={dropout} must lie in [0, 1) (latent '
                         'diffusion drops 10% of the captions: 0.1).')
    if not kind:
        if dropout:
            raise ValueError(f'training.caption_dropout={dropout} needs a text run: set '
                             "model.text_encoder='small' (or 'clip'), or caption_dropout=0.")
        return
    if kind not in TEXT_ENCODERS:
        raise ValueError(f'model.text_encoder={kind!r} is not a trained text encoder: use one of '
                         f"{', '.join(TEXT_ENCODERS)} ('' for none).")
    if model.get('name') != 'unet':
        raise ValueError(f'model.text_encoder={kind!r} conditions a UNet, not model.name='
                         f"{model.get('name')!r}: set model.name='unet' or text_encoder=''.")
    if model.get('num_classes', 0):
        raise ValueError(f'model.num_classes={model.num_classes} with model.text_encoder='
                         f"{kind!r}: condition on captions or on labels; set num_classes=0.")
    if data.get('dataset') not in CAPTIONED_DATASETS:
        raise ValueError(f'model.text_encoder={kind!r} needs captions, but data.dataset='
                         f"{data.get('dataset')!r} has none: use {', '.join(CAPTIONED_DATASETS)}.")
    if 'text' not in model:
        raise ValueError(f'model.text_encoder={kind!r} needs the model.text section (vocab_size, '
                         'hidden_size, num_layers, num_heads, intermediate_size, max_length).')
    width = model.text.get('hidden_size')
    if not model.get('context_dim') or ('model.text.hidden_size' in typed
                                        and 'model.context_dim' not in typed):
        model.context_dim = width
    elif model.context_dim != width:
        raise ValueError(f'model.context_dim={model.context_dim} does not fit model.text.'
                         f'hidden_size={width}: the cross-attention reads the encoder\'s states; '
                         'leave context_dim unset (0) to derive it.')


def _derive_model(config, typed) -> None:
    """Fills in / checks the model fields that follow data and diffusion (config is unlocked)."""
    model, data = config.model, config.data
    _check_self_condition(config)
    _derive_text(config, typed)
    if data.get('image_width', 0):  # H x W images (digit_pairs: 8 x 16): the UNet's W follows
        if model.get('name') != 'unet':
            raise ValueError(f'data.image_width={data.image_width}: non-square images are '
                             f"sampled by the UNet only, not model.name={model.get('name')!r}.")
        model.image_width = int(data.image_width)
    # A self-conditioned network takes [x_t, x̂_0]: twice the data's channels (Chen et al. 2022).
    factor = 2 if _self_condition(config) else 1
    if model.get('name') == 'mlp' or 'data_dim' in model:
        if factor > 1 and 'in_dim' not in model:  # a config from before the field
            model.in_dim = 0
        if 'in_dim' in model:  # in_dim 0 means data_dim
            plain = model.in_dim if model.in_dim == model.data_dim else 0  # both mean data_dim
            _derive_field(model, 'in_dim', 'model.data_dim', model.data_dim,
                          model.data_dim * factor if factor > 1 else plain, typed)
    else:
        pairs = ((('latent_size', 'image_size'), ('latent_channels', 'in_channels'))
                 if data.get('latents', '')  # a latent run: sized by its autoencoder
                 else (('image_size', 'image_size'), ('channels', 'in_channels')))
        for data_field, model_field in pairs:
            if model_field not in model or data_field not in data:
                continue
            f = factor if model_field == 'in_channels' else 1
            typed = _derive_field(model, model_field, f'data.{data_field}', data[data_field],
                                  data[data_field] * f, typed)
    if model.get('name') == 'classifier':
        return  # a classifier's output is its logits
    if model.get('name') == 'autoencoder':  # a reconstruction of its input
        model.out_channels = model.in_channels
        return
    if 'learn_sigma' in model:  # DiT: the output width is in_channels·(2 if learn_sigma)
        _derive_learn_sigma(config, typed)
    field, want = _expected_out(model, config)
    if field not in model:
        return
    sources = ('diffusion.model_var_type', 'model.in_channels', 'model.data_dim')
    follows = any(s in typed for s in sources) and f'model.{field}' not in typed
    if model[field] is None or follows:
        model[field] = want
    elif model[field] != want:
        kind = 'a learned' if config.diffusion.model_var_type in LEARNED_VARIANCES else 'a fixed'
        raise ValueError(
            f'model.{field}={model[field]} does not fit diffusion.model_var_type='
            f'{config.diffusion.model_var_type!r}: {kind} variance needs {want} output channels; '
            f'set --config.model.{field}={want} (or leave it unset to derive it).')
    classes = model.get('num_classes', 0) or 0
    if classes and classes != data.get('num_classes', 0):
        raise ValueError(f'model.num_classes={classes} does not fit data.num_classes='
                         f'{data.get("num_classes", 0)}: a conditional model needs the dataset\'s '
                         'labels; set model.num_classes to 0 or to data.num_classes.')


def _derive_field(model, field: str, source: str, source_value, want, typed) -> set:
    """model.<field> = want when unset or when its source (or training.self_condition) was typed
    but the field was not; a different explicit value is an error naming both. Returns typed
    with the field added where it was derived (what follows from it is re-derived too)."""
    sources = (source, 'training.self_condition')
    if model[field] is None or (any(src in typed for src in sources)
                                and f'model.{field}' not in typed):
        model[field] = want
        return typed | {f'model.{field}'}
    if model[field] != want:
        if want == source_value or not want:
            raise ValueError(f'model.{field}={model[field]} does not fit {source}={source_value}: '
                             f'set both to the same value (or leave model.{field} unset to '
                             'derive it).')
        raise ValueError(f'model.{field}={model[field]} does not fit {source}={source_value} '
                         f'with training.self_condition=True (the input is [x_t, x̂_0]): set '
                         f'--config.model.{field}={want} (or leave it unset to derive it).')
    return typed


def _derive_learn_sigma(config, typed) -> None:
    model, learned = config.model, config.diffusion.model_var_type in LEARNED_VARIANCES
    if 'diffusion.model_var_type' in typed and 'model.learn_sigma' not in typed:
        model.learn_sigma = learned
    elif bool(model.learn_sigma) != learned:
        raise ValueError(
            f'model.learn_sigma={model.learn_sigma} does not fit diffusion.model_var_type='
            f'{config.diffusion.model_var_type!r}: set --config.model.learn_sigma={learned} (a '
            'learned variance needs the doubled output channels, a fixed one must not have them).')


def sampler_names() -> tuple[str, ...]:
    """The registered sampler names (diffusion_jax.samplers)."""
    from diffusion_jax import samplers  # pylint: disable=import-outside-toplevel
    return tuple(samplers.METHODS)


# (field, its off value, what it is): sampling options of the Gaussian chain only.
GAUSSIAN_ONLY_SAMPLING = (
    ('dynamic_threshold', 0.0, "dynamic thresholding of x̂_0 (Imagen's)"),
    ('eta', 0.0, "DDIM's η"),
    ('ddim_guidance', 'auto', 'the order of classifier guidance and clipping'),
)


def _check_process_sampling(config, name: str) -> None:
    """sampling.* for a continuous process: a method it runs, an integer num_steps >= 1."""
    from diffusion_jax import processes  # pylint: disable=import-outside-toplevel
    s = config.sampling
    processes.get_process(config.diffusion).check_method(s.method)
    k = s.num_steps
    if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())) \
            or int(k) < 1:
        raise ValueError(f'sampling.num_steps={k!r}: diffusion.process={name!r} samples over K '
                         'steps of its time grid; give an integer K >= 1 (e.g. 18).')
    for field in ('progressive', 'interpolation'):
        if s.get(field, False):
            raise ValueError(f'sampling.{field}=True draws its figures along the discrete chain '
                             f'(diffusion.process=\'gaussian\'), not for {name!r}: set '
                             f'sampling.{field}=False.')
    if s.get('classifier_scale', 0.0):
        raise ValueError(f'sampling.classifier_scale={s.classifier_scale}: classifier guidance '
                         f'runs on the gaussian chain only, not on {name!r}; set it to 0.')
    # Options of the discrete chain's samplers that no process solver reads: refused rather than
    # silently ignored.
    for field, off, what in GAUSSIAN_ONLY_SAMPLING:
        value = s.get(field, off)
        if value != off:
            raise ValueError(f'sampling.{field}={value!r}: {what} applies to the gaussian chain '
                             f'only, not to diffusion.process={name!r}; set sampling.{field}='
                             f'{off!r}.')
    if s.get('s_churn', 0.0) and s.method != 'heun':
        raise ValueError(f"sampling.s_churn={s.s_churn} applies to method='heun' (EDM "
                         f"Algorithm 2), not {s.method!r}; set s_churn=0.")


def _check_sampling(config) -> None:
    s = config.sampling
    from diffusion_jax import guidance  # pylint: disable=import-outside-toplevel
    guidance.parse_guidance_interval(s.get('guidance_interval', ''))
    process = config.diffusion.get('process', 'gaussian')
    if process not in ('gaussian', 'cold'):
        _check_process_sampling(config, process)
        return
    names = sampler_names()
    if s.method not in names:
        raise ValueError(f'sampling.method={s.method!r} is not a sampler: use one of '
                         f'{", ".join(names)}.')
    if cold.is_cold(config.diffusion) or s.method in cold.METHODS:
        _check_cold_sampling(config)
        return
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    from diffusion_jax.respace import respaced  # pylint: disable=import-outside-toplevel
    try:
        respaced(create_diffusion(config.diffusion), s.num_steps)
    except (ValueError, KeyError) as err:
        raise ValueError(f'sampling.num_steps={s.num_steps!r} is not a respacing of '
                         f'diffusion.num_timesteps={config.diffusion.num_timesteps}: {err}') from err


def _check_cold_sampling(config) -> None:
    """Cold diffusion runs its own samplers over all T levels; Gaussian runs never run them."""
    s = config.sampling
    if not cold.is_cold(config.diffusion):
        raise ValueError(f'sampling.method={s.method!r} runs on diffusion.process=\'cold\' only; '
                         'this run is Gaussian: choose another sampling.method.')
    if s.method not in cold.METHODS:
        raise ValueError(f'sampling.method={s.method!r} cannot run on diffusion.process=\'cold\'; '
                         f'use one of {", ".join(cold.METHODS)}.')
    if s.get('num_steps', '') not in ('', None, 0):
        raise ValueError(f'sampling.num_steps={s.num_steps!r}: cold diffusion restores over all '
                         f'diffusion.num_timesteps={config.diffusion.num_timesteps} levels; set '
                         "sampling.num_steps=''.")


def check_guidance(config) -> None:
    """Guidance against the (trained) run: classifier-free guidance needs a class-conditional
    model trained with label dropout; label dropout needs a class-conditional model."""
    classes = config.model.get('num_classes', 0) or 0
    dropout = config.training.get('label_dropout', 0.0)
    if is_text(config):
        _check_text_guidance(config)
        return
    if dropout > 0 and not classes:
        raise ValueError(f'training.label_dropout={dropout} needs a class-conditional model: set '
                         'model.num_classes (to data.num_classes) or label_dropout to 0.')
    scale = config.sampling.get('guidance_scale', 0.0)
    if config.sampling.get('guidance_model_workdir', ''):
        # Autoguidance: the guide is another network, so neither labels nor label dropout are
        # needed; the guide itself is checked when it is loaded (run.load_guide).
        if scale < 0:
            raise ValueError(f'sampling.guidance_scale={scale} must be >= 0 with '
                             'sampling.guidance_model_workdir (0: no guidance).')
        if config.sampling.get('classifier_scale', 0.0):
            raise ValueError(f'sampling.classifier_scale={config.sampling.classifier_scale} '
                             'with sampling.guidance_model_workdir: use one kind of guidance; '
                             'set classifier_scale=0 or guidance_model_workdir=\'\'.')
        return
    if scale > 0 and not classes:
        raise ValueError(f'sampling.guidance_scale={scale} needs a class-conditional model, but '
                         'model.num_classes=0: set sampling.guidance_scale=0.')
    if scale > 0 and dropout <= 0:
        raise ValueError(f'sampling.guidance_scale={scale} needs a model trained with '
                         f'training.label_dropout > 0 (this one: {dropout}), so that it knows '
                         'the null label; set sampling.guidance_scale=0 or train with '
                         '--config.training.label_dropout=0.1.')


def _check_text_guidance(config) -> None:
    s = config.sampling
    scale = s.get('guidance_scale', 0.0)
    dropout = config.training.get('caption_dropout', 0.0) or 0.0
    if scale > 0 and dropout <= 0:
        raise ValueError(f'sampling.guidance_scale={scale} needs a text run trained with '
                         f'training.caption_dropout > 0 (this one: {dropout}), so that it knows '
                         'the empty prompt; set sampling.guidance_scale=0 or train with '
                         '--config.training.caption_dropout=0.1.')
    for field in ('guidance_model_workdir', 'classifier_scale'):
        if s.get(field, ''):
            raise ValueError(f'sampling.{field}={s.get(field)!r}: a text run is guided '
                             'classifier-free (sampling.guidance_scale); set it to its default.')


def _check_prompts(config, mode: str) -> None:
    """sampling.prompt / prompts_file / negative_prompt: text runs only, one source of prompts;
    --mode=sample of a text run needs one."""
    s = config.sampling
    given = [f for f in ('prompt', 'prompts_file', 'negative_prompt') if s.get(f, '')]
    if not is_text(config):
        if given:
            raise ValueError(f'sampling.{given[0]}={s.get(given[0])!r} needs a text run '
                             "(model.text_encoder='small' or 'clip'); this run is not one: "
                             f'drop sampling.{given[0]}.')
        return
    if s.get('prompt', '') and s.get('prompts_file', ''):
        raise ValueError(f'sampling.prompt={s.prompt!r} and sampling.prompts_file='
                         f'{s.prompts_file!r}: give one of them.')
    if s.get('prompts_file', ''):
        from diffusion_jax import text  # pylint: disable=import-outside-toplevel
        text.read_prompts_file(s.prompts_file)
    if mode == 'sample' and not (s.get('prompt', '') or s.get('prompts_file', '')):
        raise ValueError("sampling.prompt='' and sampling.prompts_file='': a text run samples "
                         'from prompts; set --config.sampling.prompt="three and seven" or '
                         'sampling.prompts_file=FILE (one prompt per line).')
    if mode == 'edit':
        raise ValueError(f'model.text_encoder={config.model.text_encoder!r}: --mode=edit of a '
                         'text run is not wired yet (the library\'s samplers.repaint / sdedit / '
                         'ddim_edit take a prompt-bound model_fn); edit a label-conditioned or '
                         'unconditional run.')
    if mode == 'eval':
        e = config.get('eval', {})
        for field in ('nll', 'sample_quality'):
            if e.get(field, field == 'nll'):
                raise ValueError(f'eval.{field}=True: --mode=eval of a text run is not wired '
                                 f'yet; set eval.{field}=False (the prompt accuracy of '
                                 'experiments/digit_pairs.py measures text runs).')


def _check_eval(config) -> None:
    e = config.eval
    # pylint: disable=import-outside-toplevel
    from diffusion_jax.evaluation.fid import FEATURE_SPACES
    from diffusion_jax.evaluation.likelihood import ESTIMATORS
    estimator = e.get('nll_estimator', 'full')
    if estimator not in ESTIMATORS:
        raise ValueError(f'eval.nll_estimator={estimator!r}: use one of {", ".join(ESTIMATORS)}.')
    process = config.diffusion.get('process', 'gaussian')
    if process not in ('gaussian', 'cold') and e.get('nll', True) and estimator != 'ode':
        raise ValueError(f'eval.nll_estimator={estimator!r} is the discrete chain\'s bound; '
                         f"diffusion.process={process!r} has only its ODE likelihood: set "
                         "eval.nll_estimator='ode' (or eval.nll=False).")
    space = e.get('feature_space', 'inception')
    if space not in FEATURE_SPACES:
        raise ValueError(f'eval.feature_space={space!r}: use one of {", ".join(FEATURE_SPACES)}.')


def _check_guidance_channels(config) -> None:
    k = int(config.sampling.get('guidance_channels', 0) or 0)
    c = config.model.get('in_channels', None)
    if k < 0 or (c is not None and k > c):
        raise ValueError(f'sampling.guidance_channels={k} must lie in [0, model.in_channels={c}] '
                         "(0: every channel; 3: DiT's sampler on 4 SD-VAE latent channels).")


def _check_latent_modes(config) -> None:
    s = config.get('sampling', {})
    for field in ('progressive', 'interpolation'):
        if s.get(field, False):
            raise ValueError(f'sampling.{field}=True: the chain figures are of pixel runs; a '
                             f'latent run (data.latents) samples pixels only: set it to False.')


def samples_drawn(config, mode: str) -> bool:
    """Whether `mode` runs config.sampling's sampler: --mode=sample, --mode=eval with
    eval.sample_quality (and no eval.samples_path), --mode=train with periodic samples."""
    if mode == 'sample':
        return True
    if mode == 'eval':
        e = config.get('eval', {})
        return bool(e.get('sample_quality', False)) and not e.get('samples_path', '')
    if mode == 'train':
        return bool(config.get('training', {}).get('sample_every_steps', 0))
    return False


def _check_method_options(config, mode: str) -> None:
    """Options the chosen sampler does not read are refused where it runs (one line); a
    multistep λ-solver on evenly strided steps gets one warning (samplers.options)."""
    if not samples_drawn(config, mode):
        return
    from diffusion_jax.samplers import options  # pylint: disable=import-outside-toplevel
    process = config.diffusion.get('process', 'gaussian')
    options.check_method_options(config.sampling, process)
    if process == 'gaussian':
        advice = options.spacing_warning(config.sampling.method,
                                         config.sampling.get('num_steps', ''),
                                         int(config.diffusion.num_timesteps))
        if advice:
            logging.warning('%s', advice)


def resolve(config, mode: str = 'train', typed=()) -> ml_collections.ConfigDict:
    """A validated copy of config with the derived fields filled in; ValueError otherwise.

    typed: the dotted paths the user typed (a field whose source was typed but which was not
    typed itself is re-derived). Reads nothing from disk. Logs one warning when a multistep
    solver is asked for evenly strided steps (samplers.options.spacing_warning): run.resolve_config
    calls this once per command, so the warning appears once.
    """
    check_mode(mode)
    typed = set(typed or ())
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    _check_counts(config, mode)
    if cold.is_cold(config.diffusion):
        # The one derivation of the cold process's image shape (processes/cold.py reads it):
        # the data's, or a latent run's latent grid (data.latent_size, set before this).
        config.diffusion.image_shape = cold.image_shape(config)
    _check_diffusion(config)
    if config.get('data', {}).get('latents', ''):
        # data.latent_size / latent_channels: filled from the autoencoder's config.json by
        # run.resolve_config (run.derive_latents) before this; they size the model below.
        _check_latent_modes(config)
    _derive_model(config, typed)
    if 'sampling' in config:
        _check_sampling(config)
        check_guidance(config)
        _check_guidance_channels(config)
        _check_method_options(config, mode)
        _check_prompts(config, mode)
    if 'eval' in config:
        _check_eval(config)
    return config
