"""Checkpoints of a training run, through orbax's CheckpointManager, in one place.

Layout: <workdir>/checkpoints/<step>/{params, ema_params, opt_state, extra}/, one orbax item
each, so inference restores the (EMA) parameters alone without the optimiser state. `extra` holds
the step, the timestep sampler's state and the non-finite-step count. Saves are asynchronous
(`save` returns once the arrays are copied off the devices); `wait()` blocks until the step is
committed. Training waits at each checkpoint, so that a crash never loses more than one
checkpoint interval.

Damaged checkpoints. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to
`<step>` after writing `commit_success.txt` into it, so a step folder is trusted only when it has
that marker, its `_CHECKPOINT_METADATA` and, for every item, a readable `_METADATA`, a non-empty
`manifest.ocdbt` and the item's own marker (`valid_steps`). Orbax before 0.12.3 wrote no marker
for local checkpoints (the rename was the commit): a step with no marker anywhere whose
`_CHECKPOINT_METADATA` holds a commit timestamp is that legacy layout, and trusted. A step that passes these checks but
whose arrays cannot be read (a truncated data file) is found when it is restored: `restore_items`
and `Checkpointer.restore` then fall back to the next older step. Either way a warning names the
step and why. Only that proof counts (`damage()`, or a read of the step's files that found one
missing, short or corrupt: `read_damage`); any other restore error (a structure mismatch, out of
memory, a transient or permission error of the storage) raises RestoreError naming the step and
the cause, and nothing moves. Several processes agree first: each restore's outcome is
all-gathered, one process's failure stops all of them, and process 0 decides which steps are
damaged and moves them after every process has read. Readers never change the folder. The writer (`Checkpointer`, i.e. training) moves a
damaged step, unaltered, to `<workdir>/checkpoints_damaged/<step>[.k]` before orbax sees it: left
in place, orbax would list it as the latest step, count it for retention, and refuse (or have to
overwrite) the next save of that step number. Names in checkpoints/ that are not step numbers
(foreign files, orbax's temporary folders) are ignored.

Nothing here writes until `Checkpointer` is built: `valid_steps`, `latest_step` and
`check_compatible` only read, so a refused run leaves the workdir as it found it. Paths go
through etils.epath, so a workdir may be a `gs://` URI.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import logging_utils

logger = logging_utils.logger.getChild('checkpointing')

ITEMS = ('params', 'ema_params', 'opt_state', 'extra')
COMMIT_MARKER = 'commit_success.txt'  # orbax writes it last, before the rename (atomicity.py)
STEP_METADATA = '_CHECKPOINT_METADATA'
DAMAGED_DIR = 'checkpoints_damaged'


class SaveError(OSError):
    """A checkpoint could not be written; the message names the path and the intact step."""


class RestoreError(OSError):
    """A checkpoint could not be restored for a reason that does not show it damaged (a
    structure mismatch, out of memory, a transient storage error): the message names the step
    and the cause, and nothing was moved."""


# Status codes (absl's, which tensorstore prefixes to its errors) that say nothing about the
# stored bytes: retrying, freeing memory or fixing permissions may succeed on the same step.
_NOT_DAMAGE_CODES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED',
                     'CANCELLED', 'PERMISSION_DENIED', 'UNAUTHENTICATED', 'INTERNAL', 'UNKNOWN')
# A read of the step's own files that found them missing, short or corrupt.
_DAMAGE_CODES = ('DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND')
_CORRUPTION = ('data corruption', 'checksum', 'truncated', 'error decoding')


def _path(workdir) -> epath.Path:
    path = epath.Path(workdir)
    return path if '://' in str(workdir) else epath.Path(os.path.abspath(str(workdir)))


def checkpoint_dir(workdir) -> str:
    return str(_path(workdir) / 'checkpoints')


def _steps_on_disk(workdir) -> list[int]:
    """Every folder under checkpoints/ named by a step number, damaged or not."""
    folder = epath.Path(checkpoint_dir(workdir))
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def _json_problem(path: epath.Path) -> str | None:
    if not path.exists():
        return f'{path.name} is missing'
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f'{path.name} is not valid JSON ({err})'
    return None


def damage(step_dir, items=ITEMS) -> str | None:
    """Why the step folder cannot be trusted (None if its structure is complete); reads only."""
    step_dir = epath.Path(step_dir)
    legacy = _legacy_layout(step_dir, items)
    if not legacy and not (step_dir / COMMIT_MARKER).exists():
        return f'no commit marker ({COMMIT_MARKER}): the save did not finish'
    problem = _json_problem(step_dir / STEP_METADATA)
    if problem:
        return problem
    for item in items:
        folder = step_dir / item
        if not folder.is_dir():
            return f'item {item!r} is missing'
        problem = _json_problem(folder / '_METADATA')
        if problem:
            return f'{item}/{problem}'
        manifest = folder / 'manifest.ocdbt'
        if not manifest.exists() or manifest.stat().length == 0:
            return f'{item}/manifest.ocdbt is missing or empty'
        if not legacy and not (folder / COMMIT_MARKER).exists():
            return f'{item}/{COMMIT_MARKER} is missing'
    return None


def _legacy_layout(step_dir: epath.Path, items) -> bool:
    """Whether step_dir is a local checkpoint finalized the way orbax before 0.12.3 did it: by
    renaming `<step>.orbax-checkpoint-tmp-*` to `<step>` after writing commit_timestamp_nsecs
    into _CHECKPOINT_METADATA, with no commit marker anywhere. A marker on any item means the
    step was written by a newer orbax, whose step marker then must be there too."""
    if (step_dir / COMMIT_MARKER).exists() or any(
            (step_dir / item / COMMIT_MARKER).exists() for item in items):
        return False
    try:
        meta = json.loads((step_dir / STEP_METADATA).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and bool(meta.get('commit_timestamp_nsecs'))


def read_damage(err: BaseException) -> str | None:
    """Why `err`, raised while restoring a step, proves that step's stored arrays damaged (a
    tensorstore read of its files that found one missing, truncated or failing its checksum or
    decompression), as one line; None when it proves nothing about the files (a structure or
    shape mismatch, out of memory, a transient or permission error of the storage)."""
    chain = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    texts = [str(e).strip() for e in chain]
    if any(isinstance(e, MemoryError) for e in chain) or any(
            t.split(':', 1)[0] in _NOT_DAMAGE_CODES for t in texts):
        return None
    for e, text in zip(chain, texts):
        low = text.lower()
        if ('error reading' in low or 'error decoding' in low) and (
                text.split(':', 1)[0] in _DAMAGE_CODES or any(w in low for w in _CORRUPTION)):
            return _first_line(e)
    return None


def _agree(code: int) -> list[int]:
    """Every process's code for the same decision (an all-gather, so also a barrier): what a
    restore found, 0 = read, 1 = damaged, 2 = failed otherwise. [code] in a single process."""
    if jax.process_count() == 1:
        return [code]
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return [int(c) for c in multihost_utils.process_allgather(np.asarray(code, np.int32))]


def _broadcast_steps(steps: list[int]) -> list[int]:
    """Process 0's list of step numbers on every process."""
    if jax.process_count() == 1:
        return list(steps)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    count = int(multihost_utils.broadcast_one_to_all(np.asarray(len(steps), np.int32)))
    if count == 0:
        return []
    mine = np.asarray(steps if jax.process_index() == 0 else [0] * count, np.int32)
    return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _restore_failed(workdir, step: int, codes: list[int], err: BaseException | None):
    """The RestoreError of a restore of `step` that failed, not by damage, on some process."""
    if err is not None and codes[jax.process_index()] == 2:
        cause = _first_line(err)
    else:
        cause = (f'process {codes.index(2)} failed (its log names the cause)' if 2 in codes
                 else _first_line(err))
    return RestoreError(
        f'could not restore checkpoint step {step} from {checkpoint_dir(workdir)}: {cause}. '
        'The checkpoint is kept; fix the cause (free memory, retry the storage, or match the '
        "run's config) and rerun.")


