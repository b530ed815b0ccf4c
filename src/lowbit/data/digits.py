"""scikit-learn's 8x8 handwritten digits (1,797 images), optionally resized to 16x16."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lowbit.errors import ConfigError

DIGITS_SIZES = (8, 16)
TEST_EVERY = 5  # every 5th image (index % 5 == 4) is the test split: 359 test, 1,438 train


def digits_split_mask(n: int, split: str) -> np.ndarray:
    """Boolean mask of the images in ``split``: a fixed interleaved 80/20 split."""
    is_test = np.arange(n) % TEST_EVERY == TEST_EVERY - 1
    return is_test if split == "test" else ~is_test


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 N x H x W images to size x size with Pillow."""
    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in images])


def read_digits(split: str, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Digits ``split`` as (uint8 N x 1 x size x size, int64 labels); pixels 0..16 scaled to 0..255."""
    if size not in DIGITS_SIZES:
        raise ConfigError(f"digits size must be one of {DIGITS_SIZES}, got {size}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    mask = digits_split_mask(len(bunch.target), split)
    images = np.rint(bunch.images[mask] * (255.0 / 16.0)).astype(np.uint8)
    if size != 8:
        images = _resize(images, size)
    return images[:, None], bunch.target[mask].astype(np.int64)
