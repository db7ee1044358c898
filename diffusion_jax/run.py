"""A training run on disk, as one object: its stored config, its checkpoints, and the model,
diffusion and parameters rebuilt from them. Training (resume), `--mode=sample`, `--mode=eval`,
the converters and the notebooks all go through here.

    from diffusion_jax import run
    loaded = run.load('runs/digits', {'sampling.num_steps': 'ddim50'})   # EMA params, latest step
    loaded.config, loaded.variables, loaded.step, loaded.model, loaded.diffusion
    run.create('runs/converted', config, params)    # a run made outside the train loop
    config = run.resolve_config('runs/digits', None, {'sampling.method': 'ddim'}, 'sample')

The run layer: this module, checkpointing, config_validation, defaults and train_state. It knows
no mode (it never imports train, generate or evaluation); every mode starts from
resolve_config's result, once per command.

Workdir layout read here: config.json (written by training, never silently replaced) and
checkpoints/<step>/ (diffusion_jax.checkpointing; damaged steps are skipped there).

Which config a run uses. The sections that training fixes (TRAINED_SECTIONS: model, diffusion,
data) always come from config.json: a network trained with T = 100 is sampled with T = 100 whatever
config file is passed. The sections a mode owns (MODE_SECTIONS: sampling, eval) come from the
passed config; every other section (training, optim) stays as stored. Typed overrides
(`--config.x.y=`) apply last; one for a trained section (or training.label_dropout, which guidance
depends on) is refused when it differs from the stored value (one line: the field, the stored
value, the typed value). A passed config's trained sections that differ are replaced by the
stored ones with a log line, not an error, because a config file's defaults are not something
the user typed. UNTRAINED_FIELDS (where the data lives, how it is read, the compute dtype and
attention kernel) are not part of what was trained: they follow this machine's config and
typed overrides in every mode, and resume does not compare them.

This module also works as a config file for ml_collections' config_flags:
`--config=diffusion_jax/run.py:WORKDIR` is the run's stored config (main.py passes it when a
sample or eval command has no --config), so `--config.sampling.*` overrides parse against the
stored fields and their types.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging as py_logging
from typing import Any, Mapping

import ml_collections
from etils import epath

from diffusion_jax import config_validation, defaults

CONFIG_FILE = 'config.json'
TRAINED_SECTIONS = ('model', 'diffusion', 'data')  # fixed by the trained network
# A resumed run must also keep its optimiser, and a distillation its teacher and method.
RESUME_SECTIONS = TRAINED_SECTIONS + ('optim', 'distill')
MODE_SECTIONS = ('sampling', 'eval', 'edit')  # what --mode=sample / eval / edit may change
TRAINED_FIELDS = ('training.label_dropout', 'training.caption_dropout')  # outside TRAINED_SECTIONS, fixed by training too
# Fields inside the trained sections that are not part of what was trained: where the data
# lives and how it is read (batches are a pure function of seed and step whatever the worker
# count), and how the network is computed (params stay float32 whatever model.dtype computes
# in; the attention kernels are equal within rounding; model.remat recomputes the same
# function). A run may be resumed, sampled or
# evaluated with other values, typed or in the passed config; every other trained field is fixed.
UNTRAINED_FIELDS = ('data.data_dir', 'data.download', 'data.num_workers', 'data.prefetch',
                    'model.attention_implementation', 'model.dtype', 'data.latents_cache',
                    'diffusion.image_shape',  # derived from data (cold runs) on every resolve
                    'model.remat')
LATEST = -1  # sampling.checkpoint_step / eval.checkpoint_step: the newest valid checkpoint

logger = py_logging.getLogger('diffusion_jax').getChild('run')


def _plain(value):
    """A JSON-comparable form: tuples -> lists, ConfigDicts -> dicts."""
    return json.loads(json.dumps(value.to_dict() if hasattr(value, 'to_dict') else value,
                                 default=list))


def _flat(tree: Mapping, prefix: str = '') -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


# Fields added since the first release outside `model`, with the value the code takes where a
# config lacks them (input_pipeline, train, diffusion.create_diffusion). A network's absent
# fields take its class's defaults (models.get_model builds it from the fields given).
ABSENT_DEFAULTS = {'data.num_workers': 0, 'data.prefetch': 2,
                   'diffusion.rescale_zero_terminal_snr': False}


def with_defaults(config: Mapping) -> dict:
    """A plain copy of config with today's default for every trained field it lacks (a run
    from an earlier release means today what these defaults say): ABSENT_DEFAULTS, and the
    network class's default for each field of model.name's network that is absent."""
    import dataclasses as dc  # pylint: disable=import-outside-toplevel
    from diffusion_jax import models  # pylint: disable=import-outside-toplevel
    out = _plain(config)
    for path, value in ABSENT_DEFAULTS.items():
        section, field = path.split('.')
        if isinstance(out.get(section), dict):
            out[section].setdefault(field, value)
    model = out.get('model')
    if isinstance(model, dict) and model.get('name') in models.MODELS:
        for f in dc.fields(models.MODELS[model['name']]):
            if f.name not in ('parent', 'name') and f.default is not dc.MISSING:
                model.setdefault(f.name, _plain(f.default))
    return out


def section_differences(old: Mapping, new: Mapping, sections, skip=()) -> list[str]:
    """'section.field: A -> B' for every field of `sections` (but those in `skip`) that differs
    between two configs, a field either lacks counting as its default (with_defaults)."""
    old, new = _flat(with_defaults(old)), _flat(with_defaults(new))
    out = []
    for name in sorted(set(old) | set(new)):
        if name in skip:
            continue
        if name.split('.', 1)[0] in sections and old.get(name, '<absent>') != new.get(
                name, '<absent>'):
            out.append(f'{name}: {old.get(name, "<absent>")!r} -> {new.get(name, "<absent>")!r}')
    return out


class Run:
    """A run directory, read only: Run(workdir).config, .latest_step(), .steps()."""

    def __init__(self, workdir):
        self.workdir = epath.Path(workdir)

    @property
    def config_path(self) -> epath.Path:
        return self.workdir / CONFIG_FILE

    def has_config(self) -> bool:
        return self.config_path.exists()

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The stored config.json as a ConfigDict (tuples come back as lists)."""
        if not self.has_config():
            raise FileNotFoundError(
                f'{self.config_path} does not exist: {str(self.workdir)!r} is not a trained run. '
                'Pass the --workdir of a run (train one with python -m diffusion_jax.main '
                f'--config=... --workdir={self.workdir}).')
        return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))

    def steps(self) -> list[int]:
        """The steps of the valid checkpoints, oldest first."""
        from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
        return list(checkpointing.valid_steps(str(self.workdir)))

    def latest_step(self) -> int | None:
        from diffusion_jax import checkpointing  # pylint: disable=import-outside-toplevel
        return checkpointing.latest_step(str(self.workdir))

    def checkpoint_step(self, step: int | None = None, field: str = 'checkpoint_step') -> int:
        """`step` if it is a valid checkpoint (None or LATEST: the newest); else a ValueError
        (FileNotFoundError when there is no checkpoint at all)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(
                f'no checkpoint in {self.workdir / "checkpoints"}: train first (python -m '
                f'diffusion_jax.main --config=... --workdir={self.workdir}) or pass the workdir '
                'of a trained run.')
        if step is None or int(step) == LATEST:
            return steps[-1]
        if int(step) not in steps:
            raise ValueError(f'{field}={step}: {self.workdir} has checkpoints at steps {steps}; '
                             f'choose one of them, or {LATEST} for the latest.')
        return int(step)


def get_config(workdir: str) -> ml_collections.ConfigDict:
    """config_flags entry point (`--config=diffusion_jax/run.py:WORKDIR`): the stored config,
    with the current defaults for any sampling/eval field it predates."""
    return with_mode_defaults(Run(workdir).config)


def with_mode_defaults(config) -> ml_collections.ConfigDict:
    """config with today's default for every sampling/eval field it lacks (a run trained before
    a field existed can still be sampled with an override of that field)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for name, section_defaults in (('sampling', defaults.default_sampling_config()),
                                   ('eval', defaults.default_eval_config()),
                                   ('edit', defaults.default_edit_config())):
        section = config.get(name) or ml_collections.ConfigDict()
        for key, value in section_defaults.items():
            if key not in section:
                section[key] = value
        config[name] = section
    if 'compile_cache_dir' not in config:  # a machine's setting, not the run's (sharding)
        config.compile_cache_dir = 'auto'
    return config


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def merge_config(stored, config=None, typed: Mapping[str, Any] | None = None):
    """The config a sample/eval run uses, a new ConfigDict.

    stored: the run's config.json. config: a whole config (e.g. the --config file with its
    overrides); its MODE_SECTIONS (sampling, eval) replace the stored ones, everything else
    stays as stored (differences in TRAINED_SECTIONS are logged: a file's defaults are not a
    request). typed: {'section.field': value} the user typed, applied last; one that names a
    TRAINED_SECTIONS field (or TRAINED_FIELDS) with a value other than the stored one is a
    ValueError.
    """
    typed = dict(typed or {})
    merged = with_defaults(with_mode_defaults(stored))
    for path, value in typed.items():  # refused before anything else is looked at
        _set_typed(merged, path, value)
    if config is not None:
        given = _plain(config)
        changed = [c for c in section_differences(stored, given, TRAINED_SECTIONS,
                                                  skip=UNTRAINED_FIELDS)
                   if c.split(':', 1)[0] not in typed]
        if changed:
            logger.info('using the stored %s (the given config differs: %s)',
                        '/'.join(TRAINED_SECTIONS), '; '.join(changed[:5]))
        for name in MODE_SECTIONS:
            if name in given:
                merged[name] = given[name]
        if 'compile_cache_dir' in given:  # this machine's too
            merged['compile_cache_dir'] = given['compile_cache_dir']
        for path in UNTRAINED_FIELDS:  # this machine's, as the given config says
            section, field = path.split('.')
            if field in (given.get(section) or {}) and isinstance(merged.get(section), dict):
                merged[section][field] = given[section][field]
        for path, value in typed.items():  # the typed value wins over the given config's
            _set_typed(merged, path, value)
    return ml_collections.ConfigDict(merged)