def damaged_steps(workdir, items=ITEMS) -> dict[int, str]:
    """{step: reason} for every step folder whose structure is incomplete; reads only."""
    folder = epath.Path(checkpoint_dir(workdir))
    out = {}
    for step in _steps_on_disk(workdir):
        problem = damage(folder / str(step), items)
        if problem:
            out[step] = problem
    return out


def valid_steps(workdir, items=ITEMS) -> list[int]:
    """Steps whose checkpoint folder is complete, oldest first; warns about each damaged one
    (naming the step and why) and skips it. Reads only. `items` narrows the check to what the
    caller restores (inference needs only 'params' or 'ema_params')."""
    bad = damaged_steps(workdir, items)
    for step, why in bad.items():
        logger.warning('skipping damaged checkpoint step %d in %s: %s', step,
                       checkpoint_dir(workdir), why)
    return [s for s in _steps_on_disk(workdir) if s not in bad]


def latest_step(workdir, items=ITEMS) -> int | None:
    """The newest valid checkpoint's step (see valid_steps), or None; reads only."""
    steps = valid_steps(workdir, items)
    return steps[-1] if steps else None


def _quarantine(workdir, step: int, why: str) -> None:
    """Moves a damaged step folder, unaltered, out of orbax's sight (process 0 only)."""
    if jax.process_index() != 0:
        return
    source = epath.Path(checkpoint_dir(workdir)) / str(step)
    target_dir = _path(workdir) / DAMAGED_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target, k = target_dir / str(step), 0
    while target.exists():
        k += 1
        target = target_dir / f'{step}.{k}'
    source.rename(target)
    logger.warning('checkpoint step %d is damaged (%s): moved unaltered to %s', step, why,
                   target)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


