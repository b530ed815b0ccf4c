"""A restricted unpickler that can rebuild numpy arrays and nothing else.

Pickles can run arbitrary code through the globals they name; ``mnist.pkl.gz`` only needs
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``, so every other
global is refused before it is imported.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from lowbit.errors import DataError

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_module(module: str) -> Any:
    """Import ``module``, mapping ``numpy.core`` to ``numpy._core`` on numpy 2."""
    if module.startswith("numpy.core"):
        try:
            return importlib.import_module("numpy._core" + module[len("numpy.core") :])
        except ImportError:
            pass
    return importlib.import_module(module)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only numpy's array-reconstruction globals."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(
                f"{self.source}: refusing to unpickle global '{module}.{name}' (only numpy arrays are "
                "allowed); this is not the genuine file, delete it and prepare the data again"
            )
        return getattr(_numpy_module(module), name)


def load_numpy_pickle(data: bytes, source: Path) -> Any:
    """Unpickle ``data`` (read from ``source``) allowing only numpy array reconstruction."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, ValueError, ...
        raise DataError(
            f"{source}: corrupted pickle ({type(exc).__name__}: {exc}); delete it and prepare the data again"
        ) from None
