"""Checks of a decoded IR before it is planned: every node's op, inputs, attributes and tensors (names,
dtypes,
shapes against the declared sizes), so a damaged or hostile file ends in one CheckpointError naming the node
and the field, never in a bare exception or a huge allocation."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from lowbit.errors import CheckpointError
from lowbit.export.ir import INPUT, MAX_PACKED_BITS, Graph, Node
from lowbit.export.pack import packed_nbytes
from lowbit.export.weights import kept_count

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
#: values per sample of the input or output; a 1024 x 1024 RGB image is 3.1 M.
MAX_SAMPLE_VALUES = 2**26
MAX_NODES = 100_000
WEIGHT_OPS = ("conv2d", "conv_transpose2d", "linear")
WEIGHT_TENSORS = ("weight", "codes", "mask", "affine", "codebook", "bias")
#: op -> (attributes it must have, tensors it must have, tensors it may have)
SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "conv2d": (
        ("stride", "padding", "dilation", "groups", "weight"),
        (),
        WEIGHT_TENSORS,
    ),
    "conv_transpose2d": (
        ("stride", "padding", "output_padding", "dilation", "groups", "weight"),
        (),
        WEIGHT_TENSORS,
    ),
    "linear": (("weight",), (), WEIGHT_TENSORS),
    "batch_norm": (("eps",), ("running_mean", "running_var"), ("weight", "bias")),
    "instance_norm": (("eps", "running_stats"), (), ("running_mean", "running_var", "weight", "bias")),
    "layer_norm": (("shape", "eps"), (), ("weight", "bias")),
    "group_norm": (("groups", "eps"), (), ("weight", "bias")),
    "quant_act": (("bits",), ("levels",), ("shift",)),
    "relu": ((), (), ()),
    "tanh": ((), (), ()),
    "sigmoid": ((), (), ()),
    "silu": ((), (), ()),
    "leaky_relu": (("negative_slope",), (), ()),
    "elu": (("alpha",), (), ()),
    "gelu": (("approximate",), (), ()),
    "hardtanh": (("min_val", "max_val"), (), ()),
    "prelu": ((), ("weight",), ()),
    "rprelu": ((), ("shift_in", "slope", "shift_out"), ()),
    "pad": (("pad", "mode"), (), ()),
    "interpolate": (("mode",), (), ()),
    "pixel_shuffle": (("factor",), (), ()),
    "reshape": (("shape",), (), ()),
    "permute": (("dims",), (), ()),
    "cat": (("dim",), (), ()),
    "add": ((), (), ()),
    "sub": ((), (), ()),
    "mul": ((), (), ()),
    "div": ((), (), ()),
    "mean": (("dims", "keepdim"), (), ()),
    "constant": (("shape",), ("value",), ()),
}


def _fail(node: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"node '{node}': {what}; the file is damaged or written by another tool, re-export it"
    )


def node_from_json(item: Any, tensors: dict[str, torch.Tensor]) -> Node:
    """A Node from its JSON entry and the file's tensors named ``{name}.{field}``."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not NAME.match(item["name"]):
        raise CheckpointError(f"a node entry is malformed ({str(item)[:80]}); re-export the model")
    name = item["name"]
    op, inputs, attrs = item.get("op"), item.get("inputs"), item.get("attrs", {})
    if op not in SCHEMA:
        raise CheckpointError(
            f"node '{name}' has unknown op {op!r}; this file needs a newer lowbit (known ops: "
            f"{', '.join(sorted(SCHEMA))})"
        )
    if (
        not isinstance(inputs, list)
        or not all(isinstance(i, str) for i in inputs)
        or not isinstance(attrs, dict)
    ):
        raise _fail(name, "inputs must be a list of names and attrs an object")
    prefix = f"{name}."
    own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    return Node(name, op, inputs, attrs, own, str(item.get("module", "")))


def _shape(value: Any, what: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        or math.prod(value) > MAX_SAMPLE_VALUES
    ):
        raise CheckpointError(
            f"{what} must be a list of positive sizes with at most {MAX_SAMPLE_VALUES:,} values "
            f"per sample, got {str(value)[:80]}; re-export the model"
        )
    return value


