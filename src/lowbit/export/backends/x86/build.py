"""The bit-serial C++ kernels: compiled on first use into the lowbit cache, dispatched per CPU at run time.

``csrc/`` holds the shared ``kernels.h``, one file per ISA (``scalar.cpp``, ``avx2.cpp``, ``avx512.cpp``,
``neon.cpp``; each builds only on its CPU family), the torch-free driver ``driver.cpp`` (also compiled into
the native runtime, ``runtime/``) and the torch binding ``bitserial.cpp``, built with ``-O3`` and no
``-march`` flag; the AVX-512 VPOPCNTDQ and AVX2 loops carry function-level target attributes and are only
called when cpuid says the CPU has them.
When no C++ compiler is available the packed model runs on the pure-torch path instead (unpacked weights,
float convolutions) and says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lowbit.config import unknown_name_error
from lowbit.errors import ConfigError
from lowbit.io import cache_dir

#: kernel paths by their id in the C++ code (index = id); "torch" is the compiler-free fallback. The native
#: runtime's Makefile reads this line too (runtime/path_defines.sh), so it stays the one definition.
KERNEL_PATHS = ("scalar", "avx2", "avx512", "neon")
TORCH_PATH = "torch"
CSRC = Path(__file__).parent / "csrc"
#: the integer path (int8.h): its binding, driver, roofline probes and one file per ISA.
INT8_SOURCES = (
    "int8_torch.cpp",
    "int8_driver.cpp",
    "int8_roofline.cpp",
    "int8_scalar.cpp",
    "int8_avx2.cpp",
    "int8_avx512.cpp",
    "int8_neon.cpp",
)
#: the torch binding first, the shared driver, then one file per ISA; kernels.h is shared by all.
SOURCES = ("bitserial.cpp", "driver.cpp", "scalar.cpp", "avx2.cpp", "avx512.cpp", "neon.cpp", *INT8_SOURCES)
#: environment variable that picks the default path ("auto", "avx512", "avx2", "scalar", "torch").
PATH_ENV = "LOWBIT_KERNEL_PATH"
#: a build lock older than this (seconds) was left by a killed build.
STALE_LOCK_S = 600

_LOADED: dict[str, Any] = {}


def _build_directory() -> Path:
    """A cache folder keyed by the source hash and the torch version, so edits and upgrades rebuild."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.iterdir()))).hexdigest()[:12]
    folder = cache_dir() / "kernels" / f"bitserial-{digest}-torch{torch.__version__.replace('+', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    _drop_stale_lock(folder / "lock")
    return folder


def _drop_stale_lock(lock: Path) -> None:
    """torch's build lock is a plain file; one left by a killed build would make every later build wait
    forever, so a lock older than any real build is removed."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()


def _compile() -> Any:
    """Build (or reuse the cached build of) the extension and return its ``torch.ops`` namespace."""
    from torch.utils.cpp_extension import load

    load(
        name="lowbit_bitserial",
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=["-O3", "-ffp-contract=off", *path_defines()],
        build_directory=str(_build_directory()),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.lowbit_bitserial


def path_defines() -> list[str]:
    """The kernel-path ids as compiler defines: KERNEL_PATHS is their one definition."""
    return [f"-DLOWBIT_PATH_{name.upper()}={index}" for index, name in enumerate(KERNEL_PATHS)]


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def kernel_ops() -> Any | None:
    """The compiled kernels, or None when they cannot be built here (warns once, then stays silent)."""
    if "ops" not in _LOADED:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            reason = f"no C++ compiler '{compiler}' on PATH"
            ops = None
        else:
            try:
                ops, reason = _compile(), ""
            except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
                ops, reason = None, _first_line(exc)
        if ops is None:
            warnings.warn(
                f"lowbit: bit-serial C++ kernels unavailable ({reason}); packed models run on the "
                "slower pure-torch path. Install a C++ compiler (g++) to enable them.",
                RuntimeWarning,
                stacklevel=2,
            )
        _LOADED["ops"] = ops
    return _LOADED["ops"]


def available_paths() -> list[str]:
    """Kernel paths this machine can run, fastest first; "torch" (the fallback) is always last."""
    ops = kernel_ops()
    mask = int(ops.supported_paths()) if ops is not None else 0
    return [name for i, name in reversed(list(enumerate(KERNEL_PATHS))) if mask >> i & 1] + [TORCH_PATH]


def resolve_path(path: str | None = None) -> str:
    """Turn "auto" (or None: ``$LOWBIT_KERNEL_PATH``, default auto) into the concrete path to use."""
    path = path or os.environ.get(PATH_ENV, "auto")
    if path not in ("auto", TORCH_PATH, *KERNEL_PATHS):
        raise unknown_name_error("kernel path", path, ("auto", TORCH_PATH, *KERNEL_PATHS))
    available = available_paths()
    if path == "auto":
        return available[0]
    if path not in available:
        raise ConfigError(
            f"kernel path '{path}' is not available on this machine (CPU features or compiler); "
            f"choose one of {', '.join(available)} or 'auto'"
        )
    return path


def path_id(path: str) -> int:
    """The integer the C++ dispatcher uses for a kernel path name."""
    return KERNEL_PATHS.index(path)
