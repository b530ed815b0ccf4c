"""Public API of the packed format: export a converted model, load it back, sample from a generator."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.format import (
    PackedModel,
    build_model,
    encode_model,
    read_packed,
    set_kernel_path,
    write_packed,
)


def export_packed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a lowbit.convert-ed nn.Sequential) as a packed file; returns the path.

    Quantized layers are frozen with ``lowbit.nn.freeze`` and stored as bit-packed codes + codebooks;
    layers left in full precision (and batch norms) are stored as float32 tensors.
    """
    from lowbit.nn import freeze

    architecture, tensors = encode_model(model, freeze(model))
    return write_packed(architecture, tensors, path)


def load(path: str | os.PathLike, kernel_path: str | None = None) -> PackedModel:
    """Rebuild a packed model for inference (no training code, no pickle), in eval mode.

    ``kernel_path`` picks the binary-layer implementation: "auto" (default, or ``$LOWBIT_KERNEL_PATH``),
    "avx512", "avx2", "scalar" or "torch" (pure-torch fallback, always available).
    """
    architecture, tensors = read_packed(path)
    model = build_model(architecture, tensors)
    set_kernel_path(model, kernel_path)
    return model


def sample(model: nn.Module, n: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """``n`` images from a generator (packed or not) for latents z ~ N(0, I) drawn with ``seed``."""
    latent = getattr(model, "latent_dim", None)
    if not latent:
        raise ConfigError(
            "sampling needs a generator with a latent_dim; this model has none (is it a classifier?)"
        )
    if n < 1 or batch_size < 1:
        raise ConfigError(f"sample count and batch size must be positive, got n={n}, batch_size={batch_size}")
    z = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))  # on the CPU: same z everywhere
    device = next(itertools.chain(model.parameters(), model.buffers()), z).device
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk.to(device)).cpu() for chunk in z.split(batch_size)])
