"""Image-file datasets: CelebA (``img_align_celeba``) and generic image folders, decoded with Pillow.

Each image is center-cropped to a square (side ``crop``, default its shorter side) and resized to
``size`` x ``size``. Decoded arrays are cached under ``<cache>/datasets/`` keyed by folder, split,
options and file list, so the slow decode runs once.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lowbit.data.storage import derived_path, write_npz
from lowbit.data.subset import subset_indices
from lowbit.errors import ConfigError, DataError
from lowbit.limits import check_count

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CELEBA_DIR = "img_align_celeba"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_PARTITIONS = {"train": "0", "test": "2"}  # 1 = validation, unused


def list_images(folder: Path) -> list[Path]:
    """Image files (by suffix) directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def decode_image(path: Path, size: int, crop: int | None, channels: int) -> np.ndarray:
    """One file -> uint8 C x size x size: center square crop, bicubic resize, RGB or grey."""
    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGB" if channels == 3 else "L")
            side = min(picture.size) if crop is None else min(crop, *picture.size)
            left, top = (picture.width - side) // 2, (picture.height - side) // 2
            picture = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            array = np.asarray(picture, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); delete or replace the file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _check_image_options(size: int, crop: int | None, channels: int) -> None:
    if not isinstance(size, int) or size < 4:
        raise ConfigError(f"image size must be an integer >= 4 (e.g. 64 or 128), got {size!r}")
    check_count("image size", size, "image_size")
    if crop is not None and (not isinstance(crop, int) or crop < 1):
        raise ConfigError(f"crop must be a positive integer side length or omitted, got {crop!r}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def _cache_path(files: list[Path], size: int, crop: int | None, channels: int) -> Path:
    """Cache file named by a digest of the chosen files (paths, sizes, mtimes) and the options."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps({"files": stats, "size": size, "crop": crop, "channels": channels})
    return derived_path(f"images-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def decode_files(files: list[Path], size: int, crop: int | None, channels: int) -> np.ndarray:
    """All ``files`` as uint8 N x C x size x size, from the cache when this exact set was decoded before."""
    _check_image_options(size, crop, channels)
    cached = _cache_path(files, size, crop, channels)
    if cached.is_file():
        try:
            with np.load(cached) as archive:
                return archive["images"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            cached.unlink(missing_ok=True)
    images = np.stack([decode_image(p, size, crop, channels)
                       for p in tqdm(files, desc="decoding images", unit="img", disable=len(files) < 1000)])
    write_npz(cached, {"images": images})
    return images


def _no_images_error(folder: Path) -> DataError:
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    return DataError(f"{folder}: no image files ({suffixes}) found; pass --root DIR of a folder with images")


def celeba_image_dir(root: Path) -> Path:
    """``root/img_align_celeba`` when it exists, else ``root`` itself."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; pass --root DIR holding {CELEBA_DIR}/")
    nested = root / CELEBA_DIR
    return nested if nested.is_dir() else root


def celeba_files(root: Path, split: str) -> list[Path]:
    """CelebA images of ``split`` per ``list_eval_partition.txt`` (train 0, test 2); all when it is absent."""
    folder = celeba_image_dir(root)
    files = list_images(folder)
    if not files:
        raise _no_images_error(folder)
    partition = next((p for p in (root / CELEBA_PARTITION_FILE, folder.parent / CELEBA_PARTITION_FILE)
                      if p.is_file()), None)
    if partition is None:
        if split == "test":
            raise DataError(f"{root}: no {CELEBA_PARTITION_FILE}, so CelebA has no test split; put the file "
                            "from the CelebA release next to the image folder, or use split 'train'")
        return files
    wanted = CELEBA_PARTITIONS[split]
    names = {line.split()[0] for line in partition.read_text().splitlines()
             if len(line.split()) == 2 and line.split()[1] == wanted}
    chosen = [p for p in files if p.name in names]
    if not chosen:
        raise DataError(f"{partition}: lists no images of split '{split}' present in {folder}; "
                        "check that the partition file belongs to this image folder")
    return chosen


def read_celeba(split: str, root: Path, limit: int | None, size: int = 64, crop: int | None = None) -> \
        tuple[np.ndarray, np.ndarray]:
    """CelebA faces as uint8 N x 3 x size x size and all-zero labels (the set is unlabelled here)."""
    files = celeba_files(root, split)
    files = [files[i] for i in subset_indices(len(files), limit)]
    return decode_files(files, size, crop, 3), np.zeros(len(files), dtype=np.int64)


def folder_classes(folder: Path) -> list[tuple[Path, int]]:
    """(file, label) pairs: one label per sorted subfolder holding images, or label 0 for a flat folder."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; pass --root DIR of an image folder")
    subfolders = [d for d in sorted(folder.iterdir()) if d.is_dir() and list_images(d)]
    if subfolders:
        return [(path, label) for label, d in enumerate(subfolders) for path in list_images(d)]
    files = list_images(folder)
    if not files:
        raise _no_images_error(folder)
    return [(path, 0) for path in files]


def folder_split_dir(root: Path, split: str) -> Path:
    """``root/train`` / ``root/test`` when the folder is split that way; else ``root`` for train."""
    if (root / "train").is_dir():
        if not (root / split).is_dir():
            raise DataError(f"{root}: has train/ but no {split}/ subfolder; add it or use split 'train'")
        return root / split
    if split == "test":
        raise DataError(f"{root}: no test/ subfolder, so this image folder has no test split; "
                        "arrange it as train/ and test/ or use split 'train'")
    return root


def read_folder(split: str, root: Path, limit: int | None, size: int = 64, channels: int = 3,
                crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A generic image folder (class subfolders or flat) as uint8 N x C x size x size and labels."""
    pairs = folder_classes(folder_split_dir(root, split))
    pairs = [pairs[i] for i in subset_indices(len(pairs), limit)]
    images = decode_files([p for p, _ in pairs], size, crop, channels)
    return images, np.array([label for _, label in pairs], dtype=np.int64)
