"""The ``native`` backend: the whole graph runs in liblowbit (``runtime/``, C++ without torch) via ctypes.

The library is the one ``lowbit-run`` uses: it reads the packed file itself, checks it, and runs every op
(binary layers on the same kernel sources as the ``x86`` backend, the rest on float code with FMA products
for conv / linear). It is found at ``$LOWBIT_NATIVE_LIB`` or ``runtime/build/liblowbit.so`` of a source
checkout (``make runtime``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.backends.x86.build import KERNEL_PATHS

NAME = "native"
LIB_ENV = "LOWBIT_NATIVE_LIB"
#: liblowbit's error codes (runtime/include/lowbit.h)
ERROR_UNSUPPORTED = 4
ERROR_ARGUMENT = 5
#: every kernel path but the binary kernels: the float code for all layers
FLOAT_PATH = "float"
MAX_RANK = 8

_LIBRARY: dict[str, ctypes.CDLL | None] = {}


class NativeLoadError(CheckpointError):
    """liblowbit refused a file; ``code`` is its error code (ERROR_UNSUPPORTED: valid, left to Python)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def library_path() -> Path:
    default = Path(__file__).resolve().parents[4] / "runtime" / "build" / "liblowbit.so"
    return Path(os.environ.get(LIB_ENV, default))


def library() -> ctypes.CDLL | None:
    """liblowbit with its C API declared, or None when it is not built."""
    if "lib" not in _LIBRARY:
        path = library_path()
        _LIBRARY["lib"] = open_library(path) if path.is_file() else None
    return _LIBRARY["lib"]


def open_library(path: Path) -> ctypes.CDLL:
    """A liblowbit build at ``path`` with its C API declared (e.g. another build, to time against)."""
    lib = ctypes.CDLL(str(path))
    handle = ctypes.POINTER(ctypes.c_void_p)
    lib.lowbit_load_memory.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(handle)]
    lib.lowbit_free.argtypes = [handle]
    lib.lowbit_free.restype = None
    for name in ("lowbit_input_shape", "lowbit_output_shape"):
        getattr(lib, name).argtypes = [
            handle,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
        ]
    lib.lowbit_set_kernel_path.argtypes = [handle, ctypes.c_char_p]
    lib.lowbit_kernel_path.argtypes = [handle]
    lib.lowbit_kernel_path.restype = ctypes.c_char_p
    lib.lowbit_set_threads.argtypes = [handle, ctypes.c_int]
    counts = ctypes.POINTER(ctypes.c_int64)
    lib.lowbit_kernel_layers.argtypes = [handle, counts, counts]
    if hasattr(lib, "lowbit_fused_layers"):  # an older build (e.g. a benchmark's baseline) has no such count
        lib.lowbit_fused_layers.argtypes = [handle, counts]
    lib.lowbit_run.argtypes = [handle, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.lowbit_supported_paths.restype = ctypes.c_int64
    lib.lowbit_last_error.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    return library() is not None


def available_paths() -> list[str]:
    """The kernel paths liblowbit runs on this CPU, fastest first."""
    lib = library()
    mask = int(lib.lowbit_supported_paths()) if lib is not None else 0
    order = ("avx512", "avx2", "neon", "scalar")
    return [name for name in order if mask >> KERNEL_PATHS.index(name) & 1]


class NativeModel:
    """One loaded file in liblowbit: ``run`` takes N x (input values) float32, returns N x (output values).
    ``lib``: another build (``open_library``) instead of the one ``library()`` finds."""

    def __init__(self, data: bytes, source: str, lib: ctypes.CDLL | None = None) -> None:
        lib = lib or library()
        if lib is None:
            raise ConfigError(f"liblowbit is not built ({library_path()}); run `make runtime`")
        self._lib = lib
        self._handle = ctypes.POINTER(ctypes.c_void_p)()
        code = lib.lowbit_load_memory(data, len(data), ctypes.byref(self._handle))
        if code:
            self._handle = None
            raise NativeLoadError(f"{source}: {self._error()}", code)
        self.input_shape = self._shape(lib.lowbit_input_shape)
        self.output_shape = self._shape(lib.lowbit_output_shape)

    def _error(self) -> str:
        return self._lib.lowbit_last_error().decode(errors="replace")

    def _shape(self, query) -> list[int]:
        dims, rank = (ctypes.c_int64 * MAX_RANK)(), ctypes.c_int()
        query(self._handle, dims, MAX_RANK, ctypes.byref(rank))
        return list(dims[: rank.value])

    def set_kernel_path(self, path: str) -> str:
        """Use ``path`` ("auto", a kernel path, or "float"); returns the concrete path."""
        if self._lib.lowbit_set_kernel_path(self._handle, path.encode()):
            choices = ", ".join([*available_paths(), FLOAT_PATH])
            raise ConfigError(f"{self._error()}; available here: {choices}")
        return self._lib.lowbit_kernel_path(self._handle).decode()

    def kernel_layers(self) -> tuple[int, int]:
        """(bit-serial, integer) kernel layers of liblowbit's own plan for the current path."""
        planes, integer = ctypes.c_int64(), ctypes.c_int64()
        if self._lib.lowbit_kernel_layers(self._handle, ctypes.byref(planes), ctypes.byref(integer)):
            raise ConfigError(self._error())
        return planes.value, integer.value

    def fused_layers(self) -> int:
        """Kernel layers of the plan writing the next layer's packed input (the fused threshold epilogue)."""
        fused = ctypes.c_int64()
        if not hasattr(self._lib, "lowbit_fused_layers"):
            raise ConfigError("this liblowbit predates lowbit_fused_layers: rebuild it with `make runtime`")
        if self._lib.lowbit_fused_layers(self._handle, ctypes.byref(fused)):
            raise ConfigError(self._error())
        return fused.value

    def set_threads(self, threads: int) -> None:
        if self._lib.lowbit_set_threads(self._handle, threads):
            raise ConfigError(self._error())

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        batch = x.shape[0]
        out = np.empty((batch, *self.output_shape), dtype=np.float32)
        if self._lib.lowbit_run(self._handle, x.ctypes.data, batch, out.ctypes.data):
            raise ConfigError(self._error())
        return out

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.lowbit_free(self._handle)
            self._handle = None
