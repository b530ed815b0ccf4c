"""ONNX export of a quantized model with QuantizeLinear/DequantizeLinear (QDQ) nodes, for 4- and 8-bit layers.

Weights are stored as their integer codes (UINT8, or UINT4 from opset 21) and rebuilt in the graph as
``DequantizeLinear(codes, scale, axis=channel) + offset`` = the affine codebook scale*z + offset. Uniform
4/8-bit activation quantizers become a QuantizeLinear -> DequantizeLinear pair, sign activations
``Where(x >= 0, 1, -1)``. ONNX has no 1-3 bit types and no codebook lookups in QDQ form, so such layers
raise a ConfigError that points to the packed format (``lowbit.export.export_packed``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.format import encode_model, layer_tensors, traced_output_shape
from lowbit.export.pack import pack_codes, unpack_codes
from lowbit.io import atomic_write_bytes

ONNX_BITS = (4, 8)
#: first opset whose QuantizeLinear/DequantizeLinear accept 4-bit integer types.
INT4_OPSET = 21
DEFAULT_OPSET = 21
#: first opset whose DequantizeLinear takes the per-channel ``axis`` attribute the exporter uses
MIN_OPSET = 13
PACKED_HINT = (
    "export it with the packed format instead "
    "(lowbit.export.export_packed, or `lowbit export` with format: packed)"
)


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def codes(self, hint: str, codes: np.ndarray, bits: int) -> str:
        """Integer weight codes as an initializer: UINT4 (two per byte, low nibble first) where the
        opset allows, else UINT8."""
        name = self.name(hint)
        if bits <= 4 and self.opset >= INT4_OPSET:
            packed = pack_codes(torch.from_numpy(codes), 4).numpy().tobytes()
            tensor = helper.make_tensor(name, TensorProto.UINT4, codes.shape, packed, raw=True)
        else:
            tensor = numpy_helper.from_array(codes.astype(np.uint8), name)
        self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _conv_attrs(kind: str, hyper: dict[str, Any]) -> dict[str, Any]:
    pad = list(hyper.get("padding", (0, 0)))
    attrs = {
        "strides": list(hyper.get("stride", (1, 1))),
        "pads": pad + pad,
        "dilations": list(hyper.get("dilation", (1, 1))),
        "group": int(hyper.get("groups", 1)),
    }
    if kind == "conv_transpose2d":
        attrs["output_padding"] = list(hyper.get("output_padding", (0, 0)))
    return attrs


def _weight_op(
    graph: _Graph, kind: str, x: str, weight: str, bias: str | None, hyper: dict, hint: str
) -> str:
    if kind == "linear":
        inputs = [x, weight] + ([bias] if bias else [])
        return graph.node("Gemm", inputs, hint, transB=1)
    op = "ConvTranspose" if kind == "conv_transpose2d" else "Conv"
    return graph.node(op, [x, weight] + ([bias] if bias else []), hint, **_conv_attrs(kind, hyper))


def _quant_weight(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    name, bits = layer["name"], layer["bits"]
    if bits not in ONNX_BITS:
        raise ConfigError(
            f"layer '{name}' has {bits}-bit weights; ONNX QDQ export supports {ONNX_BITS} bits "
            f"only (no 1-3 bit integer types); {PACKED_HINT}"
        )
    if layer["codebook"] != "affine":
        raise ConfigError(
            f"layer '{name}' uses a non-uniform codebook ({layer['method']}), which QDQ cannot "
            f"express; {PACKED_HINT}"
        )
    codes = _np(unpack_codes(tensors["codes"], bits, layer["shape"]))
    scale, offset = (_np(t).astype(np.float32) for t in tensors["affine"])
    kind, axis = layer["type"].removeprefix("quant_"), layer["channel_dim"]
    broadcast = [1] * codes.ndim
    broadcast[axis] = -1
    if scale.size == 1:
        scale_name, offset = graph.const("scale", scale.reshape(())), offset.reshape(())
        deq = graph.node("DequantizeLinear", [graph.codes("codes", codes, bits), scale_name], "deq")
    else:
        scale_name, offset = graph.const("scale", scale), offset.reshape(broadcast)
        deq = graph.node(
            "DequantizeLinear", [graph.codes("codes", codes, bits), scale_name], "deq", axis=axis
        )
    weight = graph.node("Add", [deq, graph.const("offset", offset)], "weight")
    bias = graph.const("bias", _np(tensors["bias"])) if "bias" in tensors else None
    return _weight_op(graph, kind, x, weight, bias, layer["hyper"], "y")


def _dense_weight(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    kind = layer["type"].removeprefix("dense_")
    bias = graph.const("bias", _np(tensors["bias"])) if "bias" in tensors else None
    return _weight_op(
        graph, kind, x, graph.const("weight", _np(tensors["weight"])), bias, layer["hyper"], "y"
    )


def _quant_act(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    levels = _np(tensors["levels"]).astype(np.float64)
    bits = layer["bits"]
    step = (levels[-1] - levels[0]) / max(len(levels) - 1, 1)
    grid = levels[0] + step * np.arange(len(levels))
    uniform = len(levels) == 2**bits and step > 0 and np.allclose(levels, grid, rtol=0, atol=1e-4 * step)
    zero = -levels[0] / step if uniform else 0.5
    if bits not in ONNX_BITS or not uniform or abs(zero - round(zero)) > 1e-6:
        raise ConfigError(
            f"activation '{layer['name']}' ({layer['method']}, {bits} bits) is not a uniform "
            f"4/8-bit grid with an integer zero point; {PACKED_HINT}"
        )
    dtype = TensorProto.UINT4 if bits == 4 and graph.opset >= INT4_OPSET else TensorProto.UINT8
    if bits == 4 and dtype == TensorProto.UINT8:
        raise ConfigError(
            f"4-bit activations need opset >= {INT4_OPSET} for UINT4; raise the opset or {PACKED_HINT}"
        )
    scale = graph.const("act_scale", np.array(step, dtype=np.float32))
    zp_name = graph.name("act_zero")
    graph.initializers.append(helper.make_tensor(zp_name, dtype, [], [int(round(zero))]))
    quant = graph.node("QuantizeLinear", [x, scale, zp_name], "q")
    return graph.node("DequantizeLinear", [quant, scale, zp_name], "dq")


def _sign(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    positive = graph.node("GreaterOrEqual", [x, graph.const("zero", np.array(0.0, dtype=np.float32))], "ge")
    one, minus = (
        graph.const("one", np.array(1.0, dtype=np.float32)),
        graph.const("minus", np.array(-1.0, np.float32)),
    )
    return graph.node("Where", [positive, one, minus], "sign")


def _batch_norm(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    inputs = [x] + [
        graph.const(part, _np(t))
        for part, t in zip(("gamma", "beta", "mean", "var"), tensors["bn"], strict=True)
    ]
    return graph.node("BatchNormalization", inputs, "bn", epsilon=float(layer["hyper"]["eps"]))


def _flatten(graph: _Graph, layer: dict, tensors: dict, x: str) -> str:
    if layer["hyper"]["start_dim"] != 1 or layer["hyper"]["end_dim"] != -1:
        raise ConfigError(f"Flatten '{layer['name']}' must flatten dims 1..-1 for ONNX export")
    return graph.node("Flatten", [x], "flat", axis=1)


TRANSLATORS = {
    "quant_conv2d": _quant_weight,
    "quant_conv_transpose2d": _quant_weight,
    "quant_linear": _quant_weight,
    "dense_conv2d": _dense_weight,
    "dense_conv_transpose2d": _dense_weight,
    "dense_linear": _dense_weight,
    "conv2d": _dense_weight,
    "conv_transpose2d": _dense_weight,
    "linear": _dense_weight,
    "quant_act": _quant_act,
    "sign": _sign,
    "batch_norm1d": _batch_norm,
    "batch_norm2d": _batch_norm,
    "flatten": _flatten,
    "relu": lambda g, layer, t, x: g.node("Relu", [x], "relu"),
    "tanh": lambda g, layer, t, x: g.node("Tanh", [x], "tanh"),
    "sigmoid": lambda g, layer, t, x: g.node("Sigmoid", [x], "sigmoid"),
    "identity": lambda g, layer, t, x: g.node("Identity", [x], "id"),
    "leaky_relu": lambda g, layer, t, x: g.node(
        "LeakyRelu", [x], "lrelu", alpha=float(layer["hyper"]["negative_slope"])
    ),
}


def build_onnx(
    architecture: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    input_shape: list[int],
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """An ONNX model (input "input", output "output", dynamic batch) for a packed architecture whose
    per-sample ``output_shape`` is known."""
    graph = _Graph(opset)
    x = "input"
    if architecture.get("input_view"):
        shape = graph.const("view", np.array([-1, *architecture["input_view"]], dtype=np.int64))
        x = graph.node("Reshape", [x, shape], "view")
    for index, layer in enumerate(architecture["layers"]):
        x = TRANSLATORS[layer["type"]](graph, layer, layer_tensors(tensors, index), x)
    output_shape = architecture["output_shape"]
    out_view = graph.const("out_view", np.array([-1, *output_shape], np.int64))
    x = graph.node("Reshape", [x, out_view], "out")
    graph.nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *output_shape])]
    model = helper.make_model(
        helper.make_graph(graph.nodes, "lowbit", inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lowbit",
    )
    onnx.checker.check_model(model)
    return model


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: list[int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model`` (a lowbit.convert-ed nn.Sequential) as ONNX with QDQ nodes; returns the path.

    ``input_shape`` (without the batch) defaults to ``[latent_dim]`` for generators and to
    ``image_shape`` for models that have one (the DCGAN discriminators).
    """
    from lowbit.nn import freeze

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"ONNX opset {opset} is not supported; use {MIN_OPSET} to "
                          f"{onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    architecture, tensors = encode_model(model, freeze(model))
    if input_shape is None:
        latent = architecture.get("latent_dim")
        input_shape = [latent] if latent else architecture.get("image_shape")
        if not input_shape:
            raise ConfigError(
                "input_shape is required for a model without latent_dim or image_shape, "
                "e.g. input_shape=[1, 28, 28]"
            )
    if architecture.get("output_shape") is None:
        architecture["output_shape"] = traced_output_shape(model, torch.zeros(1, *input_shape))
    onnx_model = build_onnx(architecture, tensors, list(input_shape), opset)
    atomic_write_bytes(path, onnx_model.SerializeToString())
    return Path(path)
