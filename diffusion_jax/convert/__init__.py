"""Import published PyTorch diffusion checkpoints into this codebase's networks.

    python -m diffusion_jax.convert --from=guided-diffusion --preset=64x64_diffusion \
        --src=64x64_diffusion.pt --workdir=runs/64x64_diffusion

    config, params = load_torch_checkpoint('cifar10_uncond_50M_500K.pt', 'improved-diffusion',
                                           'cifar10_uncond_50M_500K')
    models.get_model(config.model).apply({'params': params}, x_nhwc, t, y)

Sources: 'improved-diffusion' and 'guided-diffusion' (OpenAI's UNetModel / EncoderUNetModel
.pt state dicts), 'diffusers' (UNet2DModel, or AutoencoderKL for the sd_vae preset: a .safetensors / .bin file
or a model folder) and
'dit' (facebookresearch/DiT's released .pt; its frozen pos_embed is checked against our fixed
sin-cos table and not stored).
Presets (configs/pretrained.py) fix the network, the diffusion and the sampling defaults of each
published model. Every tensor is matched through an explicit name table (tables.py); any
missing key, unexpected key or shape mismatch raises one ValueError with one line per problem.
float16 / bfloat16 tensors are cast to float32. torch and safetensors are imported lazily.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any, Mapping

import numpy as np

from diffusion_jax.convert import tables

SOURCES = ('improved-diffusion', 'guided-diffusion', 'diffusers', 'dit')
# Files a diffusers model folder may hold, in the order diffusers prefers them.
DIFFUSERS_WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
# A source constant (DiT's frozen pos_embed) may differ from ours by float32 rounding only.
CONSTANT_ATOL = 1e-5
# Problems listed in full before the message is cut (a wrong file would list hundreds).
MAX_LISTED_PROBLEMS = 40

__all__ = ['SOURCES', 'load_torch_checkpoint', 'convert_state_dict', 'read_state_dict',
           'name_table', 'expected_source_shapes', 'source_constants', 'preset_config',
           'convert', 'load_text_encoder']


def _pretrained():
    try:
        from configs import pretrained  # pylint: disable=import-outside-toplevel
    except ImportError:  # configs/ lives beside the package in a source checkout
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
        from configs import pretrained  # pylint: disable=import-outside-toplevel
    return pretrained


def preset_config(preset: str, overrides: Mapping[str, Any] | None = None):
    """The preset's config with `overrides` ({'model.ch': 32, ...}) applied (tests shrink it)."""
    config = _pretrained().preset_config(preset)
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.rpartition('.')
        node = config
        for part in filter(None, section.split('.')):
            node = node[part]
        if field not in node:
            raise ValueError(f'override {dotted}={value!r}: {dotted} is not a config field.')
        node[field] = tuple(value) if isinstance(value, list) else value
    return config


def _check_source(source: str, model_config) -> None:
    if source not in SOURCES:
        raise ValueError(f'--from={source!r} is not a known checkpoint layout: use one of '
                         f'{list(SOURCES)}.')
    name = model_config['name']
    if source == 'diffusers' and name == 'autoencoder':
        return  # AutoencoderKL (the SD VAE)
    if source == 'diffusers':
        bad = {k: model_config[k] for k in ('use_scale_shift_norm', 'resblock_updown')
               if model_config.get(k)}
        if name != 'unet' or bad or model_config.get('num_classes', 0):
            raise ValueError(f'--from=diffusers reads UNet2DModel with DDPM blocks (or an '
                             f'AutoencoderKL): '
                             f'model_config.name={name!r} {bad} num_classes='
                             f"{model_config.get('num_classes')} have no diffusers counterpart.")
    elif source == 'dit' and name != 'dit':
        raise ValueError(f'--from=dit reads facebookresearch/DiT checkpoints: model_config.name='
                         f"{name!r} must be 'dit'.")
    elif name == 'autoencoder':
        raise ValueError(f'--from={source} has no autoencoders: use --from=diffusers for '
                         "model_config.name='autoencoder' (diffusers' AutoencoderKL).")
    elif source != 'dit' and name == 'dit':
        raise ValueError(f"--from={source} has no DiT layout: use --from=dit for model_config.name"
                         "='dit'.")
    elif source == 'improved-diffusion' and name != 'unet':
        raise ValueError(f'--from=improved-diffusion has no {name!r} networks; use '
                         '--from=guided-diffusion for ADM classifiers.')


def _our_shapes(model_config) -> dict:
    from diffusion_jax import models  # pylint: disable=import-outside-toplevel
    shapes = models.param_shapes(models.get_model(model_config))['params']
    plain = lambda n: {k: plain(v) for k, v in n.items()} if isinstance(n, Mapping) else n
    return plain(shapes)


