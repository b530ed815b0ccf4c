"""SHA-256 verification shared by the MNIST preparation and ``lowbit data fetch``."""

from __future__ import annotations

from lowbit.errors import ChecksumError


def check_sha256(actual: str, expected: str, source: object, fix: str) -> None:
    """Raise ChecksumError naming ``source`` and ``fix`` when the digests differ."""
    if actual.lower() != expected.lower():
        raise ChecksumError(f"{source}: SHA-256 {actual} does not match the expected {expected}; {fix}")
