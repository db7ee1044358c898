"""The static / traced split of the pytree arguments of a jitted sampler call: arrays are traced,
everything else (the diffusion's or process's Python fields, functions) is part of a hashable
static key, so a sampler compiles once per (structure, static fields) and not per parameter
value. Shared by the chain (samplers.chain), the process solvers and DDIM inversion."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


_DYNAMIC = object()  # marks a leaf position that is traced rather than static


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Static:
    """The hashable part of a pytree: its structure and its non-array leaves."""

    def __init__(self, treedef, leaves):
        self.treedef = treedef
        self.leaves = tuple(leaves)
        # Unhashable leaves are compared by identity; this object keeps them alive, so their ids
        # are not reused while a jit cache entry refers to it.
        self._key = (treedef, tuple(_hash_key(leaf) for leaf in self.leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key

    def merge(self, dynamic):
        it = iter(dynamic)
        leaves = [next(it) if leaf is _DYNAMIC else leaf for leaf in self.leaves]
        return jax.tree.unflatten(self.treedef, leaves)


def _hash_key(leaf):
    if leaf is _DYNAMIC:
        return '<dynamic>'
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return ('<id>', id(leaf))


def partition(tree):
    """(array leaves, _Static rest) of a pytree."""
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [leaf for leaf in leaves if _is_dynamic(leaf)]
    static = _Static(treedef, [_DYNAMIC if _is_dynamic(leaf) else leaf for leaf in leaves])
    return dynamic, static


def check_batch(batch: int, mesh: Mesh | None, what: str):
    if mesh is not None and batch % mesh.devices.size:
        raise ValueError(f'{what}: batch {batch} is not divisible by the {mesh.devices.size} '
                         'devices of the mesh; use a multiple of the device count.')