def resolve_config(workdir, config=None, typed: Mapping[str, Any] | None = None,
                   mode: str = 'sample') -> ml_collections.ConfigDict:
    """The one config resolution of a command: the validated config `mode` runs with.

    workdir: the run's directory. config: a whole config (a --config file with its overrides) or
    None (the run's stored one). typed: {'section.field': value} the user typed. mode: 'train'
    (config is required and validated as is; check_resume compares it with the stored run
    later) | 'sample' | 'eval' (the stored config.json, merge_config'd with config and typed;
    an eval of an existing samples file, eval.samples_path, needs no run). Returns a new
    ConfigDict with the derived fields filled in (config_validation.resolve); raises ValueError
    (bad input) or FileNotFoundError (no run) before anything is read beyond config.json.
    main, train.train_and_evaluate, generate.run_sampling and evaluate.run_eval call this once
    and hand the result to the mode's run_resolved.
    """
    config_validation.check_mode(mode)
    typed = dict(typed or {})
    if mode == 'train':
        if config is None:
            raise ValueError('--mode=train needs --config=FILE (e.g. --config=configs/digits.py).')
        return config_validation.resolve(_with_latents(config), mode, typed)
    on_disk = Run(workdir)
    if on_disk.has_config():
        config = merge_config(on_disk.config, config, typed)
    elif config is None or not (mode == 'eval' and config.eval.get('samples_path', '')):
        on_disk.config  # pylint: disable=pointless-statement  (raises: not a run)
    return config_validation.resolve(_with_latents(config), mode, typed)


