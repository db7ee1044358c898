"""`--mode=edit`: edit real images with a trained run (the library is samplers.edit).

    python -m diffusion_jax.main --workdir=runs/digits --mode=edit \
        --config.edit.images=held_out.npz --config.edit.method=repaint --config.edit.mask=right_half
    ... --config.edit.method=sdedit --config.edit.strength=0.5
    ... --config.edit.method=ddim_edit --config.edit.target_label=3   (a class-conditional run)

Inputs: edit.images, an .npz with `images` (uint8 [N, H, W, C], the run's data shape, as our
sample files) and optionally `labels` (int [N]). The run's model and diffusion come from its
config.json; the checkpoint is sampling.checkpoint_step, the chain the diffusion respaced by
edit.num_steps, classifier-free guidance sampling.guidance_scale (edit.guidance_scale for
ddim_edit's decoder), classifier guidance sampling.classifier_scale/classifier_workdir.

Output (process 0): edits/<step>/edited.npz (`images` the results, `originals`, `masks` for
repaint (uint8, 1 = kept), `labels` the inputs' where known, `target_labels` for ddim_edit,
`reconstruction_error` for ddim_edit), edited.png (one row per input: original | masked input
(repaint) | result) and edit_config.json (the edit section, the step, the chain and, for
ddim_edit, the mean reconstruction error of the unchanged decode: the inversion's own error).
Every check (file, shapes, mask, strength, labels) runs before anything is computed or written.

Processes: a Gaussian run edits on its chain respaced by edit.num_steps; a flow or EDM run
(diffusion.process='flow'/'edm') on the process's grid of K = edit.num_steps (default
sampling.num_steps) steps (samplers/process_edit.py; edit.sdedit_method: 'ancestral' or one of
the process's solvers). A cold run is refused (it restores with --mode=sample).
Latent runs (data.latents): the images are encoded to the autoencoder's latent means (s·μ),
edited in latent space and decoded. RePaint's mask is downsampled to the latent grid by a min
over each f x f pixel block: a latent cell is kept only where all its pixels are kept (so every
latent touching the hole is generated); the kept pixels of the decoded output are then the
input's exactly (the pixel mask pastes them, as for a pixel run).
"""
from __future__ import annotations

import io
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import cold, image_utils, latents, processes, samplers, sharding
from diffusion_jax.defaults import default_edit_config  # noqa: F401  (the old name)
from diffusion_jax import guidance as guidance_lib
from diffusion_jax.respace import space_timesteps
from diffusion_jax.samplers.batches import self_conditioned

METHODS = ('repaint', 'sdedit', 'ddim_edit')
GRID_ROWS = 16


def _fail(field: str, value, why: str):
    raise ValueError(f'edit.{field}={value!r} {why}')


def _is_file(path) -> bool:
    """A file at a local path or a URI (gs://...)."""
    target = image_utils.as_path(path)
    return target.exists() and not target.is_dir()


def read_images(config) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W, C], labels int32 [N] or None) from edit.images, checked against
    the run's data shape and classes."""
    e, data = config.edit, config.data
    path = e.images
    if not path:
        _fail('images', path, 'is empty: give an .npz of `images` uint8 [N, H, W, C] '
              '(e.g. a samples.npz).')
    if not _is_file(path):
        _fail('images', path, 'is not a file: give an .npz of `images` uint8 [N, H, W, C].')
    with np.load(io.BytesIO(image_utils.read_bytes(path))) as f:
        if 'images' not in f:
            _fail('images', path, f'has no `images` array (it has {", ".join(f.files)}).')
        images, labels = f['images'], (f['labels'] if 'labels' in f else None)
    want = (int(data.image_size), int(data.image_size), int(data.channels))
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
        _fail('images', path, f'holds {images.dtype} {tuple(images.shape)}; this run needs uint8 '
              f'[N, {want[0]}, {want[1]}, {want[2]}] (data.image_size, data.channels).')
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        classes = int(data.get('num_classes', 0) or 0)
        if len(labels) != len(images) or (classes and (labels.min() < 0
                                                       or labels.max() >= classes)):
            _fail('images', path, f'has {len(labels)} labels for {len(images)} images (or labels '
                  f'outside [0, {classes})).')
    return images, labels


