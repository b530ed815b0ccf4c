"""ONNX export translated from the IR, one translator per op (``TRANSLATORS``), checked with onnx's checker.

Quantized weights with an affine 4- or 8-bit codebook become QDQ: ``DequantizeLinear(codes, scale, axis) +
offset`` (UINT4 codes from opset 21). Other codebooks (1-3 bits, EM / LQ / k-means tables) have no QDQ form
and
are stored dequantized as float32, so the ONNX file runs the same model in onnxruntime but is not small: the
packed format is the small one. Two-level activations become ``Where(x >= t, high, low)``; uniform grids
become Clip -> QuantizeLinear -> DequantizeLinear (ties round half to even there, down in lowbit).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.backends.x86.build import TORCH_PATH
from lowbit.export.ir import INPUT, Graph, Node, capture
from lowbit.export.pack import pack_codes
from lowbit.export.runtime import plan_graph, run_steps
from lowbit.export.weights import codes, dequantized_weight
from lowbit.io import atomic_write_bytes

QDQ_BITS = (4, 8)
#: first opset with 4-bit QuantizeLinear/DequantizeLinear and per-channel GroupNormalization.
INT4_OPSET = 21
DEFAULT_OPSET = 21
MIN_OPSET = 18
PACKED_HINT = "export it with the packed format instead (lowbit.export.export_packed, or `lowbit export`)"


class _Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray | float | list, dtype: Any = np.float32) -> str:
        name = self.name(hint)
        self.initializers.append(
            numpy_helper.from_array(np.ascontiguousarray(np.asarray(array, dtype=dtype)), name)
        )
        return name

    def codes(self, hint: str, values: np.ndarray, bits: int) -> str:
        """Integer weight codes: UINT4 (two per byte, low nibble first) where the opset allows, else UINT8."""
        name = self.name(hint)
        if bits <= 4 and self.opset >= INT4_OPSET:
            packed = pack_codes(torch.from_numpy(values), 4).numpy().tobytes()
            self.initializers.append(
                helper.make_tensor(name, TensorProto.UINT4, values.shape, packed, raw=True)
            )
        else:
            self.initializers.append(numpy_helper.from_array(values.astype(np.uint8), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _qdq_weight(b: _Builder, node: Node) -> str | None:
    """The weight as QDQ nodes when its codebook is a 4/8-bit affine grid, else None."""
    weight = node.attrs["weight"]
    if weight["bits"] not in QDQ_BITS or weight["codebook"] != "affine":
        return None
    values = _np(codes(node))
    scale, offset = (_np(t).astype(np.float32) for t in node.tensors["affine"])
    axis = weight["channel_dim"]
    broadcast = [1] * values.ndim
    broadcast[axis] = -1
    if scale.size == 1:
        deq = b.node(
            "DequantizeLinear",
            [b.codes("codes", values, weight["bits"]), b.const("scale", scale.reshape(()))],
            "deq",
        )
        return b.node("Add", [deq, b.const("offset", offset.reshape(()))], "weight")
    deq = b.node(
        "DequantizeLinear",
        [b.codes("codes", values, weight["bits"]), b.const("scale", scale)],
        "deq",
        axis=axis,
    )
    return b.node("Add", [deq, b.const("offset", offset.reshape(broadcast))], "weight")


def _weight(b: _Builder, node: Node) -> str:
    if node.attrs["weight"]["format"] == "float":
        return b.const("weight", _np(node.tensors["weight"]))
    return _qdq_weight(b, node) or b.const("weight", _np(dequantized_weight(node)))


def _with_bias(b: _Builder, node: Node, inputs: list[str]) -> list[str]:
    return inputs + ([b.const("bias", _np(node.tensors["bias"]))] if "bias" in node.tensors else [])


def _conv(b: _Builder, node: Node, x: str) -> str:
    a = node.attrs
    if "pad" in a:
        x = _pad_node(b, x, a["pad"], a["pad_mode"], 0.0)
    ph, pw = a["padding"]
    attrs = {
        "strides": a["stride"],
        "pads": [ph, pw, ph, pw],
        "dilations": a["dilation"],
        "group": a["groups"],
    }
    if node.op == "conv_transpose2d":
        attrs["output_padding"] = a["output_padding"]
    op = "ConvTranspose" if node.op == "conv_transpose2d" else "Conv"
    return b.node(op, _with_bias(b, node, [x, _weight(b, node)]), op.lower(), **attrs)


def _linear(b: _Builder, node: Node, x: str) -> str:
    return b.node("Gemm", _with_bias(b, node, [x, _weight(b, node)]), "gemm", transB=1)


def _norm_consts(b: _Builder, node: Node, channels: int) -> tuple[str, str]:
    t = node.tensors
    weight = _np(t["weight"]) if "weight" in t else np.ones(channels, np.float32)
    bias = _np(t["bias"]) if "bias" in t else np.zeros(channels, np.float32)
    return b.const("gamma", weight), b.const("beta", bias)


def _batch_norm(b: _Builder, node: Node, x: str) -> str:
    t = node.tensors
    channels = t["running_mean"].numel()
    gamma, beta = _norm_consts(b, node, channels)
    stats = [b.const("mean", _np(t["running_mean"])), b.const("var", _np(t["running_var"]))]
    return b.node("BatchNormalization", [x, gamma, beta, *stats], "bn", epsilon=float(node.attrs["eps"]))


def _instance_norm(b: _Builder, node: Node, x: str, shapes: dict[str, list[int]]) -> str:
    if node.attrs["running_stats"]:
        return _batch_norm(b, node, x)
    gamma, beta = _norm_consts(b, node, shapes[node.inputs[0]][1])
    return b.node("InstanceNormalization", [x, gamma, beta], "in", epsilon=float(node.attrs["eps"]))


def _layer_norm(b: _Builder, node: Node, x: str) -> str:
    shape = node.attrs["shape"]
    t = node.tensors
    gamma = b.const("gamma", _np(t["weight"]) if "weight" in t else np.ones(shape, np.float32))
    beta = b.const("beta", _np(t["bias"]) if "bias" in t else np.zeros(shape, np.float32))
    return b.node(
        "LayerNormalization", [x, gamma, beta], "ln", axis=-len(shape), epsilon=float(node.attrs["eps"])
    )


def _group_norm(b: _Builder, node: Node, x: str, shapes: dict[str, list[int]]) -> str:
    if b.opset < INT4_OPSET:
        raise ConfigError(
            f"GroupNorm needs opset >= {INT4_OPSET} in ONNX (per-channel scale); raise the opset"
        )
    gamma, beta = _norm_consts(b, node, shapes[node.inputs[0]][1])
    return b.node(
        "GroupNormalization",
        [x, gamma, beta],
        "gn",
        epsilon=float(node.attrs["eps"]),
        num_groups=int(node.attrs["groups"]),
    )


def _quant_act(b: _Builder, node: Node, x: str) -> str:
    levels = _np(node.tensors["levels"]).astype(np.float64)
    levels.sort()
    if "shift" in node.tensors:
        shift = _np(node.tensors["shift"]).reshape(1, -1, 1, 1)
        x = b.node("Sub", [x, b.const("shift", shift)], "shifted")
    if len(levels) == 2:
        low, high = levels
        threshold = (low + high) / 2
        op = "GreaterOrEqual" if (low, high) == (-1.0, 1.0) else "Greater"
        mask = b.node(op, [x, b.const("threshold", np.float32(threshold))], "cmp")
        return b.node(
            "Where", [mask, b.const("high", np.float32(high)), b.const("low", np.float32(low))], "act"
        )
    step = (levels[-1] - levels[0]) / (len(levels) - 1)
    grid = levels[0] + step * np.arange(len(levels))
    zero = -levels[0] / step if step > 0 else 0.5
    if (
        step <= 0
        or not np.allclose(levels, grid, rtol=0, atol=1e-4 * step)
        or abs(zero - round(zero)) > 1e-6
        or not 0 <= round(zero) <= 255 - (len(levels) - 1)
    ):
        raise ConfigError(
            f"activation '{node.module or node.name}' ({node.attrs.get('method')}, "
            f"{node.attrs['bits']} bits) is not a uniform grid with an integer zero point; "
            f"{PACKED_HINT}"
        )
    clipped = b.node(
        "Clip", [x, b.const("lo", np.float32(levels[0])), b.const("hi", np.float32(levels[-1]))], "clip"
    )
    scale = b.const("act_scale", np.float32(step))
    zp_name = b.name("act_zero")
    b.initializers.append(helper.make_tensor(zp_name, TensorProto.UINT8, [], [int(round(zero))]))
    quant = b.node("QuantizeLinear", [clipped, scale, zp_name], "q")
    return b.node("DequantizeLinear", [quant, scale, zp_name], "dq")


def _pad_node(b: _Builder, x: str, pad: list[int], mode: str, value: float) -> str:
    """torch's pad list (last dim first, begin/end pairs) as ONNX Pad over a 4-D tensor."""
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    begins, ends = [0] * 4, [0] * 4
    for offset, (begin, end) in enumerate(pairs):
        begins[3 - offset], ends[3 - offset] = begin, end
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    inputs = [x, b.const("pads", begins + ends, np.int64)]
    if onnx_mode == "constant":
        inputs.append(b.const("pad_value", np.float32(value)))
    return b.node("Pad", inputs, "pad", mode=onnx_mode)