def name_table(source: str, model_config, our_shapes=None) -> list[tables.Entry]:
    """The table of `source` keys -> our parameter paths for model_config (a ConfigDict)."""
    m = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    _check_source(source, m)
    tree = _our_shapes(model_config) if our_shapes is None else our_shapes
    if source == 'diffusers' and m['name'] == 'autoencoder':
        return tables.diffusers_vae_table(m, tree)
    if source == 'diffusers':
        return tables.diffusers_unet_table(m, tree)
    if source == 'dit':
        return tables.dit_table(m, tree)
    if m['name'] == 'classifier':
        return tables.openai_classifier_table(m, tree)
    return tables.openai_unet_table(m, tree)


def source_constants(source: str, model_config) -> dict[str, np.ndarray]:
    """Keys a `source` checkpoint holds that are constants here: {key: the value we use}."""
    m = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    return tables.dit_constants(m) if source == 'dit' else {}


def _check_constants(state_dict, constants) -> list[str]:
    problems = []
    for key, ours in constants.items():
        if key not in state_dict:
            problems.append(f'missing key {key} (shape {ours.shape}, a constant checked against '
                            'ours)')
            continue
        theirs = _to_numpy(state_dict[key]).astype(np.float32)
        if theirs.shape != ours.shape:
            problems.append(f'shape mismatch {key}: {theirs.shape} in the checkpoint, '
                            f'{ours.shape} expected (a constant checked against ours)')
        elif not np.allclose(theirs, ours, rtol=0, atol=CONSTANT_ATOL):
            problems.append(f'value mismatch {key}: differs from our fixed table by up to '
                            f'{float(np.max(np.abs(theirs - ours))):.3g} (> {CONSTANT_ATOL})')
    return problems


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def expected_source_shapes(source: str, model_config) -> dict[str, tuple[int, ...]]:
    """Every key a `source` checkpoint for model_config must hold, with its shape."""
    shapes = _our_shapes(model_config)
    out = {}
    for entry in name_table(source, model_config, shapes):
        for key, shape in zip(entry.sources,
                              entry.transform.source_shapes(_get(shapes, entry.path).shape)):
            out[key] = tuple(shape)
    out.update({k: tuple(v.shape) for k, v in source_constants(source, model_config).items()})
    return out


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor; .float() also covers bfloat16 (no numpy dtype)
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def convert_state_dict(state_dict: Mapping[str, Any], source: str, model_config) -> dict:
    """Our params pytree (float32 numpy) from a source state dict {key: tensor or array}.

    Raises ValueError listing every missing key, unexpected key and shape mismatch, one a line.
    """
    shapes = _our_shapes(model_config)
    table = name_table(source, model_config, shapes)
    constants = source_constants(source, model_config)
    problems, params, used = [], {}, set(constants)
    for entry in table:
        target = _get(shapes, entry.path)
        want = entry.transform.source_shapes(target.shape)
        arrays = []
        for key, shape in zip(entry.sources, want):
            used.add(key)
            if key not in state_dict:
                problems.append(f'missing key {key} (shape {tuple(shape)}, for '
                                f'{"/".join(entry.path)})')
                continue
            array = _to_numpy(state_dict[key])
            if tuple(array.shape) != tuple(shape):
                problems.append(f'shape mismatch {key}: {tuple(array.shape)} in the checkpoint, '
                                f'{tuple(shape)} expected (for {"/".join(entry.path)})')
                continue
            arrays.append(array.astype(np.float32))
        if len(arrays) == len(entry.sources):
            node = params
            for part in entry.path[:-1]:
                node = node.setdefault(part, {})
            node[entry.path[-1]] = np.ascontiguousarray(entry.transform.to_ours(*arrays))
    # Unexpected keys first: a wrong file's hundreds of missing keys must not hide them.
    problems = [f'unexpected key {key} (shape {tuple(_to_numpy(state_dict[key]).shape)}): '
                'no parameter of this network takes it' for key in state_dict
                if key not in used] + _check_constants(state_dict, constants) + problems
    filled = {tuple(e.path) for e in table}
    problems += [f'no checkpoint key fills our parameter {"/".join(p)} (converter table gap)'
                 for p in _leaf_paths(shapes) if p not in filled]
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ValueError(
            f'the {source} checkpoint does not fit model_config (name={model_config["name"]}, '
            f'{len(problems)} problem(s)); nothing was loaded:\n' + '\n'.join(shown)
            + (f'\n... and {more} more' if more else ''))
    return params


