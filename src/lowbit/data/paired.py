"""Paired image datasets for image-to-image GANs: (input A, target B) pairs as [-1, 1] tensors.

* ``sr2-mnist``, ``sr4-mnist``, ``sr2-fashion-mnist``, ``sr4-fashion-mnist``: super-resolution;
  A is the 28x28 image area-down-sampled (the mean of each 2x2 / 4x4 block) to 14x14 / 7x7.
* ``edges2fashion``: A is the Sobel gradient magnitude of the Fashion-MNIST image thresholded to
  a binary edge map, B the image.
* ``paired-folder``: ``root/A`` and ``root/B`` (or ``root/{train,test}/{A,B}``) holding images of the
  same file names; every A has one size, every B one size, a whole multiple of A's.

Derived pairs are computed once and cached as uint8 ``.npz`` under ``<cache>/datasets/`` (as MNIST
is); ``limit`` picks the same fixed subset as every other dataset.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lowbit.config import unknown_name_error
from lowbit.data.datasets import SPLITS, read_arrays, to_float_tensor
from lowbit.data.images import folder_split_dir, list_images
from lowbit.data.storage import derived_path, write_npz
from lowbit.data.subset import subset_indices
from lowbit.errors import ConfigError, DataError

Pairs = tuple[np.ndarray, np.ndarray]
#: Sobel magnitude (on [0, 1] pixels, max 4*sqrt(2)) above which a pixel is an edge
EDGE_THRESHOLD = 1.0
SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float32)


def area_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 N x C x H x W -> N x C x H/f x W/f: the rounded mean of every f x f block (area resize)."""
    n, c, h, w = images.shape
    if h % factor or w % factor:
        raise ConfigError(f"cannot area-down-sample {h}x{w} images by {factor}; use a factor dividing both")
    blocks = images.reshape(n, c, h // factor, factor, w // factor, factor).astype(np.float32)
    return np.rint(blocks.mean(axis=(3, 5))).astype(np.uint8)


def sobel_magnitude(images: np.ndarray) -> np.ndarray:
    """Gradient magnitude sqrt(gx^2 + gy^2) of uint8 images scaled to [0, 1] (edge-replicated borders)."""
    x = images.astype(np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[-2:]
    gx = np.zeros_like(x)
    gy = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            window = padded[..., i:i + h, j:j + w]
            gx += SOBEL[i, j] * window
            gy += SOBEL[j, i] * window
    return np.sqrt(gx * gx + gy * gy)


def edge_maps(images: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Binary uint8 edge maps (255 on edges, 0 elsewhere) of uint8 images."""
    return np.where(sobel_magnitude(images) > threshold, 255, 0).astype(np.uint8)


def _cached(key: str, build: Callable[[], Pairs]) -> Pairs:
    """The pairs cached as ``<cache>/datasets/<key>.npz``, built and written on first use."""
    path = derived_path(f"{key}.npz")
    if path.is_file():
        try:
            with np.load(path) as archive:
                return archive["a"], archive["b"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)
    a, b = build()
    write_npz(path, {"a": a, "b": b})
    return a, b


def _super_resolution(source: str, factor: int) -> Callable[[str, Path | None], Pairs]:
    def read(split: str, root: Path | None) -> Pairs:
        def build() -> Pairs:
            images, _ = read_arrays(source, split, root)
            return area_downsample(images, factor), images

        return build() if root is not None else _cached(f"sr{factor}-{source}-{split}", build)

    return read


def _edges2fashion(split: str, root: Path | None) -> Pairs:
    def build() -> Pairs:
        images, _ = read_arrays("fashion-mnist", split, root)
        return edge_maps(images), images

    return build() if root is not None else _cached(f"edges2fashion-{split}", build)


def _decode(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); delete or replace the pair") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _stack(paths: list[Path], channels: int, side: str) -> np.ndarray:
    """Decode ``paths``; every image of one side must have the first one's size."""
    images = [_decode(p, channels) for p in paths]
    for path, image in zip(paths, images, strict=True):
        if image.shape != images[0].shape:
            raise DataError(f"{path}: {image.shape[2]}x{image.shape[1]} but {paths[0].name} in {side}/ is "
                            f"{images[0].shape[2]}x{images[0].shape[1]}; resize every {side} image to one "
                            "size")
    return np.stack(images)


def folder_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(A, B) files matched by name under ``folder/A`` and ``folder/B``; a missing partner is an error."""
    a_dir, b_dir = folder / "A", folder / "B"
    for side in (a_dir, b_dir):
        if not side.is_dir():
            raise DataError(f"{folder}: no {side.name}/ subfolder; put inputs in A/ and targets in B/ with "
                            "the same file names")
    a_files = {p.stem: p for p in list_images(a_dir)}
    b_files = {p.stem: p for p in list_images(b_dir)}
    if not a_files:
        raise DataError(f"{a_dir}: no images; put the input images there")
    for stem, path in a_files.items():
        if stem not in b_files:
            raise DataError(f"{path}: no target image '{stem}.*' in {b_dir}; add it or remove the input")
    for stem, path in b_files.items():
        if stem not in a_files:
            raise DataError(f"{path}: no input image '{stem}.*' in {a_dir}; add it or remove the target")
    return [(a_files[stem], b_files[stem]) for stem in sorted(a_files)]


def read_paired_folder(split: str, root: Path | None, channels: int = 1) -> Pairs:
    """A user folder of pairs; B's size must be a whole multiple of A's (1 for translation)."""
    if root is None:
        raise ConfigError("dataset 'paired-folder' needs root=DIR (--root DIR) holding A/ and B/")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    pairs = folder_pairs(folder_split_dir(root, split))
    a = _stack([p for p, _ in pairs], channels, "A")
    b = _stack([p for _, p in pairs], channels, "B")
    (ha, wa), (hb, wb) = a.shape[-2:], b.shape[-2:]
    if hb % ha or wb % wa or hb // ha != wb // wa:
        raise DataError(f"{root}: A images are {wa}x{ha} and B images {wb}x{hb}; B must be A's size or a "
                        "whole multiple of it (super-resolution), resize one side")
    return a, b


_READERS: dict[str, Callable[..., Pairs]] = {
    "sr2-mnist": _super_resolution("mnist", 2),
    "sr4-mnist": _super_resolution("mnist", 4),
    "sr2-fashion-mnist": _super_resolution("fashion-mnist", 2),
    "sr4-fashion-mnist": _super_resolution("fashion-mnist", 4),
    "edges2fashion": _edges2fashion,
    "paired-folder": read_paired_folder,
}
PAIRED_DATASETS: tuple[str, ...] = tuple(_READERS)
#: the single-image dataset whose images are the targets (its extractor scores FID of the outputs)
_TARGET_DOMAINS = {"sr2-mnist": "mnist", "sr4-mnist": "mnist", "sr2-fashion-mnist": "fashion-mnist",
                   "sr4-fashion-mnist": "fashion-mnist", "edges2fashion": "fashion-mnist"}


def target_domain(name: str) -> str | None:
    """The dataset the targets of paired dataset ``name`` come from (None for user folders)."""
    return _TARGET_DOMAINS.get(name)


def read_pairs(name: str, split: str = "train", root: str | Path | None = None, limit: int | None = None,
               **options) -> Pairs:
    """Paired dataset ``name`` as uint8 (A, B) arrays, N x C x H x W each."""
    if name not in _READERS:
        raise unknown_name_error("paired dataset", name, _READERS)
    if split not in SPLITS:
        raise unknown_name_error("split", split, SPLITS)
    reader = _READERS[name]
    if options and name != "paired-folder":
        raise ConfigError(f"paired dataset '{name}' takes no options, got {', '.join(options)}")
    a, b = reader(split, Path(root).expanduser() if root is not None else None, **options)
    keep = subset_indices(len(a), limit)
    return (a, b) if len(keep) == len(a) else (a[keep], b[keep])


def load_pairs(name: str, split: str = "train", root: str | Path | None = None, limit: int | None = None,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired dataset ``name`` as float32 (inputs, targets) in [-1, 1]; see the module docstring."""
    a, b = read_pairs(name, split, root, limit, **options)
    return to_float_tensor(a), to_float_tensor(b)