def _interpolate(b: _Builder, node: Node, x: str, shapes: dict[str, list[int]]) -> str:
    a = node.attrs
    out = shapes[node.name]
    if a["mode"] == "nearest":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        mode = "align_corners" if a["align_corners"] else "half_pixel"
        attrs = {"mode": "linear", "coordinate_transformation_mode": mode}
    if a["scale_factor"] is not None and not a["recompute_scale_factor"]:
        factor = a["scale_factor"] if isinstance(a["scale_factor"], list) else [a["scale_factor"]] * 2
        scales = b.const("scales", [1.0, 1.0, *factor])
        return b.node("Resize", [x, "", scales], "resize", **attrs)
    sizes = b.node(
        "Concat",
        [
            b.node(
                "Slice",
                [b.node("Shape", [x], "shape"), b.const("s0", [0], np.int64), b.const("s1", [2], np.int64)],
                "nc",
            ),
            b.const("hw", out[2:], np.int64),
        ],
        "sizes",
        axis=0,
    )
    return b.node("Resize", [x, "", "", sizes], "resize", **attrs)


def _reshape(b: _Builder, node: Node, x: str) -> str:
    return b.node(
        "Reshape",
        [
            x,
            b.const(
                "shape", [-1, *node.attrs["shape"]] if node.attrs["shape"] != [-1] else [0, -1], np.int64
            ),
        ],
        "reshape",
    )


