"""Resource bounds: sample counts, decompressed sizes, config sizes and YAML expansion.

Each bound has a default and an environment variable that raises it (``LOWBIT_MAX_<NAME>``), so a
typo such as ``-n 1000000000`` is a clear error instead of an allocation of hundreds of GB.
"""

from __future__ import annotations

import os

from lowbit.errors import LimitError

DEFAULTS = {
    "samples": 1_000_000,  # generated images scored by eval / a run (FID on 1M samples is ~2 GB of features)
    "grid_samples": 10_000,  # images in one `lowbit generate` grid (a 100 x 100 mosaic)
    "batch": 65_536,  # images per forward pass
    "image_size": 4096,  # side of a resized / padded training image (CelebA runs use 64-128)
    "kid_subsets": 10_000,  # KID subsets (each one costs a kernel matrix of up to 1000 x 1000)
    "data_bytes": 4 << 30,  # decompressed bytes of one dataset file (MNIST train is 47 MB)
    "config_bytes": 1 << 20,  # bytes of a YAML config file
    "yaml_nodes": 100_000,  # YAML nodes after expanding aliases (a shipped config has < 200)
    "yaml_depth": 64,  # nesting depth of a YAML document
    "sidecar_bytes": 256 << 20,  # bytes of a checkpoint's JSON sidecar (a DCGAN's is ~100 kB)
}


def env_name(name: str) -> str:
    """The environment variable that overrides bound ``name``."""
    return f"LOWBIT_MAX_{name.upper()}"


def limit(name: str) -> int:
    """The bound ``name``: ``$LOWBIT_MAX_<NAME>`` when set to a positive integer, else the default."""
    raw = os.environ.get(env_name(name))
    if raw is None:
        return DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise LimitError(f"{env_name(name)}={raw!r} must be a positive integer; fix or unset it")
    return value


def check_count(what: str, value: int, name: str, minimum: int = 1) -> int:
    """``value`` if it lies in [minimum, bound ``name``], else a LimitError saying how to raise the bound."""
    if value < minimum:
        raise LimitError(f"{what} must be >= {minimum}, got {value}")
    bound = limit(name)
    if value > bound:
        raise LimitError(f"{what} = {value:,} exceeds the limit of {bound:,}; ask for fewer, or raise the "
                         f"limit with the environment variable {env_name(name)}")
    return value
