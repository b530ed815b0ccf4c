"""Packed format version 1 (a chain of layers, ``{index}.{field}`` tensors) converted to the IR on load."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import CheckpointError
from lowbit.export.ir import INPUT, Graph, Node

SIMPLE = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "identity": "identity"}


def _layer_tensors(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"{index}."
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _pair(value: Any) -> list[int]:
    return [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]


def _weight_node(name: str, layer: dict, own: dict[str, torch.Tensor]) -> Node:
    kind = layer["type"].removeprefix("quant_")
    hyper = layer.get("hyper", {})
    packed = layer["type"].startswith("quant_")
    shape = layer["shape"] if packed else list(own["weight"].shape)
    attrs: dict[str, Any] = {"bias": "bias" in own}
    if kind == "linear":
        attrs.update(in_features=shape[1], out_features=shape[0])
    else:
        groups = int(hyper.get("groups", 1))
        transposed = kind == "conv_transpose2d"
        attrs.update(
            stride=_pair(hyper.get("stride", 1)),
            padding=_pair(hyper.get("padding", 0)),
            dilation=_pair(hyper.get("dilation", 1)),
            groups=groups,
            kernel_size=list(shape[2:]),
            in_channels=shape[0] if transposed else shape[1] * groups,
            out_channels=shape[1] * groups if transposed else shape[0],
        )
        if transposed:
            attrs["output_padding"] = _pair(hyper.get("output_padding", 0))
    if packed:
        attrs["weight"] = {
            "format": "packed",
            "method": layer.get("method"),
            "bits": layer["bits"],
            "shape": shape,
            "channel_dim": layer["channel_dim"],
            "levels": layer["levels"],
            "codebook": layer["codebook"],
        }
    else:
        attrs["weight"] = {"format": "float"}
    return Node(name, kind, [], attrs, own)


def _node(name: str, layer: dict, own: dict[str, torch.Tensor]) -> Node:
    kind = layer.get("type")
    if kind in (
        "conv2d",
        "conv_transpose2d",
        "linear",
        "quant_conv2d",
        "quant_conv_transpose2d",
        "quant_linear",
    ):
        return _weight_node(name, layer, own)
    if kind in ("batch_norm1d", "batch_norm2d"):
        weight, bias, mean, var = own["bn"]
        return Node(
            name,
            "batch_norm",
            [],
            {"eps": layer["hyper"]["eps"]},
            {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var},
        )
    if kind == "sign":
        return Node(
            name, "quant_act", [], {"method": "sign", "bits": 1}, {"levels": torch.tensor([-1.0, 1.0])}
        )
    if kind == "quant_act":
        return Node(name, "quant_act", [], {"method": layer.get("method"), "bits": layer["bits"]}, own)
    if kind == "leaky_relu":
        return Node(name, "leaky_relu", [], {"negative_slope": layer["hyper"]["negative_slope"]})
    if kind == "flatten":
        return Node(name, "reshape", [], {"shape": [-1]})
    if kind in SIMPLE:
        return Node(name, SIMPLE[kind], [])
    raise CheckpointError(f"version-1 layer {name} has unknown type {kind!r}; re-export the model")


def to_graph(architecture: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Graph:
    """The chain of a version-1 file as IR nodes: input view, layers in order, flatten / output reshape."""
    layers = architecture.get("layers")
    if not isinstance(layers, list):
        raise CheckpointError("the version-1 architecture has no layer list; re-export the model")
    latent = architecture.get("latent_dim")
    input_view = architecture.get("input_view")
    input_shape = [latent] if latent else list(architecture.get("image_shape") or [])
    nodes: list[Node] = []
    previous = INPUT
    if input_view:
        nodes.append(Node("input_view", "reshape", [INPUT], {"shape": list(input_view)}))
        previous = "input_view"
    try:
        for index, layer in enumerate(layers):
            node = _node(f"layer_{index}", layer, _layer_tensors(tensors, index))
            if node.op == "identity":
                continue
            node.inputs = [previous]
            nodes.append(node)
            previous = node.name
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"version-1 layer list is damaged ({exc}); re-export the model") from None
    output_shape = architecture.get("output_shape")
    if output_shape is not None:
        nodes.append(Node("output_view", "reshape", [previous], {"shape": list(output_shape)}))
        previous = "output_view"
    meta = {key: architecture.get(key) for key in ("model", "model_kwargs", "image_shape")}
    return Graph(nodes, previous, input_shape, list(output_shape or []), meta)