def _elementwise(op: str) -> Callable[..., str]:
    def translate(b: _Builder, node: Node, *xs: str) -> str:
        if "scalar" not in node.attrs:
            return b.node(op, list(xs), op.lower())
        scalar = b.const("scalar", np.float32(node.attrs["scalar"]))
        inputs = [scalar, xs[0]] if node.attrs["scalar_first"] else [xs[0], scalar]
        return b.node(op, inputs, op.lower())

    return translate


def _simple(op: str, **attrs: Callable[[Node], Any]) -> Callable[..., str]:
    return lambda b, node, x: b.node(op, [x], op.lower(), **{k: get(node) for k, get in attrs.items()})


def _gelu(b: _Builder, node: Node, x: str) -> str:
    if b.opset < 20:
        raise ConfigError("GELU needs opset >= 20 in ONNX; raise the opset")
    return b.node("Gelu", [x], "gelu", approximate=node.attrs["approximate"])


def _prelu(b: _Builder, node: Node, x: str, shapes: dict[str, list[int]]) -> str:
    slope = _np(node.tensors["weight"])
    rank = len(shapes[node.inputs[0]])
    return b.node("PRelu", [x, b.const("slope", slope.reshape(-1, *([1] * (rank - 2))))], "prelu")


def _rprelu(b: _Builder, node: Node, x: str, shapes: dict[str, list[int]]) -> str:
    rank = len(shapes[node.inputs[0]])
    per_channel = [-1, *([1] * (rank - 2))]
    t = {key: _np(value).reshape(per_channel) for key, value in node.tensors.items()}
    shifted = b.node("Sub", [x, b.const("shift_in", t["shift_in"])], "shift_in")
    return b.node(
        "Add",
        [
            b.node("PRelu", [shifted, b.const("slope", t["slope"])], "prelu"),
            b.const("shift_out", t["shift_out"]),
        ],
        "rprelu",
    )


