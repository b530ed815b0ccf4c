"""Domain feature extractors for FID/IS/KID: small CNN classifiers shipped with lowbit.

``extractor-28`` (28x28 grey: mnist, fashion-mnist) and ``extractor-8`` (8x8 sklearn digits) are
``FeatureClassifier`` nets: ``features(x)`` gives the penultimate 128-d features (FID, KID) and
``forward(x)`` the class logits (IS). Trained weights live in ``lowbit/assets/extractors`` as
``<dataset>.safetensors`` plus a JSON card (test accuracy, the exact training command, feature
dimension, architecture, SHA-256 of the weights); ``load_extractor(dataset)`` rebuilds one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.config import closest
from lowbit.errors import CheckpointError, ChecksumError, ConfigError
from lowbit.io import atomic_path, atomic_write_text, sha256_file
from lowbit.models import hub
from lowbit.models.classifiers import FeatureClassifier, check_positive, conv_bn_relu
from lowbit.models.registry import create_model, register_model

EXTRACTOR_DIR = hub.asset_dir("extractors")
FEATURE_DIM = 128


@register_model("extractor-28")
def extractor_28(in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = FEATURE_DIM
                 ) -> FeatureClassifier:
    """28x28 extractor: conv(w)-pool-conv(2w)-pool-conv(4w)-pool (28 -> 14 -> 7 -> 3), then a FC
    layer to ``feature_dim``."""
    check_positive("extractor-28", in_channels=in_channels, num_classes=num_classes, width=width,
                   feature_dim=feature_dim)
    body = nn.Sequential(
        *conv_bn_relu(in_channels, width), nn.MaxPool2d(2),
        *conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
        *conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * width * 3 * 3, feature_dim), nn.ReLU(),
    )
    return FeatureClassifier(body, feature_dim, num_classes)


@register_model("extractor-8")
def extractor_8(in_channels: int = 1, num_classes: int = 10, feature_dim: int = FEATURE_DIM
                ) -> FeatureClassifier:
    """8x8 extractor: conv32-conv64-pool (8 -> 4), FC to ``feature_dim``."""
    check_positive("extractor-8", in_channels=in_channels, num_classes=num_classes, feature_dim=feature_dim)
    body = nn.Sequential(
        *conv_bn_relu(in_channels, 32), *conv_bn_relu(32, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
    )
    return FeatureClassifier(body, feature_dim, num_classes)


def available_extractors(directory: Path = EXTRACTOR_DIR) -> list[str]:
    """Datasets that have a shipped extractor (a weights file and its card)."""
    return hub.names("extractors", directory)


def save_extractor(model: FeatureClassifier, dataset: str, card: dict[str, Any],
                   directory: Path = EXTRACTOR_DIR) -> Path:
    """Write ``<dataset>.safetensors`` (weights) and ``<dataset>.json`` (``card`` + architecture, feature
    dimension and weights SHA-256) atomically; returns the weights path."""
    weights = directory / f"{dataset}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "lowbit-extractor/1", "dataset": dataset})
    full_card = {**card, "dataset": dataset, "feature_dim": model.feature_dim,
                 "architecture": {"name": model.lowbit_name, "kwargs": model.lowbit_kwargs},
                 "weights": weights.name, "sha256": sha256_file(weights)}
    atomic_write_text(weights.with_suffix(".json"), json.dumps(full_card, indent=2) + "\n")
    for path in (weights, weights.with_suffix(".json")):
        path.chmod(0o644)  # package data: readable by every user of an installed lowbit
    return weights


def load_extractor(dataset: str, directory: Path = EXTRACTOR_DIR) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped extractor for ``dataset`` in eval mode, and its card; the weights' SHA-256 is checked."""
    try:
        asset = hub.find("extractors", dataset, directory)
    except CheckpointError:
        available = available_extractors(directory)
        raise ConfigError(f"no feature extractor for dataset '{dataset}'{closest(dataset, available)}; "
                          f"available: {', '.join(available) or 'none'}; train one with "
                          "`lowbit train-classifier` and ship_extractor (docs/classifiers.md)") from None
    weights, card, card_path = asset.weights, asset.card, asset.weights.with_suffix(".json")
    if sha256_file(weights) != card["sha256"]:
        raise ChecksumError(f"{weights}: SHA-256 differs from its card {card_path.name}; the file is "
                            "damaged, reinstall lowbit or retrain the extractor")
    model = create_model(card["architecture"]["name"], **card["architecture"]["kwargs"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not fit {card['architecture']} ({exc}); "
                              "retrain the extractor") from None
    return model.eval(), card
