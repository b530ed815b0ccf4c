"""Reader for CIFAR-10's binary version (``cifar-10-batches-bin``).

Each record is one label byte (0-9) followed by 3,072 pixel bytes: the 32x32 red plane, then
green, then blue (https://www.cs.toronto.edu/~kriz/cifar.html).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.data.storage import raw_dir
from lowbit.errors import DataError

BATCH_DIR = "cifar-10-batches-bin"
RECORD_BYTES = 1 + 3 * 32 * 32
NUM_CLASSES = 10
SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


def cifar_batch_dir(root: Path | None) -> Path:
    """The ``cifar-10-batches-bin`` folder: ``root``, ``root/cifar-10-batches-bin`` or the fetch cache."""
    base = root if root is not None else raw_dir("cifar10")
    for candidate in (base, base / BATCH_DIR):
        if (candidate / SPLIT_FILES["test"][0]).is_file():
            return candidate
    raise DataError(f"{base}: no {BATCH_DIR}/test_batch.bin found; pass --root DIR holding the extracted "
                    "cifar-10-binary.tar.gz, or run `lowbit data fetch cifar10`")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file as (uint8 N x 3 x 32 x 32, int64 labels), checking length and labels."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; the {BATCH_DIR} folder is incomplete, "
                        "extract the archive again")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % RECORD_BYTES != 0:
        raise DataError(f"{path}: {data.size} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 "
                        "records (truncated or corrupted); extract or download it again")
    records = data.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: label byte {labels.max()} outside 0-9; this is not a CIFAR-10 binary batch "
                        "(CIFAR-100 uses another layout); pass the cifar-10-batches-bin files")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def read_cifar10(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split`` (train: 5 batches = 50,000; test: 10,000) as uint8 images and labels."""
    folder = cifar_batch_dir(root)
    parts = [read_cifar_batch(folder / name) for name in SPLIT_FILES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
