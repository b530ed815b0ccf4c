"""Bit packing of integer codes: k-bit values (k in 1, 2, 4, 8) stored 8/k to a uint8 byte.

Layout: the flattened codes fill each byte from its least significant bit upwards, value j of a
byte at bits [j*k, (j+1)*k); the last byte is zero-padded. Widths 3, 5, 6, 7 are stored in the next
supported width (``storage_bits``) so every value stays byte-aligned and unpacking is a shift/mask.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import CheckpointError, ConfigError

PACK_WIDTHS = (1, 2, 4, 8)


def storage_bits(bits: int) -> int:
    """The packed width used for ``bits``-bit codes: the smallest of 1, 2, 4, 8 that holds them."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"codes of {bits!r} bits cannot be packed; use 1 to 8 bits per value")
    return next(width for width in PACK_WIDTHS if width >= bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits occupy once packed."""
    return math.ceil(count * storage_bits(bits) / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor (see the module docstring)."""
    width = storage_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ConfigError(
            f"codes must lie in [0, {2**bits}) to be packed at {bits} bits; "
            "re-freeze the model with the bit-width it was trained at"
        )
    per_byte = 8 // width
    padded = torch.zeros(math.ceil(flat.numel() / per_byte) * per_byte, dtype=torch.int64)
    padded[: flat.numel()] = flat
    shifts = torch.arange(per_byte, dtype=torch.int64) * width
    return (padded.reshape(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of ``pack_codes``: a uint8 tensor of ``shape`` with the original codes."""
    width = storage_bits(bits)
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(count, bits):
        raise CheckpointError(
            f"packed codes hold {packed.numel()} bytes ({packed.dtype}) but {count} values "
            f"of {bits} bits need {packed_nbytes(count, bits)} uint8 bytes; "
            "the file is damaged, re-export it"
        )
    shifts = torch.arange(8 // width, dtype=torch.int64) * width
    values = (packed.to(torch.int64).reshape(-1, 1) >> shifts) & (2**width - 1)
    return values.reshape(-1)[:count].to(torch.uint8).reshape(tuple(shape))
