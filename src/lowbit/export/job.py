"""The ``lowbit export`` job: checkpoint -> (optional post-training quantization) -> packed or ONNX file,
then a parity check of the exported file against the simulated quantized generator."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.config import from_dict, unknown_name_error
from lowbit.errors import ConfigError
from lowbit.export.api import export_packed, load, sample
from lowbit.export.onnx import DEFAULT_OPSET, export_onnx

FORMATS = ("packed", "onnx")


@dataclass
class ExportConfig:
    """What to export and how (YAML keys of ``lowbit export``)."""

    checkpoint: str
    output: str
    format: str = "packed"
    quant: dict[str, Any] | None = None
    opset: int = DEFAULT_OPSET
    verify_samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise unknown_name_error("export format", self.format, FORMATS)
        if self.verify_samples < 0:
            raise ConfigError(f"'verify_samples' must be >= 0, got {self.verify_samples}")


@dataclass
class ExportResult:
    """The written file, its size against the FP32 safetensors of the same network, and the parity check."""

    path: Path
    nbytes: int
    fp32_nbytes: int
    max_abs_diff: float | None
    mismatch_fraction: float | None

    @property
    def compression(self) -> float:
        return self.fp32_nbytes / self.nbytes


def fp32_nbytes(model: nn.Module) -> int:
    """Size of the full-precision twin of ``model`` (rebuilt from the registry) as a safetensors file."""
    from lowbit.models import create_model

    name = getattr(model, "lowbit_name", None)
    if name is None:
        raise ConfigError(
            "the model was not built by lowbit.models.create_model, so its FP32 twin is unknown"
        )
    twin = create_model(name, **getattr(model, "lowbit_kwargs", {}))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fp32.safetensors"
        save_file({key: value.contiguous() for key, value in twin.state_dict().items()}, str(path))
        return path.stat().st_size


def quantized_generator(cfg: ExportConfig) -> nn.Module:
    """The checkpoint's generator, converted by ``cfg.quant`` if given (post-training quantization)."""
    from lowbit.nn import QuantSpec, convert, freeze
    from lowbit.train.networks import load_generator

    generator = load_generator(cfg.checkpoint)
    if cfg.quant is None:
        return generator
    if freeze(generator):
        raise ConfigError(
            f"{cfg.checkpoint} is already quantized; drop the 'quant' section to export it as trained"
        )
    return convert(generator, from_dict(QuantSpec, cfg.quant, where="quant")).eval()


def _onnx_outputs(path: Path, z: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": z.numpy()})[0])


def _parity(generator: nn.Module, path: Path, cfg: ExportConfig) -> tuple[float | None, float | None]:
    """Max |difference| and the fraction of pixels off by more than 1e-3, exported file vs simulated model."""
    if cfg.verify_samples == 0:
        return None, None
    expected = sample(generator, cfg.verify_samples, cfg.seed)
    if cfg.format == "packed":
        got = sample(load(path), cfg.verify_samples, cfg.seed)
    else:
        z = torch.randn(
            cfg.verify_samples, generator.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)
        )
        got = _onnx_outputs(path, z)
    diff = (got - expected).abs()
    return float(diff.max()), float((diff > 1e-3).float().mean())


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export the configured generator and check the file against the simulated quantized model."""
    generator = quantized_generator(cfg)
    output = Path(cfg.output)
    if cfg.format == "packed":
        export_packed(generator, output)
    else:
        export_onnx(generator, output, opset=cfg.opset)
    max_diff, mismatch = _parity(generator, output, cfg)
    return ExportResult(output, output.stat().st_size, fp32_nbytes(generator), max_diff, mismatch)