def _manager(workdir, keep: int | None = None, read_only: bool = False,
             items=ITEMS, preserve=()) -> ocp.CheckpointManager:
    policy = ocp.checkpoint_managers.LatestN(keep) if keep else None
    if policy is not None and preserve:  # the latest `keep` and every step of `preserve`
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [policy, ocp.checkpoint_managers.CustomSteps(list(preserve))])
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only, preservation_policy=policy)
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def restore_items(workdir, targets: dict[str, Any], step: int | None = None):
    """({item: restored pytree}, step) from the newest valid step (or exactly `step`).

    targets maps item names ('params', 'ema_params', ...) to abstract pytrees
    (ShapeDtypeStructs with shardings). A step whose arrays are proven damaged (read_damage)
    is skipped with a warning and the next older one is tried; any other failure raises
    RestoreError naming the step and the cause. Reads only. Raises FileNotFoundError naming
    the checkpoint folder when no step can be restored.
    """
    items = tuple(targets)
    steps = [step] if step is not None else valid_steps(workdir, items)[::-1]
    manager = _manager(workdir, read_only=True, items=items)
    errors = []
    try:
        for s in steps:
            out, error = None, None
            try:
                out = manager.restore(s, args=ocp.args.Composite(
                    **{k: ocp.args.StandardRestore(v) for k, v in targets.items()}))
            except Exception as err:  # pylint: disable=broad-except  (sorted out below)
                if step is not None:
                    raise
                error = err
            codes = _agree(0 if error is None else 1 if read_damage(error) else 2)
            if max(codes) == 0:
                logger.info('restored %s of checkpoint step %d from %s', '/'.join(items), s,
                            checkpoint_dir(workdir))
                return dict(out), int(s)
            if max(codes) == 2:
                raise _restore_failed(workdir, s, codes, error) from error
            errors.append(f'step {s}: {read_damage(error) if error else "damaged elsewhere"}')
            logger.warning('skipping unreadable checkpoint step %d in %s: %s', s,
                           checkpoint_dir(workdir), errors[-1])
    finally:
        manager.close()
    raise FileNotFoundError(f'no readable checkpoint in {checkpoint_dir(workdir)!r}'
                            + (f' ({"; ".join(errors)})' if errors else ''))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0] if text else ""}'[:300]


