"""The model hub: every asset lowbit ships, found by name, each with its card.

Two kinds live under ``lowbit/assets``: ``pretrained`` GAN checkpoints (generator and discriminator
in one safetensors file with its JSON sidecar; noise GANs such as ``dcgan-mnist`` and image-to-image
GANs such as ``sr4-fashion``) and ``extractors``, the domain classifiers behind FID / IS / KID
(``<dataset>.safetensors`` + a JSON card). A pretrained checkpoint's card is
``<name>.card.json`` beside it when present (training command, scores) plus what its stored
config says. The trainer (``load_generator``), the pipeline and the metrics all ask this module,
so a new shipped asset is one file pair in one folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.config import closest
from lowbit.errors import CheckpointError

ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets"
KINDS = ("pretrained", "extractors")
CARD_SUFFIX = ".card.json"


@dataclass(frozen=True)
class Asset:
    """One shipped asset: its kind, name, weights file and card."""

    kind: str
    name: str
    weights: Path
    card: dict[str, Any] = field(default_factory=dict)


def asset_dir(kind: str) -> Path:
    """The folder holding the assets of ``kind`` (``pretrained`` or ``extractors``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown asset kind '{kind}'; valid: {', '.join(KINDS)}")
    return ASSET_ROOT / kind


def names(kind: str, directory: Path | None = None) -> list[str]:
    """Names of the shipped assets of ``kind`` (a weights file with its JSON beside it)."""
    folder = directory or asset_dir(kind)
    return sorted(p.stem for p in folder.glob("*.safetensors") if p.with_suffix(".json").is_file())


def _read_card(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def find(kind: str, name: str, directory: Path | None = None) -> Asset:
    """The shipped asset ``name`` of ``kind``; an unknown name lists the shipped ones."""
    folder = directory or asset_dir(kind)
    weights = folder / f"{name}.safetensors"
    if not (weights.is_file() and weights.with_suffix(".json").is_file()):
        shipped = names(kind, folder)
        raise CheckpointError(f"no shipped {kind} asset '{name}'{closest(name, shipped)}; shipped: "
                              f"{', '.join(shipped) or '(none)'}")
    card_path = folder / f"{name}{CARD_SUFFIX}" if kind == "pretrained" else weights.with_suffix(".json")
    return Asset(kind, name, weights, _read_card(card_path))


def catalogue() -> list[Asset]:
    """Every shipped asset of every kind, with its card (``lowbit data info``-style listings)."""
    return [find(kind, name) for kind in KINDS for name in names(kind)]
