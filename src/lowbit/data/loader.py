"""A seeded DataLoader over in-memory tensors."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """Batches of (images, labels); the shuffle order depends only on ``seed`` (reproducible runs)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, generator=generator)