TRANSLATORS: dict[str, Callable[..., str]] = {
    "conv2d": _conv,
    "conv_transpose2d": _conv,
    "linear": _linear,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "quant_act": _quant_act,
    "relu": _simple("Relu"),
    "tanh": _simple("Tanh"),
    "sigmoid": _simple("Sigmoid"),
    "silu": lambda b, node, x: b.node("Mul", [x, b.node("Sigmoid", [x], "sig")], "silu"),
    "leaky_relu": _simple("LeakyRelu", alpha=lambda n: float(n.attrs["negative_slope"])),
    "elu": _simple("Elu", alpha=lambda n: float(n.attrs["alpha"])),
    "gelu": _gelu,
    "hardtanh": lambda b, node, x: b.node(
        "Clip",
        [
            x,
            b.const("lo", np.float32(node.attrs["min_val"])),
            b.const("hi", np.float32(node.attrs["max_val"])),
        ],
        "clip",
    ),
    "pad": lambda b, node, x: _pad_node(
        b, x, node.attrs["pad"], node.attrs["mode"], node.attrs.get("value", 0.0)
    ),
    "pixel_shuffle": _simple(
        "DepthToSpace", blocksize=lambda n: int(n.attrs["factor"]), mode=lambda n: "CRD"
    ),
    "reshape": _reshape,
    "permute": _simple("Transpose", perm=lambda n: n.attrs["dims"]),
    "cat": lambda b, node, *xs: b.node("Concat", list(xs), "cat", axis=int(node.attrs["dim"])),
    "add": _elementwise("Add"),
    "sub": _elementwise("Sub"),
    "mul": _elementwise("Mul"),
    "div": _elementwise("Div"),
    "mean": lambda b, node, x: b.node(
        "ReduceMean",
        [x, b.const("axes", node.attrs["dims"], np.int64)],
        "mean",
        keepdims=int(node.attrs["keepdim"]),
    ),
    "constant": lambda b, node: b.const("constant", _np(node.tensors["value"])),
}
#: translators that also need the recorded per-sample shapes
SHAPED = {
    "rprelu": _rprelu,
    "interpolate": _interpolate,
    "prelu": _prelu,
    "instance_norm": _instance_norm,
    "group_norm": _group_norm,
}


def _shapes(graph: Graph) -> dict[str, list[int]]:
    """Per-node output shapes with a batch of one (from the torch backend)."""
    values = run_steps(plan_graph(graph, TORCH_PATH), torch.zeros(1, *graph.input_shape))
    return {name: list(value.shape) for name, value in values.items()}


def build_onnx(graph: Graph, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """An ONNX model (input "input", output "output", dynamic batch) computing ``graph``."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(
            f"ONNX opset must be an integer from {MIN_OPSET} to {onnx.defs.onnx_opset_version()}, "
            f"got {opset!r}"
        )
    b = _Builder(opset)
    shapes = _shapes(graph)
    names = {INPUT: INPUT}
    for node in graph.nodes:
        inputs = [names[name] for name in node.inputs]
        try:
            if node.op in SHAPED:
                names[node.name] = SHAPED[node.op](b, node, *inputs, shapes)
            else:
                names[node.name] = TRANSLATORS[node.op](b, node, *inputs)
        except ConfigError as exc:
            raise ConfigError(
                f"ONNX export of node '{node.name}' ({node.module or node.op}): {exc}"
            ) from None
    b.nodes.append(helper.make_node("Identity", [names[graph.output]], ["output"], name="output"))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *graph.input_shape])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *graph.output_shape])]
    model = helper.make_model(
        helper.make_graph(b.nodes, "lowbit", inputs, outputs, b.initializers),
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lowbit",
    )
    onnx.checker.check_model(model)
    return model


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Capture ``model`` (as ``export_packed`` does) and write it as ONNX, QDQ where the bits allow."""
    graph, _ = capture(model, example_input)
    atomic_write_bytes(path, build_onnx(graph, opset).SerializeToString())
    return Path(path)