def autoencoder_config(path: str, field: str = 'data.latents'):
    """The stored config of the autoencoder run at `path`; one ValueError line if it is missing,
    not a run, or not an autoencoder."""
    on_disk = Run(path)
    if not on_disk.has_config():
        raise ValueError(f'{field}={path!r} is not an autoencoder run (no config.json there): '
                         'train one (configs/digits_vae.py) or convert one (--from=diffusers '
                         '--preset=sd_vae) and give its workdir.')
    stored = on_disk.config
    name = stored.get('model', {}).get('name')
    if name != 'autoencoder':
        raise ValueError(f"{field}={path!r} holds a model.name={name!r} run, not an "
                         "autoencoder: give the workdir of a model.name='autoencoder' run.")
    if on_disk.latest_step() is None:
        raise ValueError(f'{field}={path!r} holds no checkpoint: train the autoencoder first.')
    return stored


def derive_latents(config) -> None:
    """Fills data.latent_size / data.latent_channels / data.latent_scale of a latent run from the
    autoencoder's stored config (config unlocked; config_validation._derive_model then sizes the
    diffusion model from them). Checks that the autoencoder was made for these images."""
    d = config.data
    ae = autoencoder_config(d.latents).model
    f = 2 ** (len(ae.block_out_channels) - 1)
    if ae.image_size != d.image_size or ae.in_channels != d.channels:
        raise ValueError(f'data.latents={d.latents!r} encodes {ae.image_size}x{ae.image_size}x'
                         f'{ae.in_channels} images, but data.image_size={d.image_size}, '
                         f'data.channels={d.channels}: use an autoencoder of this dataset.')
    if d.get('random_flip', False) and d.get('latents_cache', ''):
        raise ValueError('data.random_flip=True with data.latents_cache: the cache holds the '
                         'latents of unflipped images; set data.random_flip=False or encode on '
                         "the fly (data.latents_cache='').")
    d.latent_size = d.image_size // f
    d.latent_channels = int(ae.latent_channels)
    if not d.get('latent_scale'):
        d.latent_scale = float(ae.scaling_factor)


