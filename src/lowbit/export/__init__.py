"""lowbit.export: bit-packed low-bit models, bit-serial CPU kernels and ONNX (QDQ) export (docs/export.md)."""

from lowbit.export.api import export_packed, load, sample
from lowbit.export.format import FORMAT_VERSION, PackedModel, set_kernel_path
from lowbit.export.kernels import available_paths

__all__ = [
    "FORMAT_VERSION",
    "PackedModel",
    "available_paths",
    "export_packed",
    "load",
    "sample",
    "set_kernel_path",
]
