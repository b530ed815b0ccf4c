"""Feature networks for FID / IS / KID: the shipped domain classifiers, any classifier, or Inception-v3.

An ``Extractor`` bundles a module whose ``features(x)`` gives the penultimate features (FID, KID)
and whose ``forward(x)`` gives class logits (IS), with the name and weight hash that every
reported number and every cached reference statistic carries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError

INCEPTION_NAME = "inception-v3-fid"


@dataclass(frozen=True)
class Extractor:
    """Feature network on [-1, 1] images: ``module.features(x)`` -> features, ``module(x)`` -> logits."""

    module: nn.Module
    name: str
    sha256: str
    num_features: int
    card: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None  # C x H x W it accepts; None = any size (resized inside)

    @property
    def label(self) -> str:
        """The short name printed beside every score, e.g. ``mnist-classifier@1a2b3c4d``."""
        return f"{self.name}@{self.sha256[:8]}"


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict (its identity)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _probe_num_features(module: nn.Module, image_shape: tuple[int, ...]) -> int:
    probe = torch.zeros(2, *image_shape, device=module_device(module))
    features = module.features(probe)
    if features.dim() != 2:
        raise ConfigError(
            f"extractor features must be N x D, got shape {tuple(features.shape)}; "
            "make features() return flattened penultimate activations"
        )
    return int(features.shape[1])


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a parameter-free module)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def extractor_from_module(
    module: nn.Module, name: str, image_shape: tuple[int, ...], card: dict[str, Any] | None = None
) -> Extractor:
    """Wrap any classifier with ``features()`` and logits ``forward()`` as an Extractor (in eval mode)."""
    if not callable(getattr(module, "features", None)):
        raise ConfigError(
            f"extractor '{name}' has no features() method; give the classifier a "
            "features(x) -> penultimate activations method"
        )
    module.eval()
    return Extractor(
        module,
        name,
        state_dict_sha256(module),
        _probe_num_features(module, image_shape),
        dict(card or {}),
        tuple(image_shape),
    )


def domain_extractor(dataset: str) -> Extractor:
    """The classifier lowbit ships for ``dataset`` (mnist, fashion-mnist, digits), with its card."""
    from lowbit.data import load
    from lowbit.models.extractor import load_extractor

    module, card = load_extractor(dataset)
    images, _ = load(dataset, "test", limit=1)
    image_shape = tuple(images.shape[1:])
    name = f"{card.get('architecture', {}).get('name', 'classifier')}/{dataset}"
    return Extractor(
        module.eval(),
        name,
        card.get("sha256") or state_dict_sha256(module),
        _probe_num_features(module, image_shape),
        card,
        image_shape,
    )


def resolve_extractor(
    dataset: str, extractor: Extractor | None = None, inception_weights: str | Path | None = None
) -> Extractor:
    """The extractor to use: an explicit one, Inception-v3 from a weights file, or the dataset's own."""
    if extractor is not None and inception_weights is not None:
        raise ConfigError("give either an extractor or inception weights, not both")
    if extractor is not None:
        return extractor
    if inception_weights is not None:
        from lowbit.metrics.inception import load_inception

        module = load_inception(inception_weights)
        return Extractor(
            module,
            INCEPTION_NAME,
            state_dict_sha256(module),
            module.num_features,
            {"weights": str(inception_weights)},
        )
    return domain_extractor(dataset)