def read_masks(config, shape) -> np.ndarray:
    """Masks float32 [N, H, W, 1 or C] (1 = keep) from edit.mask for images of `shape`."""
    spec = config.edit.mask
    if not str(spec).endswith('.npz'):
        return samplers.make_mask(spec, shape, np.random.default_rng(config.edit.seed))
    if not _is_file(spec):
        _fail('mask', spec, 'is not a file: give a mask name or an .npz with `masks`.')
    with np.load(io.BytesIO(image_utils.read_bytes(spec))) as f:
        if 'masks' not in f:
            _fail('mask', spec, 'has no `masks` array.')
        masks = np.asarray(f['masks'], np.float32)
    if masks.ndim == 3:
        masks = masks[..., None]
    n, height, width, channels = shape
    if (masks.ndim != 4 or masks.shape[0] not in (1, n) or masks.shape[1:3] != (height, width)
            or masks.shape[3] not in (1, channels)):
        _fail('mask', spec, f'holds masks {tuple(masks.shape)}; the images are {tuple(shape)}: '
              f'give [N or 1, {height}, {width}(, 1 or {channels})].')
    if not np.all((masks == 0) | (masks == 1)):
        _fail('mask', spec, 'holds values other than 0 and 1 (1 = keep, 0 = generate).')
    return np.broadcast_to(masks, (n, height, width, masks.shape[3])).copy()


def check_edit(config) -> None:
    """The edit section against the run, in one line each (before anything is read)."""
    e, s = config.edit, config.sampling
    if e.method not in METHODS:
        _fail('method', e.method, f'is not an edit; choose one of {", ".join(METHODS)}.')
    if cold.is_cold(config.diffusion):
        _fail('method', e.method, "needs a Gaussian run; this one is diffusion.process='cold' "
              '(it restores degraded images with --mode=sample).')
    if e.batch_size <= 0:
        _fail('batch_size', e.batch_size, 'must be > 0.')
    if e.method == 'repaint' and (e.jump_length < 1 or e.jump_n_sample < 1):
        _fail('jump_length', e.jump_length, f'and edit.jump_n_sample={e.jump_n_sample} must be '
              '>= 1 (1 and 1: no resampling).')
    continuous = _continuous(config)
    if e.method == 'sdedit':
        samplers.sdedit_start(100, e.strength)  # raises on a strength outside (0, 1]
        if continuous is not None:
            samplers.process_edit.check_sdedit_method(continuous, e.sdedit_method)
        elif e.sdedit_method not in ('ancestral', 'ddim'):
            _fail('sdedit_method', e.sdedit_method, 'is not one of ancestral, ddim.')
    if continuous is not None:
        k = e.num_steps if e.num_steps not in ('', None, 0) else s.num_steps
        if isinstance(k, bool) or not str(k).isdigit() or int(k) < 1:
            _fail('num_steps', e.num_steps, f'must be an integer K >= 1 of the {continuous.name} '
                  "process's grid ('' = sampling.num_steps).")
    classes = int(config.model.get('num_classes', 0) or 0)
    if e.target_label >= 0 and not classes and not s.classifier_scale:
        _fail('target_label', e.target_label, 'needs a class-conditional run (model.num_classes '
              '> 0) or classifier guidance (sampling.classifier_scale > 0 with '
              'sampling.classifier_workdir); this run is unconditional: set -1.')
    limit = classes or (10**9)
    if e.target_label >= limit:
        _fail('target_label', e.target_label, f'is not a class in [0, {classes}).')
    if e.guidance_scale > 0 and not classes:
        _fail('guidance_scale', e.guidance_scale, 'needs a class-conditional run; set -1.')


def _continuous(config):
    """The run's continuous process ('flow', 'edm'), or None for a Gaussian (or cold) run."""
    if config.diffusion.get('process', 'gaussian') in ('gaussian', 'cold'):
        return None
    return processes.get_process(config.diffusion)


def _num_steps(config):
    """K of a continuous process's edit grid: edit.num_steps, default sampling.num_steps."""
    k = config.edit.num_steps
    return int(k if k not in ('', None, 0) else config.sampling.num_steps)


