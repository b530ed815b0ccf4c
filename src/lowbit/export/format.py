"""The packed file: the IR's tensors in safetensors plus four metadata strings, read back without trusting it.

Metadata: ``lowbit.format`` ("lowbit-packed"), ``lowbit.format_version`` (2; version-1 files, a chain of
layers, are converted to the IR on load), ``lowbit.architecture`` (the IR as JSON) and ``lowbit.checksum``
(SHA-256 over every tensor and the JSON). Reading checks the header against the file size before anything is
allocated, then every node against ``validate.check_graph``. The full specification is docs/export.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import CheckpointError, ChecksumError
from lowbit.export import v1
from lowbit.export.ir import Graph, Node
from lowbit.export.validate import check_graph, node_from_json
from lowbit.io import atomic_path

FORMAT_NAME = "lowbit-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
META_FORMAT = "lowbit.format"
META_VERSION = "lowbit.format_version"
META_ARCH = "lowbit.architecture"
META_CHECKSUM = "lowbit.checksum"
#: the safetensors JSON header may not exceed this (the IR of a large generator is a few hundred KB).
MAX_HEADER_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 32


def checksum(tensors: dict[str, torch.Tensor], architecture_json: str) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes; sorted by name) and the architecture JSON."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(architecture_json.encode())
    return digest.hexdigest()


def write_graph(graph: Graph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as a version-2 packed file, atomically (compact JSON keeps the metadata small)."""
    tensors = graph.tensors()
    arch_json = json.dumps(graph.to_json(), separators=(",", ":"), sort_keys=True)
    metadata = {
        META_FORMAT: FORMAT_NAME,
        META_VERSION: str(FORMAT_VERSION),
        META_ARCH: arch_json,
        META_CHECKSUM: checksum(tensors, arch_json),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid lowbit packed model ({what}); the file is truncated, damaged "
        "or not a lowbit export: re-export it with `lowbit export`"
    )


def _header(path: Path, check_offsets: bool = True) -> dict[str, Any]:
    """The safetensors JSON header, checked against the file's real size before any tensor is read."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _damaged(path, f"only {size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _damaged(path, f"header claims {length} bytes but the file has {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(path, f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__" or not check_offsets:
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise _damaged(path, f"tensor '{name}' lies outside the file")
    return header


def _metadata(header: dict[str, Any], path: Path) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if (
        not isinstance(metadata, dict)
        or metadata.get(META_FORMAT) != FORMAT_NAME
        or META_ARCH not in metadata
        or META_CHECKSUM not in metadata
    ):
        raise CheckpointError(
            f"{path} is not a lowbit packed model (no '{FORMAT_NAME}' metadata); create one with "
            "`lowbit export` or lowbit.export.export_packed"
        )
    version = metadata.get(META_VERSION, "")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} uses packed format version {version!r} but this lowbit reads versions "
            f"{', '.join(READABLE_VERSIONS)}; install a newer lowbit, or re-export the model "
            "with this one"
        )
    return metadata


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(item, level + 1) for item in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(item, level + 1) for item in value), default=level)
    return level


def _architecture(arch_json: str, path: Path) -> dict[str, Any]:
    try:
        architecture = json.loads(arch_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _damaged(path, f"architecture is not JSON: {exc}") from None
    if not isinstance(architecture, dict) or _depth(architecture) > MAX_JSON_DEPTH:
        raise _damaged(path, "architecture is not a JSON object of bounded depth")
    return architecture


def read_graph(path: str | os.PathLike) -> Graph:
    """The IR of a packed file (version 1 or 2) after checking its header, checksum and every node."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed model not found: {path}; create it with `lowbit export`")
    metadata = _metadata(_header(path), path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    arch_json = metadata[META_ARCH]
    if checksum(tensors, arch_json) != metadata[META_CHECKSUM]:
        raise ChecksumError(
            f"{path} does not match its checksum: the file was modified or damaged after export; "
            "re-export it from the checkpoint"
        )
    architecture = _architecture(arch_json, path)
    try:
        if metadata[META_VERSION] == "1":
            graph = v1.to_graph(architecture, tensors)
        else:
            graph = _graph_v2(architecture, tensors)
        check_graph(graph)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return graph


def _graph_v2(architecture: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Graph:
    nodes_json = architecture.get("nodes")
    if not isinstance(nodes_json, list):
        raise CheckpointError("the architecture has no node list; re-export the model")
    nodes: list[Node] = [node_from_json(item, tensors) for item in nodes_json]
    meta = {key: architecture.get(key) for key in ("model", "model_kwargs", "image_shape", "class_name")}
    return Graph(
        nodes,
        architecture.get("output"),
        architecture.get("input_shape"),
        architecture.get("output_shape"),
        meta,
    )


def is_packed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file carrying the packed-format metadata (cheap: reads the header only)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return (_header(path, check_offsets=False).get("__metadata__") or {}).get(META_FORMAT) == FORMAT_NAME
    except (CheckpointError, OSError, AttributeError):
        return False