def _check_tensor(
    node: Node, field: str, shape: list[int] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    tensor = node.tensors.get(field)
    if tensor is None:
        raise _fail(node.name, f"tensor '{field}' is missing")
    if tensor.dtype != dtype:
        raise _fail(node.name, f"tensor '{field}' is {tensor.dtype}, expected {dtype}")
    if shape is not None and list(tensor.shape) != shape:
        raise _fail(node.name, f"tensor '{field}' has shape {list(tensor.shape)}, expected {shape}")
    if dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _fail(node.name, f"tensor '{field}' holds non-finite values")
    return tensor


def _weight_shape(node: Node) -> list[int]:
    a = node.attrs
    if node.op == "linear":
        return [a["out_features"], a["in_features"]]
    groups = a["groups"]
    if node.op == "conv2d":
        return [a["out_channels"], a["in_channels"] // groups, *a["kernel_size"]]
    return [a["in_channels"], a["out_channels"] // groups, *a["kernel_size"]]


def _check_weight(node: Node) -> None:
    weight = node.attrs["weight"]
    if not isinstance(weight, dict) or weight.get("format") not in ("float", "packed"):
        raise _fail(node.name, "attribute 'weight' must say format float or packed")
    shape = _weight_shape(node)
    if math.prod(shape) > 2**31:
        raise _fail(node.name, f"weight shape {shape} is too large")
    out_channels = shape[1] * node.attrs["groups"] if node.op == "conv_transpose2d" else shape[0]
    if node.attrs.get("bias"):
        _check_tensor(node, "bias", [out_channels])
    if weight["format"] == "float":
        _check_tensor(node, "weight", shape)
        return
    bits, levels, channel_dim = weight.get("bits"), weight.get("levels"), weight.get("channel_dim")
    if (
        not isinstance(bits, int)
        or not 1 <= bits <= MAX_PACKED_BITS
        or not isinstance(levels, int)
        or not 1 <= levels <= 2**bits
        or channel_dim not in range(len(shape))
        or weight.get("shape") != shape
    ):
        raise _fail(
            node.name,
            f"packed weight fields are inconsistent (bits {bits}, levels {levels}, channel_dim "
            f"{channel_dim}, shape {weight.get('shape')} vs {shape})",
        )
    count = math.prod(shape)
    if weight.get("sparse"):
        _check_tensor(node, "mask", [packed_nbytes(count, 1)], torch.uint8)
        count = kept_count(node)
    _check_tensor(node, "codes", [packed_nbytes(count, bits)], torch.uint8)
    rows = shape[channel_dim]
    if weight.get("codebook") == "affine":
        affine = _check_tensor(node, "affine")
        if affine.dim() != 2 or affine.shape[0] != 2 or affine.shape[1] not in (1, rows):
            raise _fail(node.name, f"tensor 'affine' has shape {list(affine.shape)}, expected [2, {rows}]")
    elif weight.get("codebook") == "table":
        table = _check_tensor(node, "codebook")
        if table.dim() != 2 or table.shape[0] not in (1, rows) or table.shape[1] != levels:
            raise _fail(
                node.name, f"tensor 'codebook' has shape {list(table.shape)}, expected [{rows}, {levels}]"
            )
    else:
        raise _fail(node.name, "packed weight needs codebook 'affine' or 'table'")


def _check_geometry(node: Node) -> None:
    a = node.attrs
    if node.op == "linear":
        ok = all(isinstance(a.get(k), int) and a[k] > 0 for k in ("in_features", "out_features"))
    else:
        pairs = ("stride", "dilation", "kernel_size")
        ok = all(
            isinstance(a.get(k), list) and len(a[k]) == 2 and all(isinstance(v, int) and v > 0 for v in a[k])
            for k in pairs
        )
        ok = ok and all(
            isinstance(a.get(k), int) and a[k] > 0 for k in ("groups", "in_channels", "out_channels")
        )
        ok = ok and a["in_channels"] % a["groups"] == 0 and a["out_channels"] % a["groups"] == 0
        ok = ok and all(isinstance(v, int) and 0 <= v < 4096 for v in a.get("padding", []))
    if not ok:
        raise _fail(node.name, "layer geometry (sizes, strides, kernel, groups) is invalid")


def _check_node(node: Node) -> None:
    attrs, required, optional = SCHEMA[node.op]
    missing = [key for key in attrs if key not in node.attrs]
    if missing:
        raise _fail(node.name, f"attributes {missing} are missing")
    unknown = set(node.tensors) - set(required) - set(optional)
    if unknown:
        raise _fail(node.name, f"unexpected tensors {sorted(unknown)}")
    for field in required:
        _check_tensor(node, field, dtype=node.tensors[field].dtype if field == "value" else torch.float32)
    if node.op in WEIGHT_OPS:
        _check_geometry(node)
        _check_weight(node)
    elif node.op == "quant_act":
        levels = node.tensors["levels"]
        if levels.dim() != 1 or not 1 <= levels.numel() <= 256:
            raise _fail(
                node.name, f"levels must be a list of 1 to 256 values, got shape {list(levels.shape)}"
            )
        if "shift" in node.tensors:
            _check_tensor(node, "shift")
    elif node.op == "reshape" and node.attrs["shape"] != [-1]:
        _shape(node.attrs["shape"], f"node '{node.name}' shape")


def check_graph(graph: Graph) -> None:
    """Raise CheckpointError unless every node is well formed and reads only earlier nodes or the input."""
    _shape(graph.input_shape, "input_shape")
    if graph.output_shape:
        _shape(graph.output_shape, "output_shape")
    if len(graph.nodes) > MAX_NODES:
        raise CheckpointError(
            f"the graph has {len(graph.nodes):,} nodes (limit {MAX_NODES:,}); re-export the model"
        )
    seen = {INPUT}
    for node in graph.nodes:
        if node.name in seen:
            raise _fail(node.name, "the name is used twice")
        absent = [name for name in node.inputs if name not in seen]
        if absent:
            raise _fail(node.name, f"it reads {absent}, which no earlier node produces")
        if node.op != "constant" and not node.inputs:
            raise _fail(node.name, "it has no input")
        _check_node(node)
        seen.add(node.name)
    if graph.output not in seen:
        raise CheckpointError(f"the graph's output '{graph.output}' is not a node; re-export the model")