def _with_latents(config):
    """An unlocked copy of config with a latent run's data fields derived (derive_latents)."""
    if config is None or not config.get('data', {}).get('latents', ''):
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    derive_latents(config)
    return config


def _set_typed(merged: dict, path: str, value) -> None:
    """merged[path] = value, refusing a trained field whose stored value differs."""
    keys = path.split('.')
    node = merged
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            options = node if isinstance(node, dict) else ()
            raise ValueError(f'{path}: the run has no field {key!r}{_did_you_mean(key, options)}.')
        if i < len(keys) - 1:
            node = node[key]
    stored_value = node[keys[-1]]
    trained = (keys[0] in TRAINED_SECTIONS or path in TRAINED_FIELDS) and (
        path not in UNTRAINED_FIELDS)
    if trained and _plain(stored_value) != _plain(value):
        raise ValueError(
            f'{path}={_plain(value)!r} differs from the trained run\'s {path}='
            f'{_plain(stored_value)!r}: {path} is fixed by training; drop the override '
            '(sample and eval take it from the run\'s config.json) or train a new run.')
    node[keys[-1]] = value


@dataclasses.dataclass
class Loaded:
    """A run ready for inference. variables: the model's {'params': ...}, replicated on the mesh;
    step: the checkpoint's step."""
    config: ml_collections.ConfigDict
    variables: dict
    step: int
    model: Any
    diffusion: Any
    workdir: str


def load(workdir, overrides=None, *, step=None, use_ema: bool = True, mesh=None) -> Loaded:
    """The run in workdir at checkpoint `step` (None: the latest valid one).

    overrides: None (the stored config), a ConfigDict (a whole config: see merge_config) or a
    mapping {'sampling.num_steps': 'ddim50', ...} of typed overrides (trained fields that differ
    are refused). use_ema: the EMA parameters (default) or the raw ones. mesh: where the
    parameters are replicated (default sharding.make_mesh(), every device).
    """
    stored = Run(workdir).config
    if overrides is None or isinstance(overrides, ml_collections.ConfigDict):
        config = merge_config(stored, overrides)
    else:
        config = merge_config(stored, typed=overrides)
    return load_resolved(workdir, config, step=step, use_ema=use_ema, mesh=mesh)


def load_resolved(workdir, config, *, step=None, use_ema: bool = True, mesh=None) -> Loaded:
    """load with `config` taken as it is (resolve_config's result: nothing is merged again):
    the model and diffusion of config, the parameters of the checkpoint at `step`."""
    # pylint: disable=import-outside-toplevel
    import jax
    from diffusion_jax import checkpointing, cold, models, sharding
    on_disk = Run(workdir)
    chosen = on_disk.checkpoint_step(step)
    model = models.get_model(config.model)
    diffusion = cold.create_for_config(config)
    abstract = models.param_shapes(model)['params']
    checkpointing.check_compatible(str(on_disk.workdir), abstract)  # raises on other shapes
    replicated = sharding.replicated(mesh if mesh is not None else sharding.make_mesh())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)
    item = 'ema_params' if use_ema else 'params'
    # The latest is asked for as None, so that an unreadable newest step falls back to the next.
    out, chosen = checkpointing.restore_items(
        str(on_disk.workdir), {item: target},
        step=None if step is None or int(step) == LATEST else chosen)
    params = out[item]
    return Loaded(config=config, variables={'params': params}, step=int(chosen), model=model,
                  diffusion=diffusion, workdir=str(on_disk.workdir))


# The schedule fields a guiding classifier must share with the diffusion model it guides.
CLASSIFIER_DIFFUSION_FIELDS = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end')


