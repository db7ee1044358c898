"""A training run on disk, as one object: its stored config, its checkpoints, and the model,
diffusion and parameters rebuilt from them. Training (resume), `--mode=sample`, `--mode=eval`,
the converters and the notebooks all go through here.

    from diffusion_jax import run
    loaded = run.load('runs/digits', {'sampling.num_steps': 'ddim50'})   # EMA params, latest step
    loaded.config, loaded.variables, loaded.step, loaded.model, loaded.diffusion
    run.create('runs/converted', config, params)    # a run made outside the train loop

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
the user typed.

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

CONFIG_FILE = 'config.json'
TRAINED_SECTIONS = ('model', 'diffusion', 'data')  # fixed by the trained network
RESUME_SECTIONS = TRAINED_SECTIONS + ('optim',)  # a resumed run must also keep its optimiser
MODE_SECTIONS = ('sampling', 'eval', 'edit')  # what --mode=sample / eval / edit may change
TRAINED_FIELDS = ('training.label_dropout',)  # outside TRAINED_SECTIONS, fixed by training too
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


def section_differences(old: Mapping, new: Mapping, sections) -> list[str]:
    """'section.field: A -> B' for every field of `sections` that differs between two configs."""
    old, new = _flat(_plain(old)), _flat(_plain(new))
    out = []
    for name in sorted(set(old) | set(new)):
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
    from diffusion_jax import edit, generate  # pylint: disable=import-outside-toplevel
    from diffusion_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
    config = ml_collections.ConfigDict(config.to_dict())
    for name, defaults in (('sampling', generate.default_sampling_config()),
                           ('eval', evaluate.default_eval_config()),
                           ('edit', edit.default_edit_config())):
        section = config.get(name) or ml_collections.ConfigDict()
        for key, value in defaults.items():
            if key not in section:
                section[key] = value
        config[name] = section
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
    merged = with_mode_defaults(stored).to_dict()
    for path, value in typed.items():  # refused before anything else is looked at
        _set_typed(merged, path, value)
    if config is not None:
        given = _plain(config)
        changed = [c for c in section_differences(stored, given, TRAINED_SECTIONS)
                   if c.split(':', 1)[0] not in typed]
        if changed:
            logger.info('using the stored %s (the given config differs: %s)',
                        '/'.join(TRAINED_SECTIONS), '; '.join(changed[:5]))
        for name in MODE_SECTIONS:
            if name in given:
                merged[name] = given[name]
        for path, value in typed.items():  # the typed value wins over the given config's
            _set_typed(merged, path, value)
    return ml_collections.ConfigDict(merged)


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
    trained = keys[0] in TRAINED_SECTIONS or path in TRAINED_FIELDS
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
    # pylint: disable=import-outside-toplevel
    import jax
    from diffusion_jax import checkpointing, cold, models, sharding
    on_disk = Run(workdir)
    stored = on_disk.config
    if overrides is None or isinstance(overrides, ml_collections.ConfigDict):
        config = merge_config(stored, overrides)
    else:
        config = merge_config(stored, typed=overrides)
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


def _shape_mismatch(expected, params) -> str | None:
    """The first parameter whose shape differs between two pytrees, as text (None if none)."""
    import jax  # pylint: disable=import-outside-toplevel
    def shapes(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}
    want, got = shapes(expected), shapes(params)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            return (f'parameter {name} is {got.get(name, "absent")} and the model needs '
                    f'{want.get(name, "absent")}')
    return None


def check_resume(workdir, config) -> None:
    """Refuses (ValueError, one line) to train config in a workdir whose config.json has other
    model/diffusion/data/optim sections. Other sections (training length, cadence, sampling,
    eval) may change. Reads only."""
    on_disk = Run(workdir)
    if not on_disk.has_config():
        return
    changed = section_differences(on_disk.config, config, RESUME_SECTIONS)
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
    from diffusion_jax import checkpointing, config_validation, models, train
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
        problem = _shape_mismatch(expected, tree)
        if problem:
            raise ValueError(f'create: {name} do not fit config.model: {problem}.')
    optimizer, _ = train.create_optimizer(config.optim)
    # A fresh state (every field training has, at step 0) with the given parameters put in.
    fresh = train.create_train_state(config, models.get_model(config.model), optimizer,
                                     jax.random.key(config.training.seed))
    state = fresh.replace(params=params, ema_params=ema_params, opt_state=optimizer.init(params))
    write_config(on_disk.workdir, config)
    ckpt = checkpointing.Checkpointer(str(on_disk.workdir), config.training.keep_checkpoints)
    try:
        ckpt.save(state)
    finally:
        ckpt.close()
    return on_disk
