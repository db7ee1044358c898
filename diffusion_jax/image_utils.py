"""Images in and out: [-1, 1] floats <-> uint8, sample grids and strips as PNG, .npz archives;
and the package's file I/O: every file a run writes (config.json, logs, grids, sample archives,
eval JSONs, caches) goes through `atomic_write`, and the reads of a run's own files through
`as_path`/`read_bytes`, so that a workdir may be a `gs://` (or any etils.epath) URI.

Writes are all or nothing. A local path: a temporary file in the same folder, renamed into place
(os.replace, atomic on POSIX), so an interrupted write never leaves a truncated file where a good
one was. A URI (gs://, s3://, ...: an object store, which has no atomic rename, only copy and
delete): one direct write through etils.epath, which is atomic there because an object becomes
visible only when its upload completes.
"""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from etils import epath


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels: round((x + 1)·127.5), clipped to [0, 255]."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x) -> np.ndarray:
    """uint8 pixels v -> float32 v/127.5 - 1 in [-1, 1]."""
    return np.asarray(x, np.float32) / 127.5 - 1.0


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, H, W, C] uint8 images into one [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'make_grid needs [N, H, W, C] images, got shape {images.shape}.')
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, images.dtype)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    return grid


def is_uri(path) -> bool:
    """Whether path names a non-local store (gs://bucket/..., s3://..., any scheme://)."""
    return '://' in os.fspath(path)


def as_path(path) -> epath.Path:
    """path as an etils.epath.Path: a URI keeps its scheme (os.path would turn gs://b into a
    local gs:/b folder), a local path is made absolute."""
    return epath.Path(path) if is_uri(path) else epath.Path(os.path.abspath(os.fspath(path)))


def read_bytes(path) -> bytes:
    return as_path(path).read_bytes()


def read_text(path) -> str:
    return as_path(path).read_text(encoding='utf-8')


def exists(path) -> bool:
    return as_path(path).exists()


def atomic_write(path, data: bytes) -> None:
    """Write bytes to path all or nothing: a local path by a temp file beside it and os.replace,
    a URI by one direct write through etils.epath (module docstring)."""
    if is_uri(path):
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object stores
        with target.open('wb') as f:
            f.write(data)
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        # mkstemp makes the file private (0600); give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
    """Write an [H, W, C] (C in {1, 3}) or [H, W] uint8 image as PNG, optionally upscaled by
    pixel repetition so that 8×8 digits are visible."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    image = np.asarray(image, np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if upscale > 1:
        image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    atomic_write(path, buf.getvalue())


def save_grid(path: str, images_uint8: np.ndarray, ncols: int | None = None,
              upscale: int | None = None) -> None:
    """A PNG grid of [N, H, W, C] uint8 images; small images are upscaled to ≥ 64 px."""
    h = images_uint8.shape[1]
    upscale = upscale or max(1, 64 // h)
    save_png(path, make_grid(images_uint8, ncols), upscale=upscale)


def save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(path, buf.getvalue())


def write_json(path: str, obj) -> None:
    """obj as indented JSON, written atomically."""
    import json  # pylint: disable=import-outside-toplevel
    atomic_write(path, json.dumps(obj, indent=2).encode())