def _diffusion(config):
    """What the edit runs over: the Gaussian chain (respaced by edit.num_steps) or the run's
    continuous process (its grid has _num_steps(config) steps)."""
    from diffusion_jax.diffusion import create_diffusion  # pylint: disable=import-outside-toplevel
    continuous = _continuous(config)
    if continuous is not None:
        return continuous
    d = create_diffusion(config.diffusion)
    spec = config.edit.num_steps
    if spec in ('', None, 0):
        return d
    try:
        return d.respace(space_timesteps(d.num_timesteps, str(spec),
                                         alphas_cumprod=np.asarray(d.alphas_cumprod)))
    except (ValueError, KeyError) as err:
        raise ValueError(f'edit.num_steps={spec!r} is not a respacing of diffusion.num_timesteps='
                         f'{config.diffusion.num_timesteps}: {err}') from err


class _Models:
    """model_fn and classifier guidance of the run for given labels."""

    def __init__(self, config, model, variables):
        self.config, self.model, self.variables = config, model, variables
        self.classes = int(config.model.get('num_classes', 0) or 0)
        s = config.sampling
        self.grad_fn = None
        if s.classifier_scale:
            from diffusion_jax import run as run_lib  # pylint: disable=import-outside-toplevel
            clf = run_lib.load(s.classifier_workdir)
            self.grad_fn = guidance_lib.classifier_grad_fn(clf.model, clf.variables)

    def model_fn(self, y, scale):
        if self.classes and scale:
            return guidance_lib.classifier_free_model_fn(self.model.apply, self.variables, y,
                                                         scale, null_label=self.classes)
        return guidance_lib.bind_model(self.model.apply, self.variables,
                                       y if self.classes else None)

    def guidance(self, y):
        if self.grad_fn is None or y is None:
            return None
        return guidance_lib.classifier_guidance(self.grad_fn, y,
                                                self.config.sampling.classifier_scale)


def latent_mask(mask, latent_shape):
    """A pixel mask [N, H, W, 1 or C] (1 = keep) on the latent grid [N, h, w, 1]: the min over
    each (H/h) x (W/w) block, so a latent cell is kept only where all its pixels are."""
    n, height, width = mask.shape[:3]
    h, w = int(latent_shape[1]), int(latent_shape[2])
    fy, fx = height // h, width // w
    blocks = np.asarray(mask).min(axis=-1).reshape(n, h, fy, w, fx)
    return blocks.min(axis=(2, 4))[..., None].astype(np.float32)


def _edit_batch(config, models, diffusion, key, x, mask, y, y_target, mesh):
    """One batch: (edited [b, ...], reconstruction error [b] or None)."""
    e, s = config.edit, config.sampling
    w = s.guidance_scale
    steps = {} if _continuous(config) is None else {'num_steps': _num_steps(config)}
    clip = s.clip_denoised and not latents.is_latent(config)  # latents are not in [-1, 1]
    self_condition = self_conditioned(config)  # feed the previous step's x̂_0 (Chen et al.)
    if e.method == 'repaint':
        return samplers.repaint(diffusion, models.model_fn(y, w), key, x, mask,
                                jump_length=e.jump_length, jump_n_sample=e.jump_n_sample,
                                clip_denoised=clip, guidance=models.guidance(y),
                                mesh=mesh, self_condition=self_condition, **steps), None
    if e.method == 'sdedit':
        extra = {} if steps else {'eta': s.eta}
        return samplers.sdedit(diffusion, models.model_fn(y, w), key, x, e.strength,
                               method=e.sdedit_method, clip_denoised=clip,
                               guidance=models.guidance(y), mesh=mesh,
                               self_condition=self_condition, **steps, **extra), None
    scale = w if e.guidance_scale < 0 else e.guidance_scale
    changed = (y_target is not None and not np.array_equal(np.asarray(y_target), np.asarray(y))
               ) or scale != w
    out = samplers.ddim_edit(
        diffusion, models.model_fn(y, 0.0 if models.classes else w), x,
        edit_model_fn=models.model_fn(y_target, scale) if changed else None,
        edit_guidance=models.guidance(y_target) if changed else None,
        inversion=s.get('inversion', 'reference'), mesh=mesh, self_condition=self_condition,
        **steps)
    return out['edited'], out['reconstruction_error']


