"""lowbit.export: capture any converted model as the lowbit IR, write it bit-packed or as ONNX, and run it
on the torch or kernel backends (docs/export.md).

Rooms: ``ir`` (capture, schema), ``format`` (read, write, checksum; ``v1`` reads version-1 files),
``validate`` (file checks), ``runtime`` (planning, execution), ``backends/`` (``torch``, ``x86``), ``onnx``.
"""

from lowbit.export.api import ExportWarning, export_packed, load, run_images, sample, set_kernel_path
from lowbit.export.backends.x86.build import available_paths
from lowbit.export.format import FORMAT_VERSION
from lowbit.export.ir import ExportError, capture
from lowbit.export.onnx import export_onnx
from lowbit.export.runtime import PackedModel

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "ExportWarning",
    "PackedModel",
    "available_paths",
    "capture",
    "export_onnx",
    "export_packed",
    "load",
    "run_images",
    "sample",
    "set_kernel_path",
]
