"""Run-directory lock: one process at a time writes a run directory.

``RunDirLock(run_dir)`` holds an exclusive ``flock`` on ``run_dir/.lowbit.lock``, a file that names the
holder (PID, host, start time). A second process is refused with RunDirLockedError naming the holder.
The kernel drops the lock when its holder dies, so the lock file of a killed run is stale: the next
run detects that nobody holds it, says so and takes it over. ``locks_run_dir`` decorates a training
entry point so that it holds the lock of the directory it writes for the whole call (rank 0 only).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lowbit.errors import RunDirLockedError
from lowbit.io import output_errors

LOCK_NAME = ".lowbit.lock"
F = TypeVar("F", bound=Callable[..., Any])


def _holder_text(fd: int) -> dict[str, Any]:
    """What the lock file at ``fd`` says about its holder ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


class RunDirLock:
    """An exclusive lock on a run directory, held from ``acquire`` (or ``with``) until ``release``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # directories this lock made, deepest first

    def acquire(self) -> RunDirLock:
        """Take the lock (creating the directory); refuse if a live process holds it."""
        with output_errors(self.run_dir):
            self.created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                self.fd = self._try_open()
        previous = _holder_text(self.fd)
        if previous:
            print(f"note: {self.run_dir}: taking over the stale lock of {_describe(previous)}, which is no "
                  "longer running", file=sys.stderr)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record.encode("utf-8"), 0)
        return self

    def _try_open(self) -> int | None:
        """An fd holding the flock of the current lock file, or None to retry (it was replaced meanwhile)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunDirLockedError(
                f"{self.run_dir} is in use by another lowbit process ({_describe(holder)}); wait for it to "
                "finish, stop it, or choose another output directory") from None
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: lock the new one
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """Drop the lock, remove the lock file, and the directories this lock created if they are empty."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):
            for directory in self.created:
                directory.rmdir()

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_main_process() -> bool:
    """False on the non-zero ranks of a torch.distributed run (only rank 0 writes the run directory)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def locks_run_dir(run_dir_of: Callable[[dict[str, Any]], str | os.PathLike]) -> Callable[[F], F]:
    """Decorate ``fn`` so each call holds the lock of ``run_dir_of(arguments)`` (arguments by name, with
    defaults applied) for its whole duration."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            if not _is_main_process():
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with RunDirLock(run_dir_of(bound.arguments)):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