def load_classifier(config):
    """(grad_log_prob, num_classes) of the noisy classifier run in sampling.classifier_workdir:
    what samplers.batches.Sampler takes as `classifier` for sampling.classifier_scale > 0.

    The classifier run's own config.json says which network it is; its raw (not EMA)
    parameters are loaded, as guided-diffusion keeps no EMA for classifiers. It must have been
    trained on the same forward process (T, schedule, β endpoints) as the model it guides:
    its gradients are meaningful only at the noise levels it was trained on.
    """
    from diffusion_jax import guidance  # pylint: disable=import-outside-toplevel
    s = config.sampling
    workdir = s.classifier_workdir
    if not workdir or not Run(workdir).has_config():
        raise ValueError(f'sampling.classifier_scale={s.classifier_scale} needs '
                         'sampling.classifier_workdir: the workdir of a trained classifier run '
                         f'(with config.json); got {workdir!r}.')
    stored = Run(workdir).config
    for field in CLASSIFIER_DIFFUSION_FIELDS:
        mine, theirs = config.diffusion.get(field), stored.diffusion.get(field)
        if mine != theirs:
            raise ValueError(
                f'sampling.classifier_workdir={workdir!r} holds a classifier trained with '
                f'diffusion.{field}={theirs!r}, but this run has diffusion.{field}={mine!r}: '
                'train the classifier with the same diffusion section.')
    loaded = load(workdir, use_ema=False)
    return (guidance.classifier_grad_fn(loaded.model, loaded.variables),
            int(loaded.config.model.num_classes))


def classifier_for(config):
    """load_classifier(config) when config.sampling guides with a classifier, else None."""
    return load_classifier(config) if config.sampling.get('classifier_scale', 0.0) else None


# What a guide (autoguidance) must share with the run it guides: the process and how the
# network is called and read (the same x_in, t_in and output parameterisation, so the two outputs
# combine as the two denoisers would), the data's shape and the self-conditioning input.
GUIDE_FIELDS = ('diffusion.process', 'diffusion.num_timesteps', 'diffusion.beta_schedule',
                'diffusion.beta_start', 'diffusion.beta_end', 'diffusion.model_mean_type',
                'diffusion.flow.prediction', 'diffusion.flow.time_scale',
                'diffusion.edm.sigma_data', 'data.image_size', 'data.channels', 'model.data_dim',
                'training.self_condition')


def _field(config, path: str):
    node = config
    for key in path.split('.'):
        if not hasattr(node, 'get') or node.get(key) is None:
            return None
        node = node.get(key)
    return node


def load_guide(config, mesh=None) -> Loaded:
    """The weak model of autoguidance (Karras et al. 2024): the run in
    sampling.guidance_model_workdir at checkpoint sampling.guidance_model_step (-1: its latest),
    EMA parameters when sampling.use_ema. Either the paper's guide (a smaller and/or
    shorter-trained run, its own config.json and EMA) or an early checkpoint of this very run
    (the same workdir, an earlier step). Its GUIDE_FIELDS must equal this run's; its network and
    label conditioning may differ (a guide with model.num_classes=0 is called without labels)."""
    s = config.sampling
    workdir = s.get('guidance_model_workdir', '')
    if not workdir or not Run(workdir).has_config():
        raise ValueError(f'sampling.guidance_model_workdir={workdir!r} is not a run (no '
                         'config.json): give the workdir of a trained run of the same process '
                         "and data (or this run's own, with an early sampling.guidance_model_step).")
    stored = Run(workdir).config
    for path in GUIDE_FIELDS:
        mine, theirs = _plain(_field(config, path)), _plain(_field(stored, path))
        if path == 'training.self_condition':
            mine, theirs = bool(mine), bool(theirs)
        if mine != theirs:
            raise ValueError(f'sampling.guidance_model_workdir={workdir!r} holds a run with '
                             f'{path}={theirs!r}, but this run has {path}={mine!r}: the guide must '
                             'be a model of the same process and data; train it with the same '
                             f'{path.split(".")[0]} settings.')
    classes, guide_classes = (int(c.model.get('num_classes', 0) or 0) for c in (config, stored))
    if guide_classes and guide_classes != classes:
        raise ValueError(f'sampling.guidance_model_workdir={workdir!r} holds a model with '
                         f'model.num_classes={guide_classes}, this run has {classes}: a guide is '
                         'unconditional (0) or takes the same labels.')
    step = Run(workdir).checkpoint_step(s.get('guidance_model_step', LATEST),
                                        'sampling.guidance_model_step')
    return load(workdir, step=step, use_ema=s.get('use_ema', True), mesh=mesh)


