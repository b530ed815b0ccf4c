"""Datasets as float tensors in [-1, 1]: MNIST, Fashion-MNIST, digits, CIFAR-10, CelebA, image folders,
and paired image-to-image datasets (``load_pairs``: super-resolution, edges2fashion, A/B folders).

``load(name, split, root, limit, **options) -> (images, labels)``, ``make_loader`` for batches,
``DATASETS`` for the names, ``save_image_grid`` for sample grids. The names are resolved lazily
so that torch-free parts (``lowbit data prepare`` on every ``make``) start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DATASETS": "lowbit.data.datasets",
    "load": "lowbit.data.datasets",
    "read_arrays": "lowbit.data.datasets",
    "make_loader": "lowbit.data.loader",
    "PAIRED_DATASETS": "lowbit.data.paired",
    "load_pairs": "lowbit.data.paired",
    "save_image_grid": "lowbit.data.grid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit.data' has no attribute '{name}'")
