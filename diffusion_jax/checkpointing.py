"""Checkpoints of a training run, through orbax's CheckpointManager, in one place.

Layout: <workdir>/checkpoints/<step>/{params, ema_params, opt_state, extra}/, one orbax item
each, so inference restores the (EMA) parameters alone without the optimiser state. `extra` holds
the step and the timestep sampler's state. Saves are asynchronous (training continues while the
arrays are written); `wait()` before reading the files or exiting.

Nothing here writes until `Checkpointer` is built: `latest_step` and `check_compatible` only read,
so a refused run leaves the workdir as it found it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ('params', 'ema_params', 'opt_state', 'extra')
CONFIG_FILE = 'config.json'


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def _steps_on_disk(workdir: str) -> list[int]:
    folder = checkpoint_dir(workdir)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder)
                  if name.isdigit() and os.path.isdir(os.path.join(folder, name)))


def _manager(workdir: str, keep: int | None = None, read_only: bool = False,
             items=ITEMS) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None)
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint's step, or None; reads only. (Orbax writes into a
    temporary folder and renames it to <step> when complete, so a bare number is complete.)"""
    steps = _steps_on_disk(workdir)
    return steps[-1] if steps else None


def _abstract(tree):
    """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        tree)


def _stored_shapes(manager, step: int, item: str) -> dict[str, tuple]:
    meta = manager.item_metadata(step)[item]
    tree = getattr(meta, 'tree', meta)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def _shape_mismatch(stored: dict, expected_params) -> str | None:
    """First difference between stored and expected parameter shapes, as text."""
    flat = jax.tree_util.tree_flatten_with_path(expected_params)[0]
    expected = {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}
    for name in sorted(set(stored) | set(expected)):
        if stored.get(name) != expected.get(name):
            return (f'parameter {name} is {stored.get(name, "absent")} in the checkpoint and '
                    f'{expected.get(name, "absent")} in this model')
    return None


def _config_mismatch(workdir: str, config) -> str | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding='utf-8') as f:
        stored = json.load(f)
    for section in ('model',):
        old, new = stored.get(section, {}), json.loads(config[section].to_json())
        for field in sorted(set(old) | set(new)):
            if old.get(field) != new.get(field):
                return (f'{section}.{field} is {old.get(field)!r} in {path} and '
                        f'{new.get(field)!r} now')
    return None


def check_compatible(workdir: str, config, abstract_params) -> int | None:
    """Raises if the workdir's checkpoint holds a different model; returns its step (or None).

    Compares the stored config.json model section and the stored parameter shapes with
    `abstract_params` (a pytree of arrays or ShapeDtypeStructs). Reads only.
    """
    step = latest_step(workdir)
    if step is None:
        return None
    problem = _config_mismatch(workdir, config)
    if problem is None:
        manager = _manager(workdir, read_only=True)
        try:
            problem = _shape_mismatch(_stored_shapes(manager, step, 'params'), abstract_params)
        finally:
            manager.close()
    if problem:
        raise ValueError(
            f'workdir {workdir!r} holds a checkpoint (step {step}) of a different model: '
            f'{problem}. Use a new --workdir, or set the model config back to match it.')
    return step


class Checkpointer:
    """Async saves of a TrainState-like object with fields params, ema_params, opt_state, step,
    sampler_state; keeps the latest `keep` checkpoints."""

    def __init__(self, workdir: str, keep: int):
        self.manager = _manager(workdir, keep=keep)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state) -> None:
        """Starts an async save at int(state.step); returns once the arrays are copied."""
        items = _items(state)
        args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
        self.manager.save(int(jax.device_get(state.step)), args=args)

    def restore(self, state, step: int | None = None):
        """The checkpoint at `step` (default: latest) in the shapes and shardings of `state`."""
        step = self.manager.latest_step() if step is None else step
        target = _abstract(_items(state))
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in target.items()})
        out = self.manager.restore(step, args=args)
        return state.replace(params=out['params'], ema_params=out['ema_params'],
                             opt_state=out['opt_state'], step=out['extra']['step'],
                             sampler_state=out['extra']['sampler'])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _items(state) -> dict[str, Any]:
    return dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                extra=dict(step=state.step, sampler=state.sampler_state))


def load_params_for_inference(config, workdir: str, use_ema: bool = True):
    """(params, step) of the latest checkpoint in workdir: the EMA parameters by default.

    params is the model's {'params': ...} variables dict, replicated over every device
    (sharding.make_mesh()), ready for model.apply. Raises FileNotFoundError naming the workdir
    when there is no checkpoint and ValueError when it holds a different model than
    config.model.
    """
    from diffusion_jax import models, sharding  # pylint: disable=import-outside-toplevel
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(
            f'no checkpoint in {checkpoint_dir(workdir)!r}: train first '
            f'(python -m diffusion_jax.main --config=... --workdir={workdir}) or pass the '
            'workdir of a trained run.')
    abstract = models.param_shapes(models.get_model(config.model))['params']
    check_compatible(workdir, config, abstract)
    replicated = sharding.replicated(sharding.make_mesh())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          abstract)
    item = 'ema_params' if use_ema else 'params'
    manager = _manager(workdir, read_only=True, items=(item,))
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(target)}))
    finally:
        manager.close()
    return {'params': out[item]}, int(step)


def stored_config(workdir: str) -> dict | None:
    """The config.json a run wrote into workdir, as a dict (None if there is none)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)