def _abstract(tree):
    """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        tree)


def _stored_shapes(manager, step: int, item: str) -> dict[str, tuple]:
    meta = manager.item_metadata(step)[item]
    return shape_table(getattr(meta, 'tree', meta))


def shape_table(tree) -> dict[str, tuple]:
    """{'path': shape} of every leaf with a shape (arrays, ShapeDtypeStructs, orbax metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def shape_mismatch(given: dict, expected: dict, where: str = 'in the checkpoint') -> str | None:
    """The first parameter whose shape differs between two shape_tables, as text (None if
    none): `where` names the given side."""
    for name in sorted(set(given) | set(expected)):
        if given.get(name) != expected.get(name):
            return (f'parameter {name} is {given.get(name, "absent")} {where} and '
                    f'{expected.get(name, "absent")} in this model')
    return None


def check_compatible(workdir, abstract_params) -> int | None:
    """Raises if the workdir's latest checkpoint holds parameters of other shapes than
    `abstract_params` (a pytree of arrays or ShapeDtypeStructs); returns its step (or None).
    Reads only. (Which config a run was trained with is diffusion_jax.run's business.)
    """
    steps = valid_steps(workdir)
    if not steps:
        return None
    manager = _manager(workdir, read_only=True)
    try:
        for step in steps[::-1]:  # a step whose arrays cannot be read is restore's to skip
            try:
                stored = _stored_shapes(manager, step, 'params')
                break
            except Exception as err:  # pylint: disable=broad-except  (any read failure)
                logger.warning('skipping unreadable checkpoint step %d in %s: %s', step,
                               checkpoint_dir(workdir), _first_line(err))
        else:
            return steps[-1]
        problem = shape_mismatch(stored, shape_table(abstract_params))
    finally:
        manager.close()
    if problem:
        raise ValueError(
            f'workdir {str(workdir)!r} holds a checkpoint (step {step}) of a different model: '
            f'{problem}. Use a new --workdir, or set the model config back to match it.')
    return step


class Checkpointer:
    """Async saves of a TrainState-like object with fields params, ema_params, opt_state, step,
    sampler_state, skipped; keeps the latest `keep` checkpoints, and every step of `preserve`
    (a progressive distillation's round ends).

    Building it moves damaged step folders aside (module docstring), so orbax's manager never
    lists them. A save that fails (unwritable or vanished workdir, full disk, a write that
    raises) raises SaveError naming the path and the last intact step; that step is untouched.
    """

    def __init__(self, workdir, keep: int, preserve=()):
        self.workdir = workdir
        # Process 0 decides (each process could see the folder at another moment) and every
        # process has finished reading it before anything moves.
        damaged = damaged_steps(workdir) if jax.process_index() == 0 else {}
        steps = _broadcast_steps(sorted(damaged))
        _sync('checkpointing:before-quarantine')
        for step in steps:
            _quarantine(workdir, step, damaged.get(step, ''))
        _sync('checkpointing:quarantine')
        self.manager = _manager(workdir, keep=keep, preserve=preserve)
        self.last_good = self.manager.latest_step()  # newest step known to be committed
        self._pending = None  # the step of an async save not yet known to be committed
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _fail(self, step: int, err: Exception) -> SaveError:
        self._failed = True
        kept = (f'step {self.last_good} in {checkpoint_dir(self.workdir)} is intact'
                if self.last_good is not None else 'no earlier checkpoint exists')
        return SaveError(
            f'could not write the checkpoint of step {step} to '
            f'{checkpoint_dir(self.workdir)}/{step} ({_first_line(err)}); {kept}. Free disk '
            "space or fix the workdir's permissions and rerun the same command to resume.")

    def save(self, state) -> None:
        """Starts an async save at int(state.step); returns once the arrays are copied. The
        previous save is waited for first (long finished, at any sensible checkpoint
        interval), so that a failure is reported with the step it belongs to."""
        self.wait()
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            **{k: ocp.args.StandardSave(v) for k, v in _items(state).items()})
        self._started = time.monotonic()
        try:
            self.manager.save(step, args=args)
        except Exception as err:  # pylint: disable=broad-except  (any storage failure)
            raise self._fail(step, err) from err
        self._pending = step

    def restore(self, state, step: int | None = None):
        """The newest readable checkpoint (or exactly `step`) in the shapes and shardings of
        `state`; None if there is none. A newest step whose arrays are proven damaged on any
        process (read_damage) is moved aside with a warning and the next older one is tried;
        any other failure raises RestoreError on every process, nothing moved."""
        target = _abstract(_items(state))
        while True:
            chosen = self.manager.latest_step() if step is None else step
            if chosen is None:
                return None
            out, error, absent = None, None, ()
            try:
                absent = self._absent_extra(chosen, target['extra'])
                restore = dict(target, extra={k: v for k, v in target['extra'].items()
                                              if k not in absent})
                out = self.manager.restore(chosen, args=ocp.args.Composite(
                    **{k: ocp.args.StandardRestore(v) for k, v in restore.items()}))
            except Exception as err:  # pylint: disable=broad-except  (sorted out below)
                if step is not None:
                    raise
                error = err
            why = read_damage(error) if error is not None else None
            # Gathered after every process's read: also the barrier before process 0 moves.
            codes = _agree(0 if error is None else 1 if why else 2)
            if max(codes) == 0:
                break
            if max(codes) == 2:
                raise _restore_failed(self.workdir, chosen, codes, error) from error
            _quarantine(self.workdir, chosen, 'its arrays cannot be read: '
                        + (why or f'on process {codes.index(1)}'))
            _sync(f'checkpointing:quarantine:{chosen}')
            self.manager.reload()
        self.last_good = chosen
        extra = dict(out['extra'], **{k: _zeros(target['extra'][k]) for k in absent})
        if absent:
            logger.info('checkpoint step %d predates train-state field(s) %s: restored with '
                        'their defaults (0)', chosen, ', '.join(absent))
        return state.replace(params=out['params'], ema_params=out['ema_params'],
                             opt_state=out['opt_state'], step=extra['step'],
                             sampler_state=extra['sampler'], skipped=extra['skipped'])

    def _absent_extra(self, step: int, target_extra: dict) -> tuple[str, ...]:
        """The fields of EXTRA_DEFAULTS the checkpoint's `extra` item lacks (a step written
        before they existed); any other difference is left to the restore to report."""
        meta = self.manager.item_metadata(step)['extra']
        stored = set(getattr(meta, 'tree', meta) or ())
        return tuple(k for k in EXTRA_DEFAULTS if k in target_extra and k not in stored)

    def wait(self) -> None:
        """Blocks until the last save is on disk; raises SaveError if it failed."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # pylint: disable=broad-except  (any storage failure)
            raise self._fail(self._pending, err) from err
        if self._pending is not None:
            # The one line per save (orbax's own dozens show at --verbosity=1 only).
            logger.info('saved checkpoint step %d to %s (%.1fs)', self._pending,
                        checkpoint_dir(self.workdir), time.monotonic() - self._started)
            self.last_good, self._pending = self._pending, None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # pylint: disable=broad-except  (already reported by wait)
                if not self._failed:
                    raise


# Train-state fields added since the first release, restored as zeros where a checkpoint
# predates them: `skipped`, the count of non-finite steps skipped (none were, before it existed).
EXTRA_DEFAULTS = ('skipped',)


def _zeros(spec):
    """Zeros of a ShapeDtypeStruct's shape and dtype, on its sharding (every process)."""
    value = np.zeros(spec.shape, spec.dtype)
    if spec.sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(spec.shape, spec.sharding, lambda index: value[index])


def _items(state) -> dict[str, Any]:
    return dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
                extra=dict(step=state.step, sampler=state.sampler_state, skipped=state.skipped))