def read_state_dict(path) -> dict[str, Any]:
    """{key: tensor/array} from a .pt/.pth/.bin (torch.load, weights only) or a .safetensors
    file, or from a diffusers model folder (its diffusion_pytorch_model.* file)."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / f for f in DIFFUSERS_WEIGHT_FILES if (path / f).exists()]
        if not found:
            raise ValueError(f'--src={path} is a folder without {" or ".join(DIFFUSERS_WEIGHT_FILES)}'
                             ': pass the checkpoint file itself.')
        path = found[0]
    if not path.exists():
        raise ValueError(f'--src={path} does not exist: download the checkpoint first.')
    if path.suffix == '.safetensors':
        try:
            from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        except ImportError as err:
            raise ImportError('reading .safetensors needs safetensors: '
                              'pip install -e ".[torch]"') from err
        return dict(load_file(str(path)))
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(f'reading {path.name} needs PyTorch: pip install -e ".[torch]"') from err
    try:
        state = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as err:  # a pickle that holds more than tensors, or a damaged file
        raise ValueError(f'--src={path} could not be read as a weights-only torch checkpoint '
                         f'({type(err).__name__}: {str(err).splitlines()[0]}).') from err
    if not isinstance(state, Mapping):
        raise ValueError(f'--src={path} holds a {type(state).__name__}, not a state dict.')
    return dict(state)


def load_torch_checkpoint(path, source: str, preset: str, *,
                          overrides: Mapping[str, Any] | None = None):
    """(config, params): the preset's config and our params from the checkpoint at `path`.

    models.get_model(config.model).apply({'params': params}, x_nhwc, t, y) equals the source
    network on the same inputs, t being the diffusion's integer timesteps (presets trained with
    rescaled timesteps scale them inside the embedding, timestep_scale). `overrides` changes
    config fields first (e.g. a narrower network for tests).
    """
    pretrained = _pretrained()
    if preset not in pretrained.SOURCES:
        raise ValueError(f'--preset={preset!r} is not a known checkpoint: use one of '
                         f'{list(pretrained.PRESETS)}.')
    if source != pretrained.SOURCES[preset]:
        raise ValueError(f'--from={source!r} does not match --preset={preset}, which is a '
                         f'{pretrained.SOURCES[preset]} checkpoint: use '
                         f'--from={pretrained.SOURCES[preset]}.')
    config = preset_config(preset, overrides)
    _check_source(source, config.model.to_dict())
    return config, convert_state_dict(read_state_dict(path), source, config.model)


# A transformers model folder's weight files, in the order transformers prefers them.
TRANSFORMERS_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def load_text_encoder(folder):
    """(module, params): a transformers CLIPTextModel folder (config.json + model.safetensors or
    pytorch_model.bin, e.g. a diffusers pipeline's text_encoder/) as our CLIPTextEncoder."""
    import json  # pylint: disable=import-outside-toplevel
    from diffusion_jax.models import text_encoder  # pylint: disable=import-outside-toplevel
    folder = pathlib.Path(folder)
    found = [folder / f for f in TRANSFORMERS_WEIGHT_FILES if (folder / f).exists()]
    if not (folder / 'config.json').exists() or not found:
        raise ValueError(f'--src={folder} is not a transformers CLIPTextModel folder: it needs '
                         f'config.json and one of {TRANSFORMERS_WEIGHT_FILES}.')
    config = json.loads((folder / 'config.json').read_text())
    module = text_encoder.from_transformers_config(config.get('text_config', config))
    state = read_state_dict(found[0])
    return module, text_encoder.convert_transformers_state_dict(state, module)


def convert(src, source: str, preset: str, workdir, *, overrides=None, latents=None):
    """Converts the checkpoint at `src` and writes `workdir` as a run (config.json and a step-0
    checkpoint; EMA = the converted weights), which --mode=sample / --mode=eval then load.

    latents: the workdir of an autoencoder run (e.g. the SD VAE converted with --from=diffusers
    --preset=sd_vae) that a latent-space network (DiT) was trained in. The run's data section
    then describes the autoencoder's pixels (data.latents; image size and channels from its
    config), so sampling decodes to images; without it, the data section describes the latent
    tensors themselves.
    """
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    if latents:  # a wrong --latents is found before the (large) checkpoint is read
        _attach_latents(preset_config(preset, overrides), str(latents))
    config, params = load_torch_checkpoint(src, source, preset, overrides=overrides)
    if latents:
        _attach_latents(config, str(latents))
    return run.create(str(workdir), config, {'params': params})


def _attach_latents(config, latents: str) -> None:
    """Points config (a latent network's preset) at the autoencoder run `latents`: the data are
    its pixels, the latent fields are derived from it (run.derive_latents, which also checks
    that the network's input is the autoencoder's latent grid)."""
    from diffusion_jax import run  # pylint: disable=import-outside-toplevel
    if config.model.name != 'dit':
        raise ValueError(f'--latents={latents}: only a latent-space network (--from=dit) is '
                         f'trained on an autoencoder\'s latents; this preset is a pixel '
                         f'{config.model.name}: leave --latents out.')
    ae = run.autoencoder_config(latents, field='--latents').model
    with config.unlocked():
        config.data.latents = latents
        config.data.image_size = int(ae.image_size)
        config.data.channels = int(ae.in_channels)
        config.data.latent_scale = 0.0  # the autoencoder's model.scaling_factor
        run.derive_latents(config)
    sizes = (config.data.latent_size, config.data.latent_channels)
    if sizes != (config.model.image_size, config.model.in_channels):
        raise ValueError(f'--latents={latents} encodes to {sizes[0]}x{sizes[0]}x{sizes[1]} '
                         f'latents, but the network takes {config.model.image_size}x'
                         f'{config.model.image_size}x{config.model.in_channels}: use the '
                         'autoencoder it was trained with (DiT: the SD VAE at 8x downsampling).')
