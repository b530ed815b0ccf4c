"""The input layout of a model from what it records about itself (export and pruning both run a forward)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError


def default_example(model: nn.Module) -> torch.Tensor:
    """A one-sample input from the model's recorded ``latent_dim``, ``input_shape`` or ``image_shape``."""
    latent = getattr(model, "latent_dim", None)
    if latent:
        return torch.randn(1, int(latent), generator=torch.Generator().manual_seed(0))
    shape = getattr(model, "input_shape", None) or getattr(model, "image_shape", None)
    if shape:
        return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    raise ConfigError(
        f"{type(model).__name__} has no latent_dim, input_shape or image_shape, so the input layout is "
        "unknown; pass example_input, e.g. torch.randn(1, 100, 1, 1) for a DCGAN generator or "
        "torch.randn(1, 3, 64, 64) for an image-to-image generator"
    )
