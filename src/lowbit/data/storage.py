"""Where the data layer keeps files under ``lowbit.io.cache_dir()``, and the atomic .npz writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.io import atomic_path, cache_dir


def raw_dir(name: str) -> Path:
    """Where ``lowbit data fetch NAME`` stores the downloaded files of a dataset (``<cache>/raw/NAME``)."""
    return cache_dir() / "raw" / name


def derived_path(filename: str) -> Path:
    """A converted/decoded array file under ``<cache>/datasets/``."""
    return cache_dir() / "datasets" / filename


def write_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save arrays to ``target`` atomically (readers never see a partial cache file)."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
