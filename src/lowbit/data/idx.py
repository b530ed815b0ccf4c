"""Reader for the IDX format of MNIST and Fashion-MNIST (``*-idx3-ubyte[.gz]``).

Layout (LeCun's MNIST page): two zero bytes, a type byte (0x08 = uint8), the number of
dimensions, one big-endian uint32 per dimension, then the row-major payload. Reading is bounded:
the header's declared size must stay within ``$LOWBIT_MAX_DATA_BYTES`` and no more than the
declared payload (+1 byte, to detect excess) is ever decompressed, so a gzip bomb cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lowbit.errors import DataError, LimitError
from lowbit.limits import env_name, limit

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


def _declared_size(head: bytes, path: Path) -> int:
    """Payload bytes the IDX header ``head`` declares, bounded by the data-size limit."""
    if head[:3] != bytes([0, 0, UINT8_TYPE]) or len(head) < 4:
        return 0  # not an IDX header: parse_idx names the bad magic number
    ndim = head[3]
    shape = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(shape, dtype=object)) if shape else 0
    if size > limit("data_bytes"):
        raise LimitError(f"{path}: the IDX header declares {size:,} bytes of data, beyond the limit of "
                         f"{limit('data_bytes'):,}; is it a damaged file? (raise {env_name('data_bytes')})")
    return size


def _read_bytes(path: Path) -> bytes:
    """The file's bytes (gunzipped when the name ends in .gz), read no further than the header's declared
    payload plus one byte."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            head = handle.read(4)
            head += handle.read(4 * head[3]) if len(head) == 4 else b""
            return head + handle.read(_declared_size(head, path) + 1)
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
