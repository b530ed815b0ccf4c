"""Compression metrics of seed 004 §2, measured with forward hooks on a real input.

Per weight layer (Conv2d, ConvTranspose2d, Linear, quantized or not), for one input sample:

* conv:            FLOPs = 2·H·W·(Cin/groups·Kh·Kw + 1)·Cout, H×W = the layer's output size;
* transposed conv: the same formula with its own output size (the FLOPs of the equivalent
  direct convolution over the stride-dilated input);
* linear:          FLOPs = (2I - 1)·O per output row;
* BOPs = FLOPs · w_bits · a_bits, where full precision counts as 32 bits and a_bits is the
  bit-width of the layer's input (the QuantAct that feeds it, else 32).

Size: quantized weights at ``bits`` per code plus their codebook (scale/offset per row when
affine, else the full table) at 32 bits; everything else the model needs for inference (biases,
BatchNorm parameters and running statistics, unquantized layers, activation level tables) at 32
bits. Compression ratio = FP32 size / that size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.nn import FrozenAct, FrozenLayer, QuantAct, freeze
from lowbit.nn.layers import QuantLayerMixin

FP_BITS = 32
WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass
class LayerCost:
    """One weight layer's parameters, FLOPs, BOPs and size."""

    name: str
    kind: str
    output_shape: list[int]
    params: int
    flops: int
    weight_bits: int
    act_bits: int
    bops: int
    size_bytes: int
    fp32_bytes: int


@dataclass
class CompressionReport:
    """Per-layer costs plus model totals (``other_bytes``: BatchNorm etc. at 32 bits)."""

    layers: list[LayerCost]
    params: int
    flops: int
    bops: int
    size_bytes: int
    fp32_bytes: int
    other_bytes: int
    conventions: dict[str, str] = field(default_factory=lambda: dict(CONVENTIONS))

    @property
    def compression_ratio(self) -> float:
        """FP32 size / size at the layers' bit-widths (seed 004 §2, phi = mu / mu*)."""
        return self.fp32_bytes / self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression_ratio": self.compression_ratio}


CONVENTIONS = {
    "flops_conv": "2*H*W*(Cin/groups*Kh*Kw+1)*Cout, H x W = output size (seed 004 §2)",
    "flops_conv_transpose": "same formula with the transposed conv's own output size",
    "flops_linear": "(2*I-1)*O per output row",
    "bops": "FLOPs * weight_bits * act_bits, full precision = 32 bits",
    "size": "quantized codes at their bits + codebooks, biases, BatchNorm and unquantized tensors at 32 bits",
    "per": "one input sample",
}


def conv_flops(
    out_h: int, out_w: int, in_channels: int, kernel: tuple[int, int], out_channels: int, groups: int = 1
) -> int:
    """Seed 004 §2: 2·H·W·(Cin·K² + 1)·Cout, with Cin per group and Kh·Kw for K²."""
    return 2 * out_h * out_w * (in_channels // groups * kernel[0] * kernel[1] + 1) * out_channels


def linear_flops(in_features: int, out_features: int) -> int:
    """Seed 004 §2: (2I - 1)·O."""
    return (2 * in_features - 1) * out_features


def _layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        rows = output[0].numel() // module.out_features
        return rows * linear_flops(module.in_features, module.out_features)
    height, width = output.shape[-2:]
    return conv_flops(
        height, width, module.in_channels, tuple(module.kernel_size), module.out_channels, module.groups
    )


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.ConvTranspose2d):
        return "conv_transpose2d"
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


def _bits_of(tensors: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * FP_BITS for t in tensors if t is not None)


def _bytes(bits: int) -> int:
    return math.ceil(bits / 8)


def frozen_bits(layer: FrozenLayer) -> int:
    """Bits to store a quantized layer: codes at ``bits``, codebook (or scale/offset) and bias at 32; a
    pruned layer stores a 1-bit keep map and only its kept codes (the packed file's sparse form)."""
    table = [layer.scale, layer.offset] if layer.scale is not None else [layer.codebook]
    count = layer.codes.numel()
    if layer.mask is not None and not bool(layer.mask.all()):
        codes = count + int(layer.mask.count_nonzero()) * layer.bits  # keep map + kept codes
    else:
        codes = count * layer.bits
    return codes + _bits_of([*table, layer.bias])


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and floating-point buffers of ``module`` itself (not its children)."""
    buffers = [b for b in module.buffers(recurse=False) if b.is_floating_point()]
    return [*module.parameters(recurse=False), *buffers]


def _storage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose own tensors are stored; a quantizer's internals are covered by its layer's codebook."""
    kept, covered = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if isinstance(module, (QuantLayerMixin, QuantAct)):
            covered.append(name)
        kept.append((name, module))
    return kept


class _InputBits:
    """Tags the outputs of QuantAct modules so a following layer knows its input bit-width."""

    def __init__(self) -> None:
        self.tagged: dict[int, tuple[torch.Tensor, int]] = {}

    def tag(self, module: QuantAct, inputs: Any, output: torch.Tensor) -> None:
        self.tagged[id(output)] = (output, module.bits)

    def bits(self, tensor: torch.Tensor) -> int:
        entry = self.tagged.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else FP_BITS


@torch.no_grad()
def _trace(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int, list[int]]]:
    """Run ``example`` and record (FLOPs per sample, input bits, output shape) of every weight layer."""
    records: dict[str, tuple[int, int, list[int]]] = {}
    input_bits = _InputBits()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, QuantAct):
            handles.append(module.register_forward_hook(input_bits.tag))
        elif isinstance(module, WEIGHT_LAYERS):

            def record(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                records[name] = (
                    _layer_flops(mod, output),
                    input_bits.bits(inputs[0]),
                    list(output.shape[1:]),
                )

            handles.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return records


def compression_report(model: nn.Module, example: torch.Tensor) -> CompressionReport:
    """Params, FLOPs, BOPs and size per weight layer and in total, from one forward of ``example``."""
    traced = _trace(model, example)
    frozen = freeze(model)
    layers, other_bits, other_fp32_bits, params = [], 0, 0, 0
    for name, module in _storage_modules(model):
        if isinstance(module, WEIGHT_LAYERS):
            weights = [module.weight, module.bias]
            count = sum(t.numel() for t in weights if t is not None)
            layer = frozen.get(name)
            size_bits = frozen_bits(layer) if isinstance(layer, FrozenLayer) else _bits_of(weights)
            weight_bits = layer.bits if isinstance(layer, FrozenLayer) else FP_BITS
            params += count
            if name not in traced:  # not run by this input: stored, but no FLOPs
                other_bits += size_bits
                other_fp32_bits += _bits_of(weights)
                continue
            flops, act_bits, shape = traced[name]
            bops = flops * weight_bits * act_bits
            layers.append(
                LayerCost(
                    name,
                    _kind(module),
                    shape,
                    count,
                    flops,
                    weight_bits,
                    act_bits,
                    bops,
                    _bytes(size_bits),
                    _bytes(_bits_of(weights)),
                )
            )
        elif isinstance(frozen.get(name), FrozenAct):
            other_bits += _bits_of([frozen[name].levels])
        else:
            own = _own_tensors(module)
            params += sum(p.numel() for p in module.parameters(recurse=False))
            other_bits += _bits_of(own)
            other_fp32_bits += _bits_of(own)
    other = _bytes(other_bits)
    return CompressionReport(
        layers,
        params,
        sum(r.flops for r in layers),
        sum(r.bops for r in layers),
        sum(r.size_bytes for r in layers) + other,
        sum(r.fp32_bytes for r in layers) + _bytes(other_fp32_bits),
        other,
    )
