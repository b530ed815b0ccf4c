"""Small file helpers shared by every layer: atomic writes, SHA-256, the cache directory."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from safetensors import SafetensorError

from lowbit.errors import OutputError

#: errors a write into an already-created temporary file can hit (others pass through unchanged)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "write to a file system that allows larger files",
    errno.EROFS: "write to a writable location",
    errno.EACCES: "write to a location you may write to",
    errno.EPERM: "write to a location you may write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "the output name is a directory; give a file name",
    errno.ENAMETOOLONG: "use a shorter path",
}
_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")


def cache_dir() -> Path:
    """Where lowbit keeps derived data (converted datasets, reference statistics).

    ``$LOWBIT_CACHE`` overrides the default ``~/.cache/lowbit``.
    """
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _current_umask() -> int:
    """The process umask (read by setting and restoring it), so atomic files get normal permissions."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves the previous file untouched and no
    temporary file behind. Any OS error of the helper itself (making the directory, the temporary file,
    the rename), and a disk-full / read-only / I/O error inside the block, becomes one OutputError
    naming ``target``.
    """
    target = Path(target)
    with output_errors(target):
        if target.is_dir():
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_current_umask())
    tmp_path = Path(tmp)
    try:
        with output_errors(target, WRITE_ERRNOS), _safetensors_write_errors(target):
            yield tmp_path
        with output_errors(target):
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def output_error(target: str | os.PathLike, exc: OSError) -> OutputError:
    """The one-line OutputError for an OS error met while writing ``target``."""
    code = errno.ENOTDIR if exc.errno == errno.EEXIST else exc.errno  # mkdir over a file says "exists"
    fix = _FIXES.get(code or 0, "check the path and the disk")
    reason = os.strerror(code) if code else (exc.strerror or str(exc))
    return OutputError(f"cannot write {target}: {reason}; {fix}")


@contextlib.contextmanager
def output_errors(target: str | os.PathLike, errnos: set[int] | None = None) -> Iterator[None]:
    """Turn an OSError (with an errno in ``errnos``; any when None) into an OutputError."""
    try:
        yield
    except OSError as exc:
        if errnos is not None and exc.errno not in errnos:
            raise
        raise output_error(target, exc) from None


@contextlib.contextmanager
def _safetensors_write_errors(target: str | os.PathLike) -> Iterator[None]:
    """safetensors reports a failed write (disk full, ...) as a SafetensorError carrying the OS error
    number: turn it into the OutputError an OSError would give."""
    try:
        yield
    except SafetensorError as exc:
        found = _OS_ERROR_NUMBER.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise output_error(target, OSError(code, os.strerror(code))) from None


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_csv(target: str | os.PathLike, rows: Iterable[Mapping[str, object]], columns: Sequence[str],
                     restval: object = "", extrasaction: str = "raise") -> None:
    """Write ``rows`` as CSV under a header of ``columns`` to ``target`` atomically (DictWriter options)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval=restval, extrasaction=extrasaction)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(target, buffer.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
