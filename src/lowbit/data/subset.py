"""Deterministic subsets (``limit``) shared by every dataset reader."""

from __future__ import annotations

import numpy as np

from lowbit.errors import ConfigError

SUBSET_SEED = 0


def subset_indices(n: int, limit: int | None) -> np.ndarray:
    """Sorted indices of a fixed pseudo-random subset of ``limit`` items out of ``n`` (all when None).

    The same (n, limit) always gives the same items, and classes stay mixed (unlike the first N).
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ConfigError(f"limit must be a positive number of images, got {limit}; omit it to use all {n}")
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:limit])


def take_subset(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``images`` and ``labels`` restricted to ``subset_indices(len(images), limit)``."""
    keep = subset_indices(len(images), limit)
    if len(keep) == len(images):
        return images, labels
    return images[keep], labels[keep]
