"""InceptionV3 as used for FID: the 2015-12-05 TensorFlow graph, in Flax Linen, NHWC.

FID, precision/recall and Inception Score are only comparable with published numbers when the
features come from one specific network: the 2015-12-05 TensorFlow Inception graph of the
original FID code, as ported to PyTorch by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``).
That graph differs from torchvision's InceptionV3, and this module reproduces its quirks:

* every convolution is bias-free and followed by BatchNorm with ``eps = 1e-3`` and a ReLU;
* the average-pool branches of the A, C and E blocks ignore the zero padding
  (``count_include_pad=False``), as TensorFlow's average pool does;
* the pool branch of the last block (``Mixed_7c``, pytorch-fid's ``FIDInceptionE_2``) uses a
  3x3 *max* pool where the paper has an average pool;
* the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused), not 1000.

Input pipeline (as pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``):

    uint8 images [N, H, W, C], C in {1, 3}  ->  x / 255 in [0, 1]
    -> bilinear resize to 299x299 with half-pixel centres and no antialiasing
       (``F.interpolate(mode='bilinear', align_corners=False)``)
    -> 2 x - 1 in [-1, 1]   -> network.

Outputs of ``inception_features`` (N images):

    pool            [N, 2048]  global average of Mixed_7c: the FID / precision-recall features
    logits          [N, 1008]  pool @ W + b, the classifier ``fc`` of the PyTorch port
    logits_unbiased [N, 1008]  pool @ W without the bias: what the original Inception Score
                               code (Salimans et al. 2016) fed to its softmax, so IS numbers
                               comparable with the literature use these.

Weights: ``load_pytorch_fid_weights(path)`` reads either the pytorch-fid ``.pth`` (needs torch)
or the msgpack file written by ``python -m diffusion_jax.evaluation.convert_inception``.
The variables are the Flax collections ``{'params': ..., 'batch_stats': ...}``; module and
parameter names mirror the PyTorch state dict so the conversion is a renaming plus transposes.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import image_utils

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299  # the resolution the 2015-12-05 graph was trained at
NUM_LOGITS = 1008  # the TF graph's classifier width (1000 classes + 8 unused)
POOL_DIM = 2048
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon in the original graph (torch's default is 1e-5)

# FID is sensitive to small feature changes; TF32 convolutions on GPUs would move features by
# ~1e-3 relative, so the port runs at full float32 precision.
_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""
    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TF's average pool divides by the number of valid pixels only, unlike torch's default.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 1x7 / 7x1 convolutions."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs.

    ``max_pool=True`` reproduces the FID graph's Mixed_7c (pytorch-fid's FIDInceptionE_2).
    """
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        row = dict(kernel_size=(1, 3), padding=(0, 1))
        col = dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                              BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3_same(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3. Input [N, 299, 299, 3] in [-1, 1]; returns (pool [N, 2048], fc)."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)    # 149x149x32
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)            # 147x147x32
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)                                    # 73x73x64
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)           # 71x71x192
        x = _max_pool_3x3_stride2(x)                                    # 35x35x192
        x = InceptionA(32, name="Mixed_5b")(x)                          # 35x35x256
        x = InceptionA(64, name="Mixed_5c")(x)                          # 35x35x288
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)                              # 17x17x768
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)                              # 8x8x1280
        x = InceptionE(name="Mixed_7b")(x)                              # 8x8x2048
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))                                 # [N, 2048]
        fc = nn.Dense(NUM_LOGITS, precision=_PRECISION, name="fc")
        return pool, fc(pool)


