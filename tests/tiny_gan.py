"""The tiny DCGAN (16x16 sklearn digits, width 8) that the GAN tests train in a fraction of a second."""

from __future__ import annotations

from typing import Any


def tiny_gan(**changes: Any) -> dict[str, Any]:
    """A GanConfig mapping for the tiny DCGAN; ``changes`` replace top-level keys."""
    data: dict[str, Any] = {
        "name": "tiny",
        "data": {"dataset": "digits", "options": {"size": 16}},
        "generator": {"model": "dcgan-g-16", "kwargs": {"width": 8, "latent_dim": 16}},
        "discriminator": {"model": "dcgan-d-16", "kwargs": {"width": 8}},
        "steps": 20,
        "batch_size": 32,
        "log_every": 5,
        "sample_every": 10,
        "checkpoint_every": 10,
    }
    data.update(changes)
    return data
