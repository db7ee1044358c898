"""Convert pytorch-fid's Inception weights to a torch-free Flax msgpack checkpoint.

    python -m diffusion_jax.evaluation.convert_inception \
        --src pt_inception-2015-12-05-6726825d.pth --dst inception_fid.msgpack

The source file is the PyTorch port of the 2015-12-05 TensorFlow Inception graph used by FID,
released at ``inception.FID_WEIGHTS_URL``. Reading it needs PyTorch
(``pip install diffusion_jax[torch]``); the converted file needs only flax.

Mapping (PyTorch state dict -> Flax variables; module names are kept):

    <m>.conv.weight [O, I, kh, kw]   -> params/<m>/conv/kernel [kh, kw, I, O]
    <m>.bn.weight, <m>.bn.bias       -> params/<m>/bn/scale, params/<m>/bn/bias
    <m>.bn.running_mean / _var       -> batch_stats/<m>/bn/mean, batch_stats/<m>/bn/var
    fc.weight [1008, 2048], fc.bias  -> params/fc/kernel [2048, 1008], params/fc/bias
    *.num_batches_tracked            -> dropped (training counter)

The result is checked leaf by leaf against the shapes of ``inception.InceptionV3``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from typing import Mapping

import flax.serialization
from flax import traverse_util
import jax
import numpy as np

from diffusion_jax.evaluation import fid, inception

_TORCH_EXTRA_HINT = ("reading the PyTorch Inception weights needs PyTorch: "
                     "pip install diffusion_jax[torch]")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into numpy arrays (torch imported only here)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(_TORCH_EXTRA_HINT) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
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
                for k, s in traverse_util.flatten_dict(inception.variable_shapes()).items()}
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"state dict does not match the FID InceptionV3: missing {missing[:5]}"
                         f" ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for k, shape in expected.items():
        if flat[k].shape != tuple(shape):
            raise ValueError(f"{'/'.join(k)}: shape {flat[k].shape}, expected {tuple(shape)}")


def save_converted(variables: dict, path: str) -> None:
    """Write variables as flax msgpack, atomically (a temp file, then os.replace)."""
    data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    fid.atomic_write(path, lambda f: f.write(data))


def load_converted(path: str) -> dict:
    """Read a file written by ``save_converted``; re-checks the shapes."""
    with open(path, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    _check_against_model(traverse_util.flatten_dict(variables))
    return variables


def _check_hash(path: str) -> str:
    """sha256 of the file; torch-hub names carry its first hex digits, so verify them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    m = re.search(r"-([0-9a-f]{8,})\.pth?$", os.path.basename(path))
    if m and not sha.startswith(m.group(1)):
        raise ValueError(f"{path}: sha256 {sha} does not start with {m.group(1)}; "
                         "the download is corrupt or not the pytorch-fid weights")
    return sha


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--dst", required=True, help="output .msgpack")
    args = parser.parse_args(argv)
    if not os.path.exists(args.src):
        parser.error(f"{args.src} not found; download it from {inception.FID_WEIGHTS_URL}")
    sha = _check_hash(args.src)
    variables = state_dict_to_variables(load_torch_state_dict(args.src))
    save_converted(variables, args.dst)
    n = sum(x.size for x in jax.tree.leaves(variables))
    print(f"converted {args.src} (sha256 {sha[:16]}...) -> {args.dst}: {n} numbers")


if __name__ == "__main__":
    main()