# ------------------------------------------------------------------------------------------
# Preprocessing.


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's bilinear weights with align_corners=False, no antialias.

    Source coordinate of output pixel i is (i + 0.5) * in/out - 0.5, clamped below at 0 (torch
    clamps there, which makes the first rows copy pixel 0 when upsampling); the upper neighbour
    is clamped to the last pixel. The coordinate is rounded as torch's kernels round it: the
    ratio in float32, then one fused multiply-add rounded once to float32. Rounding differently
    moves the weights by up to ~in_size * 1e-7, visible at the 1e-5 level for large inputs.
    """
    f32 = np.float32
    scale = np.float64(f32(in_size) / f32(out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(f32)  # exact in f64, then 1 rounding
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0, so truncation is floor
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(f32)
    m = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), f32(1.0) - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize_bilinear(x: jax.Array, size: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """Bilinear resize of float [N, H, W, C] exactly as F.interpolate(align_corners=False).

    Written as two small matrix products, because jax.image.resize antialiases when shrinking
    and pytorch-fid does not.
    """
    mh = jnp.asarray(_bilinear_matrix(x.shape[1], size[0]))
    mw = jnp.asarray(_bilinear_matrix(x.shape[2], size[1]))
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=_PRECISION)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=_PRECISION)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 1 or 3] -> float32 [N, 299, 299, 3] in [-1, 1], as pytorch-fid."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got {images.shape}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB, as PIL's convert('RGB') in pytorch-fid
    return 2.0 * resize_bilinear(x) - 1.0


# ------------------------------------------------------------------------------------------
# Weights and features.


_TORCH_EXTRA_HINT = ("reading the PyTorch Inception weights needs PyTorch: "
                     "pip install diffusion_jax[torch]")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into numpy arrays (torch imported only here)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(_TORCH_EXTRA_HINT) from e
    import io  # pylint: disable=import-outside-toplevel
    state = torch.load(io.BytesIO(image_utils.read_bytes(path)), map_location="cpu",
                       weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _flax_location(key: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray] | None:
    """Map one state-dict entry to (collection, path, array); None for entries we drop."""
    *modules, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return None
    if leaf == "weight" and value.ndim == 4:   # conv: OIHW -> HWIO
        return "params", (*modules, "kernel"), value.transpose(2, 3, 1, 0)
    if leaf == "weight" and value.ndim == 2:   # dense: [out, in] -> [in, out]
        return "params", (*modules, "kernel"), value.T
    renamed = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    if leaf not in renamed:
        raise ValueError(f"unexpected state-dict entry {key!r}")
    collection, name = renamed[leaf]
    return collection, (*modules, name), value


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid Inception state dict (name -> array) -> Flax {'params', 'batch_stats'}."""
    flat = {}
    for key, value in state_dict.items():
        if key.startswith("AuxLogits."):
            continue  # the training-only auxiliary head; the FID graph never uses it
        loc = _flax_location(key, np.asarray(value, dtype=np.float32))
        if loc is not None:
            collection, path, array = loc
            flat[(collection, *path)] = np.ascontiguousarray(array)
    _check_against_model(flat)
    return traverse_util.unflatten_dict(flat)


def _check_against_model(flat: dict) -> None:
    expected = {k: s.shape
                for k, s in traverse_util.flatten_dict(variable_shapes()).items()}
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"state dict does not match the FID InceptionV3: missing {missing[:5]}"
                         f" ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for k, shape in expected.items():
        if flat[k].shape != tuple(shape):
            raise ValueError(f"{'/'.join(k)}: shape {flat[k].shape}, expected {tuple(shape)}")


def save_converted(variables: dict, path: str) -> None:
    """Write variables as flax msgpack, atomically (image_utils.atomic_write)."""
    data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    image_utils.atomic_write(os.fspath(path), data)


def load_converted(path: str) -> dict:
    """Read a file written by ``save_converted``; re-checks the shapes."""
    variables = flax.serialization.msgpack_restore(image_utils.read_bytes(path))
    _check_against_model(traverse_util.flatten_dict(variables))
    return variables


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict:
    """Load the FID Inception variables {'params', 'batch_stats'} from ``path``.

    ``path`` is either pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (converted on the
    fly; needs torch) or the msgpack file written by ``convert_inception``.
    """
    path = os.fspath(path)
    if not image_utils.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}. Download the PyTorch port of the "
            f"2015-12-05 TensorFlow Inception graph from\n  {FID_WEIGHTS_URL}\nand either point "
            "the config at that .pth file (requires `pip install diffusion_jax[torch]`) or "
            "convert it once, without torch needed afterwards:\n  python -m "
            "diffusion_jax.evaluation.convert_inception "
            f"--src pt_inception-2015-12-05-6726825d.pth --dst {path}")
    if path.endswith((".pth", ".pt")):
        return state_dict_to_variables(load_torch_state_dict(path))
    return load_converted(path)


@jax.jit
def _features_batch(variables, images):
    pool, logits = InceptionV3().apply(variables, preprocess(images))
    kernel = variables["params"]["fc"]["kernel"]
    unbiased = jnp.dot(pool, kernel, precision=_PRECISION)
    return dict(pool=pool, logits=logits, logits_unbiased=unbiased)


def inception_features(params: dict, images, batch_size: int = 50) -> dict[str, np.ndarray]:
    """FID Inception features of uint8 NHWC ``images`` of any size (1 or 3 channels).

    ``params`` is the variables dict from ``load_pytorch_fid_weights``. Runs in jitted batches;
    the last batch is zero-padded to ``batch_size`` so that one compiled program serves all.
    Returns numpy float32 ``pool [N, 2048]``, ``logits [N, 1008]``, ``logits_unbiased [N, 1008]``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}")
    n = images.shape[0]
    batch_size = max(1, min(batch_size, n))
    params = jax.device_put(params)  # once, not with every batch
    chunks = []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        pad = batch_size - batch.shape[0]
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
        out = jax.device_get(_features_batch(params, batch))
        chunks.append({k: v[:batch_size - pad] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def variable_shapes() -> dict:
    """Shape tree (jax.ShapeDtypeStruct) of the FID Inception variables, without computing."""
    model = InceptionV3()
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, jax.random.key(0)), dummy)
