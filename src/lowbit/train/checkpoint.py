"""Checkpoints as safetensors + a JSON sidecar: no pickle anywhere.

``save_checkpoint(path, state)`` stores every tensor of a nested state (model/optimizer
state dicts, RNG states) in ``path`` (safetensors) and everything else (the nesting, numbers,
strings, the config) in ``path.with_suffix('.json')``. Both files are written atomically, the
sidecar last and carrying the SHA-256 of the tensor file, so a torn or tampered pair is detected.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import CheckpointError
from lowbit.io import atomic_path, atomic_write_text, sha256_file
from lowbit.limits import env_name, limit

FORMAT = "lowbit-checkpoint/1"
_TENSOR = "__tensor__"
#: deepest nesting a sidecar's state may have (a real checkpoint has < 10 levels)
MAX_DEPTH = 64
#: what a damaged checkpoint's content raises when a reader uses it (turned into CheckpointError)
CONTENT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


class _Malformed(Exception):
    """A sidecar's state does not follow the checkpoint schema (internal; becomes a CheckpointError)."""


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


def _unflatten(node: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """Rebuild the nested state from its JSON skeleton, checking the schema as it goes."""
    if depth > MAX_DEPTH:
        raise _Malformed(f"state nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        if _TENSOR in node:
            name = node[_TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise _Malformed(f"names tensor {name!r}, which is not in the tensor file")
            return tensors[name]
        if "__dict__" in node:
            return _unflatten_dict(node["__dict__"], tensors, depth)
        if "__tuple__" in node:
            if not isinstance(node["__tuple__"], list):
                raise _Malformed("a '__tuple__' entry is not a list")
            return tuple(_unflatten(v, tensors, depth + 1) for v in node["__tuple__"])
        return {k: _unflatten(v, tensors, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors, depth + 1) for v in node]
    return node


def _unflatten_dict(pairs: Any, tensors: dict[str, torch.Tensor], depth: int) -> dict[Any, Any]:
    """A ``__dict__`` entry: a list of [key, value] pairs with hashable keys."""
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise _Malformed("a '__dict__' entry is not a list of [key, value] pairs")
    result = {}
    for raw_key, raw_value in pairs:
        key = _key(_unflatten(raw_key, tensors, depth + 1))
        try:
            hash(key)
        except TypeError:
            raise _Malformed(f"a '__dict__' key {key!r} is not a plain value") from None
        result[key] = _unflatten(raw_value, tensors, depth + 1)
    return result


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


def _read_sidecar(side: Path) -> dict[str, Any]:
    """The sidecar's JSON, checked for size, syntax, nesting and its top-level schema."""
    bound = limit("sidecar_bytes")
    if side.stat().st_size > bound:
        raise CheckpointError(f"{side}: {side.stat().st_size:,} bytes exceed the sidecar limit of {bound:,}; "
                              f"is this a lowbit checkpoint? (raise it with {env_name('sidecar_bytes')})")
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: corrupted checkpoint sidecar ({exc}); restore it or "
                              "retrain") from None
    except RecursionError:
        raise CheckpointError(f"{side}: corrupted checkpoint sidecar (nested too deeply); restore it or "
                              "retrain") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{side}: not a {FORMAT} sidecar; was this file written by lowbit?")
    for key, kind in (("sha256", str), ("state", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{side}: field '{key}' is missing or not a {kind.__name__}; the "
                                  "sidecar is damaged, restore it or retrain")
    return meta


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; any damage is a CheckpointError naming the file.

    The sidecar is checked against the schema (top-level fields and types, nesting depth, every tensor
    it names present in the tensor file) and the tensor file against the sidecar's SHA-256; the
    safetensors reader bounds every declared tensor size by the file's real size.
    """
    path = Path(path)
    side = sidecar_path(path)
    for need in (path, side):
        if not need.is_file():
            raise CheckpointError(f"checkpoint file missing: {need}; pass the .safetensors file of a "
                                  "lowbit checkpoint (its .json sidecar must lie beside it)")
    meta = _read_sidecar(side)
    if sha256_file(path) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch with {side.name} (truncated or modified); "
                              "restore the file or retrain")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    try:
        state = _unflatten(meta["state"], tensors)
        if not isinstance(state, dict):
            raise _Malformed(f"is a {type(state).__name__}, not a mapping")
    except _Malformed as exc:
        raise CheckpointError(f"{side}: field 'state' {exc}; the sidecar is damaged, restore it or "
                              "retrain") from None
    return state


@contextlib.contextmanager
def checkpoint_content(path: str | Path) -> Iterator[None]:
    """Turn a failure while using a loaded checkpoint's content (a missing entry, a wrong type or
    shape) into one CheckpointError naming ``path``, instead of a KeyError/TypeError traceback."""
    try:
        yield
    except CONTENT_ERRORS as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise CheckpointError(f"{path}: checkpoint content does not fit ({detail}); use a checkpoint "
                              "written by this lowbit version for the same config") from None


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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, turning a shape/key mismatch into a CheckpointError that names ``source``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{source} does not fit {getattr(model, 'lowbit_name', 'the model')} ({first}); "
            "use a checkpoint of the same architecture and quantization"
        ) from None
