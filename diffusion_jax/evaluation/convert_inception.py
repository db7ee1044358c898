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
import jax

from diffusion_jax.evaluation import inception
# The conversion itself lives in inception.py (its loader reads .pth files too); the old names:
from diffusion_jax.evaluation.inception import (load_converted, load_torch_state_dict,  # noqa: F401
                                                save_converted, state_dict_to_variables)


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
