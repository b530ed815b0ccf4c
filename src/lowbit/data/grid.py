"""Sample grids: tile N x C x H x W images in [-1, 1] into one PNG (what torchvision's save_image did)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lowbit.errors import ConfigError, DataError
from lowbit.io import atomic_path


def tile_images(images: torch.Tensor | np.ndarray, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """A uint8 H x W x C mosaic of ``images`` (values in [-1, 1]), ``nrow`` images per row, black gaps."""
    if nrow < 1 or padding < 0:
        raise ConfigError(f"image grid: need nrow >= 1 (images per row) and padding >= 0, got {nrow}, "
                          f"{padding}")
    batch = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if batch.ndim != 4 or batch.shape[1] not in (1, 3) or batch.shape[0] == 0:
        raise DataError(f"image grid needs a non-empty N x C x H x W batch with 1 or 3 channels, "
                        f"got shape {tuple(batch.shape)}")
    pixels = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, height, width, channels = pixels.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    mosaic = np.zeros((rows * (height + padding) + padding, cols * (width + padding) + padding, channels),
                      dtype=np.uint8)
    for index, image in enumerate(pixels):
        top = padding + (index // cols) * (height + padding)
        left = padding + (index % cols) * (width + padding)
        mosaic[top : top + height, left : left + width] = image
    return mosaic


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8,
                    padding: int = 2) -> Path:
    """Write ``images`` (N x C x H x W in [-1, 1]) as a PNG grid of ``nrow`` columns, atomically."""
    mosaic = tile_images(images, nrow, padding)
    picture = Image.fromarray(mosaic[..., 0] if mosaic.shape[2] == 1 else mosaic)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