def run_edit(config, workdir: str) -> str:
    """`--mode=edit`: edits config.edit.images with the run in workdir; returns the output
    folder workdir/edits/<step>."""
    # pylint: disable=import-outside-toplevel
    from diffusion_jax import config_validation, models as models_lib, run as run_lib
    check_edit(config)
    images, labels = read_images(config)
    e = config.edit
    n = len(images)
    masks = read_masks(config, images.shape) if e.method == 'repaint' else None
    classes = int(config.model.get('num_classes', 0) or 0)
    if classes and labels is None and e.target_label < 0:
        _fail('images', e.images, 'has no `labels`, which a class-conditional run needs: add '
              'them or set edit.target_label.')
    diffusion = _diffusion(config)
    mesh = sharding.make_mesh()
    step = config.sampling.get('checkpoint_step', run_lib.LATEST)
    loaded = run_lib.load(workdir, config, step=step, use_ema=config.sampling.get('use_ema', True),
                          mesh=mesh)
    config = config_validation.resolve(loaded.config, 'edit')
    models = _Models(config, models_lib.get_model(config.model), loaded.variables)
    ae = latents.for_config(config, mesh)  # a latent run: edit the latents, decode the result
    encode = None if ae is None else latents.make_batch_encoder(ae, noise=False)
    decode = None if ae is None else latents.make_decoder(ae)
    y_all = labels if labels is not None else (
        np.full((n,), e.target_label, np.int32) if e.target_label >= 0 else None)
    y_target = (np.full((n,), e.target_label, np.int32) if e.target_label >= 0 else y_all)
    if e.method != 'ddim_edit':
        y_all = y_target  # repaint / sdedit generate with the target class where one is given
    batch = int(e.batch_size)
    x_all = image_utils.from_uint8(images)
    key = jax.random.key(int(e.seed))
    outs, errs = [], []
    for i in range(math.ceil(n / batch)):
        idx = np.resize(np.arange(i * batch, min((i + 1) * batch, n)), batch)
        pick = lambda a: None if a is None else jnp.asarray(a[idx])  # noqa: E731
        x, m = jnp.asarray(x_all[idx]), pick(masks)
        if encode is not None:
            x = encode({'image': x}, None)['image']
            m = None if m is None else jnp.asarray(latent_mask(np.asarray(m), x.shape))
        out, err = _edit_batch(config, models, diffusion, jax.random.fold_in(key, i), x, m,
                               pick(y_all), pick(y_target),
                               mesh if batch % mesh.devices.size == 0 else None)
        if decode is not None:  # the reconstruction error stays the latent inversion's
            out = decode(out)
        keep = min(batch, n - i * batch)
        outs.append(np.asarray(sharding.to_host(out))[:keep])
        if err is not None:
            errs.append(np.asarray(sharding.to_host(err))[:keep])
        logging.info('edited %d/%d', min((i + 1) * batch, n), n)
    edited = image_utils.to_uint8(np.concatenate(outs))
    if masks is not None:  # the kept pixels are the input's, exactly (also after rounding)
        keep_px = np.broadcast_to(masks, images.shape) == 1
        edited = np.where(keep_px, images, edited)
    folder = os.path.join(workdir, 'edits', str(loaded.step))
    _write(folder, config, loaded.step, diffusion, images, edited, masks, labels, y_target,
           np.concatenate(errs) if errs else None)
    return folder


def _write(folder, config, step, diffusion, images, edited, masks, labels, y_target, errors):
    if jax.process_index() != 0:
        return
    e = config.edit
    arrays = dict(images=edited, originals=images)
    columns = [images]
    if masks is not None:
        arrays['masks'] = masks.astype(np.uint8)
        grey = np.full_like(images, 128)
        columns.append(np.where(np.broadcast_to(masks, images.shape) == 1, images, grey))
    columns.append(edited)
    if labels is not None:
        arrays['labels'] = labels
    if e.method == 'ddim_edit':
        if y_target is not None:
            arrays['target_labels'] = y_target
        arrays['reconstruction_error'] = errors
    image_utils.save_npz(os.path.join(folder, 'edited.npz'), **arrays)
    rows = min(len(images), GRID_ROWS)
    grid = np.stack([c[:rows] for c in columns], axis=1).reshape((-1,) + images.shape[1:])
    image_utils.save_grid(os.path.join(folder, 'edited.png'), grid, ncols=len(columns))
    steps = (_num_steps(config) if _continuous(config) is not None
             else int(diffusion.num_timesteps))
    written = dict(e.to_dict(), step=int(step), edit_timesteps=steps,
                   latent=latents.is_latent(config),
                   sampling=config.sampling.to_dict(), diffusion=config.diffusion.to_dict())
    if errors is not None:
        written['reconstruction_rms_mean'] = float(np.mean(errors))
    image_utils.write_json(os.path.join(folder, 'edit_config.json'), written)
