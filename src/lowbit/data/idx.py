"""Reader for the IDX format of MNIST and Fashion-MNIST (``*-idx3-ubyte[.gz]``).

Layout (LeCun's MNIST page): two zero bytes, a type byte (0x08 = uint8), the number of
dimensions, one big-endian uint32 per dimension, then the row-major payload.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lowbit.errors import DataError

UINT8_TYPE = 0x08


def find_idx_file(root: Path, stem: str) -> Path:
    """The file ``root/stem`` or ``root/stem.gz``, whichever exists (DataError when neither)."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{root / stem}[.gz] not found; put the standard IDX files in {root} "
        "or pass --root DIR where they are (or run `lowbit data fetch`)"
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path or pass --root DIR") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupted gzip stream ({exc}); delete it and download it again") from None


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Decode IDX bytes into a uint8 array, checking magic number and payload length."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != UINT8_TYPE or data[3] == 0:
        raise DataError(
            f"{path}: not an IDX uint8 file (magic {data[:4].hex() or 'missing'}, expected 000008nn); "
            "pass the original *-idx?-ubyte[.gz] file"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header; delete it and download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX payload has {len(data) - header} bytes but the header {shape} needs {expected} "
            "(truncated or corrupted); delete it and download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array of the shape in its header."""
    path = Path(path)
    return parse_idx(_read_bytes(path), path)
