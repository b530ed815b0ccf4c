"""Quantized weights of an IR node: unpacked codes, the per-channel codebook and their float weight."""

from __future__ import annotations

import math

import torch

from lowbit.errors import CheckpointError
from lowbit.export.ir import Node, _affine_codebook
from lowbit.export.pack import unpack_codes


def mask(node: Node) -> torch.Tensor | None:
    """The 0/1 keep map (float32, the weight's shape) of a pruned (sparse) weight, else None."""
    weight = node.attrs["weight"]
    if not weight.get("sparse"):
        return None
    return unpack_codes(node.tensors["mask"], 1, weight["shape"]).to(torch.float32)


def kept_count(node: Node) -> int:
    """How many codes a sparse weight stores (the ones of its keep map)."""
    keep = mask(node)
    return int(keep.sum()) if keep is not None else math.prod(node.attrs["weight"]["shape"])


def codes(node: Node) -> torch.Tensor:
    """The integer codes (uint8, the weight's shape; 0 where pruned), checked against the codebook size."""
    weight = node.attrs["weight"]
    keep = mask(node)
    if keep is None:
        unpacked = unpack_codes(node.tensors["codes"], weight["bits"], weight["shape"])
    else:
        unpacked = torch.zeros(weight["shape"], dtype=torch.uint8)
        unpacked[keep.bool()] = unpack_codes(node.tensors["codes"], weight["bits"], [int(keep.sum())])
    if unpacked.numel() and int(unpacked.max()) >= weight["levels"]:
        raise CheckpointError(
            f"node '{node.name}' has codes beyond its {weight['levels']} levels; the file is "
            "damaged, re-export it"
        )
    return unpacked


def codebook(node: Node) -> torch.Tensor:
    """(rows, levels) float32: affine rows ``scale * z + offset`` or the stored table."""
    weight = node.attrs["weight"]
    if weight["codebook"] == "affine":
        scale, offset = node.tensors["affine"]
        return _affine_codebook(scale, offset, weight["levels"])
    return node.tensors["codebook"].to(torch.float32)


def row_index(shape: torch.Size, channel_dim: int) -> torch.Tensor:
    """Codebook row of every weight element: its index along ``channel_dim``."""
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    return torch.arange(shape[channel_dim]).reshape(view).expand(shape)


def dequantized_weight(node: Node) -> torch.Tensor:
    """``codebook[row, code]``: exactly the weight the simulated quantized layer multiplies with."""
    unpacked = codes(node)
    book = codebook(node)
    channel_dim = node.attrs["weight"]["channel_dim"]
    book = book.expand(unpacked.shape[channel_dim], -1)
    weight = book[row_index(unpacked.shape, channel_dim), unpacked.long()]
    keep = mask(node)
    return weight if keep is None else weight * keep