def guide_for(config, mesh=None):
    """load_guide(config) when config.sampling autoguides (a guidance_model_workdir and
    guidance_scale > 0), else None."""
    s = config.sampling
    if s.get('guidance_model_workdir', '') and s.get('guidance_scale', 0.0):
        return load_guide(config, mesh)
    return None


def check_resume(workdir, config) -> None:
    """Refuses (ValueError, one line) to train config in a workdir whose config.json has other
    model/diffusion/data/optim/distill sections (but UNTRAINED_FIELDS). Other sections (training
    length, cadence, sampling, eval) may change. Reads only."""
    on_disk = Run(workdir)
    if not on_disk.has_config():
        return
    changed = section_differences(on_disk.config, config, RESUME_SECTIONS,
                                  skip=UNTRAINED_FIELDS)
    if changed:
        more = f' (and {len(changed) - 3} more)' if len(changed) > 3 else ''
        raise ValueError(
            f'{on_disk.config_path} was trained with other {"/".join(RESUME_SECTIONS)} settings: '
            f'{"; ".join(changed[:3])}{more}. Resuming would mix two runs; set them back, or '
            'train in a new --workdir.')


def write_config(workdir, config, resumed_step: int | None = None) -> None:
    """Writes config.json. An identical one is left alone; a different one (only the sections
    check_resume allows can differ) is kept as config_<resumed_step>.json first and the change
    logged, so config.json is never silently replaced. Process 0 only."""
    import jax  # pylint: disable=import-outside-toplevel
    from diffusion_jax import image_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
        return
    on_disk = Run(workdir)
    text = config.to_json(indent=2, sort_keys=True)
    if on_disk.has_config():
        old = on_disk.config_path.read_text()
        changed = section_differences(json.loads(old), json.loads(text),
                                      tuple(json.loads(text)) + tuple(json.loads(old)))
        if not changed:
            return
        stem = f'config_{resumed_step if resumed_step is not None else 0}'
        backup, k = on_disk.workdir / f'{stem}.json', 0
        while backup.exists():  # an earlier backup of the same step stays too
            k += 1
            backup = on_disk.workdir / f'{stem}.{k}.json'
        image_utils.atomic_write(str(backup), old.encode())
        logger.warning('config.json updated on resume (%s); the previous one is kept as %s',
                       '; '.join(changed), backup)
    on_disk.workdir.mkdir(parents=True, exist_ok=True)
    image_utils.atomic_write(str(on_disk.config_path), text.encode())


def create(workdir, config, params, *, ema_params=None) -> Run:
    """Makes a run from parameters trained elsewhere (converted weights, a notebook): writes
    config.json and a step-0 checkpoint of a full train state (Adam state initialised, the
    timestep sampler fresh), so the run samples, evaluates and fine-tunes like a trained one.

    params: the model's parameters, {'params': tree} or the tree itself, with the shapes of
    models.get_model(config.model); ema_params likewise (default: a copy of params). Refuses a
    workdir that already holds a config or a checkpoint.
    """
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp
    from diffusion_jax import checkpointing, models, train_state
    on_disk = Run(workdir)
    if on_disk.has_config() or checkpointing.latest_step(str(on_disk.workdir)) is not None:
        raise ValueError(f'{on_disk.workdir} already holds a run (config.json or checkpoints); '
                         'create writes a new run: choose an empty workdir.')
    config = config_validation.resolve(config, 'train')
    unwrap = lambda p: p['params'] if isinstance(p, Mapping) and set(p) == {'params'} else p
    params = unwrap(params)
    ema_params = jax.tree.map(jnp.copy, params) if ema_params is None else unwrap(ema_params)
    expected = models.param_shapes(models.get_model(config.model))['params']
    for name, tree in (('params', params), ('ema_params', ema_params)):
        problem = checkpointing.shape_mismatch(checkpointing.shape_table(tree),
                                               checkpointing.shape_table(expected), 'given')
        if problem:
            raise ValueError(f'create: {name} do not fit config.model: {problem}.')
    optimizer, _ = train_state.create_optimizer(config.optim)
    # A fresh state (every field training has, at step 0) with the given parameters put in.
    fresh = train_state.create_train_state(config, models.get_model(config.model), optimizer,
                                           jax.random.key(config.training.seed))
    state = fresh.replace(params=params, ema_params=ema_params, opt_state=optimizer.init(params))
    write_config(on_disk.workdir, config)
    ckpt = checkpointing.Checkpointer(str(on_disk.workdir), config.training.keep_checkpoints)
    try:
        ckpt.save(state)
    finally:
        ckpt.close()
    return on_disk
