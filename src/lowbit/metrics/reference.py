"""Reference features of the real data, cached per (dataset, split, extractor hash, n).

The first evaluation against a dataset runs its real images through the extractor and stores the
float64 features (safetensors, written atomically, metadata checked on load) under
``lowbit.io.cache_dir()/fid-reference``; later evaluations read them back instead of recomputing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lowbit.io import atomic_path, cache_dir
from lowbit.metrics.extractors import Extractor, module_device
from lowbit.metrics.scores import extract_features

CACHE_FOLDER = "fid-reference"


def reference_path(dataset: str, split: str, extractor: Extractor, n: int) -> Path:
    """Cache file of the reference features for this (dataset, split, extractor, n)."""
    name = extractor.name.replace("/", "_")
    return cache_dir() / CACHE_FOLDER / f"{dataset}-{split}-n{n}-{name}-{extractor.sha256[:16]}.safetensors"


def _metadata(dataset: str, split: str, extractor: Extractor, n: int) -> dict[str, str]:
    return {
        "dataset": dataset,
        "split": split,
        "n": str(n),
        "extractor": extractor.name,
        "extractor_sha256": extractor.sha256,
    }


def _read_cached(path: Path, expected: dict[str, str]) -> torch.Tensor | None:
    """The cached features, or None when the file is absent, unreadable or for other inputs."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != expected:
                return None
            return handle.get_tensor("features")
    except (SafetensorError, OSError):
        return None


@torch.no_grad()
def features_of(
    images: torch.Tensor, extractor: Extractor, batch: int = 500, desc: str = "features"
) -> torch.Tensor:
    """Float64 features of an image tensor, batch by batch with a progress bar."""
    device = module_device(extractor.module)
    chunks = [
        extract_features(extractor, images[start : start + batch].to(device)).cpu()
        for start in tqdm(range(0, images.shape[0], batch), desc=desc, unit="batch", leave=False)
    ]
    return torch.cat(chunks)


def reference_features(
    dataset: str, extractor: Extractor, split: str = "train", n: int = 10_000, batch: int = 500
) -> torch.Tensor:
    """Features (float64, N x D) of ``lowbit.data.load(dataset, split, limit=n)``, cached on disk.

    N < n when the split holds fewer than ``n`` images (e.g. digits); callers report N as ``n_real``.
    """
    path = reference_path(dataset, split, extractor, n)
    expected = _metadata(dataset, split, extractor, n)
    cached = _read_cached(path, expected)
    if cached is not None:
        return cached
    from lowbit.data import load

    images, _ = load(dataset, split, limit=n)
    features = features_of(images, extractor, batch, desc=f"reference {dataset}/{split}")
    with atomic_path(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp), metadata=expected)
    return features
