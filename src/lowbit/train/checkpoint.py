"""Checkpoints as safetensors + a JSON sidecar: no pickle anywhere.

``save_checkpoint(path, state)`` stores every tensor of a nested state (model/optimizer
state dicts, RNG states) in ``path`` (safetensors) and everything else (the nesting, numbers,
strings, the config) in ``path.with_suffix('.json')``. Both files are written atomically, the
sidecar last and carrying the SHA-256 of the tensor file, so a torn or tampered pair is detected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowbit.errors import CheckpointError
from lowbit.io import atomic_path, atomic_write_text, sha256_file

FORMAT = "lowbit-checkpoint/1"
_TENSOR = "__tensor__"


def _flatten(node: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``node`` by a reference and collect it in ``tensors``."""
    if isinstance(node, torch.Tensor):
        key = prefix or "root"
        tensors[key] = node.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(node, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}/k{i}", tensors), _flatten(v, f"{prefix}/{i}", tensors)]
                             for i, (k, v) in enumerate(node.items())]}
    if isinstance(node, (list, tuple)):
        items = [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(node)]
        return {"__tuple__": items} if isinstance(node, tuple) else items
    if isinstance(node, (str, int, float, bool)) or node is None:
        return node
    raise CheckpointError(f"cannot store a {type(node).__name__} in a checkpoint at '{prefix}'")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if _TENSOR in node:
            return tensors[node[_TENSOR]]
        if "__dict__" in node:
            return {_key(_unflatten(k, tensors)): _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__tuple__" in node:
            return tuple(_unflatten(v, tensors) for v in node["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar that belongs to a checkpoint's safetensors file."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (nested dicts/lists of tensors and plain values) to ``path``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        digest = sha256_file(tmp)
    atomic_write_text(sidecar_path(path), json.dumps({"format": FORMAT, "sha256": digest, "state": skeleton},
                                                     indent=1))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; any damage is a CheckpointError naming the file."""
    path = Path(path)
    side = sidecar_path(path)
    for need in (path, side):
        if not need.is_file():
            raise CheckpointError(f"checkpoint file missing: {need}; pass the .safetensors file of a "
                                  "lowbit checkpoint (its .json sidecar must lie beside it)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{side}: corrupted checkpoint sidecar ({exc}); restore it or retrain"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{side}: not a {FORMAT} sidecar; was this file written by lowbit?")
    if sha256_file(path) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch with {side.name} (truncated or modified); "
                              "restore the file or retrain")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    return _unflatten(meta["state"], tensors)


def rng_state() -> dict[str, Any]:
    """Snapshot of the torch, numpy and Python RNGs, storable in a checkpoint."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG snapshot taken by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value
