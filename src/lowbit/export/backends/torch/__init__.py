"""The ``torch`` backend: every IR op as the torch call the captured module makes, so a packed model on this
backend equals the simulated quantized model bit for bit. Quantized weights are rebuilt once, at planning."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lowbit.export.ir import Node
from lowbit.export.weights import dequantized_weight

Kernel = Callable[..., torch.Tensor]
NAME = "torch"


def weight_of(node: Node) -> torch.Tensor:
    """The float weight of a weight node: stored, or rebuilt from its codes and codebook."""
    return dequantized_weight(node) if node.attrs["weight"]["format"] == "packed" else node.tensors["weight"]


def _conv2d(node: Node) -> Kernel:
    a, weight, bias = node.attrs, weight_of(node), node.tensors.get("bias")
    pad, mode = a.get("pad"), a.get("pad_mode", "constant")

    def run(x: torch.Tensor) -> torch.Tensor:
        if pad is not None:
            x = F.pad(x, pad, mode=mode)
        return F.conv2d(x, weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    return run


def _conv_transpose2d(node: Node) -> Kernel:
    a, weight, bias = node.attrs, weight_of(node), node.tensors.get("bias")
    return lambda x: F.conv_transpose2d(
        x, weight, bias, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"]
    )


def _linear(node: Node) -> Kernel:
    weight, bias = weight_of(node), node.tensors.get("bias")
    return lambda x: F.linear(x, weight, bias)


def _batch_norm(node: Node) -> Kernel:
    t, eps = node.tensors, node.attrs["eps"]
    return lambda x: F.batch_norm(
        x, t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"), False, 0.0, eps
    )


def _instance_norm(node: Node) -> Kernel:
    t, eps, stats = node.tensors, node.attrs["eps"], node.attrs["running_stats"]
    mean, var = (t["running_mean"], t["running_var"]) if stats else (None, None)
    return lambda x: F.instance_norm(x, mean, var, t.get("weight"), t.get("bias"), not stats, 0.0, eps)


def levels_activation(levels: torch.Tensor, shift: torch.Tensor | None) -> Kernel:
    """Nearest of ``levels`` (ties go down), or sign with sign(0) = +1 for levels {-1, +1}; applied to
    ``x - shift[c]`` when a per-channel shift is given (channel dim 1)."""
    levels = levels.to(torch.float32).sort().values
    sign = torch.equal(levels, torch.tensor([-1.0, 1.0]))
    midpoints = (levels[1:] + levels[:-1]) / 2

    def run(x: torch.Tensor) -> torch.Tensor:
        if shift is not None:
            x = x - shift.reshape(1, -1, *([1] * (x.dim() - 2)))
        if sign:
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return levels[torch.bucketize(x, midpoints)]

    return run


def _quant_act(node: Node) -> Kernel:
    return levels_activation(node.tensors["levels"], node.tensors.get("shift"))


def _rprelu(node: Node) -> Kernel:
    """``lowbit.nn.RPReLU``: per-channel shift, PReLU slope and output shift, computed as the module does."""
    t = node.tensors

    def run(x: torch.Tensor) -> torch.Tensor:
        u = x.transpose(1, -1) - t["shift_in"]
        return (torch.where(u >= 0, u, t["slope"] * u) + t["shift_out"]).transpose(1, -1)

    return run


def _elementwise(fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Node], Kernel]:
    def build(node: Node) -> Kernel:
        if "scalar" not in node.attrs:
            return fn
        scalar = node.attrs["scalar"]
        return (lambda x: fn(scalar, x)) if node.attrs["scalar_first"] else (lambda x: fn(x, scalar))

    return build


def _interpolate(node: Node) -> Kernel:
    a = node.attrs
    size = tuple(a["size"]) if isinstance(a["size"], list) else a["size"]
    scale = tuple(a["scale_factor"]) if isinstance(a["scale_factor"], list) else a["scale_factor"]
    return lambda x: F.interpolate(x, size, scale, a["mode"], a["align_corners"], a["recompute_scale_factor"])


def _pad(node: Node) -> Kernel:
    a = node.attrs
    if a["mode"] == "constant":
        return lambda x: F.pad(x, a["pad"], mode="constant", value=a["value"])
    return lambda x: F.pad(x, a["pad"], mode=a["mode"])


def _attr_fn(fn: Callable[..., torch.Tensor], *names: str) -> Callable[[Node], Kernel]:
    return lambda node: lambda x: fn(x, *(node.attrs[name] for name in names))


OPS: dict[str, Callable[[Node], Kernel]] = {
    "conv2d": _conv2d,
    "conv_transpose2d": _conv_transpose2d,
    "linear": _linear,
    "batch_norm": _batch_norm,
    "instance_norm": _instance_norm,
    "layer_norm": lambda n: (
        lambda x: F.layer_norm(
            x, n.attrs["shape"], n.tensors.get("weight"), n.tensors.get("bias"), n.attrs["eps"]
        )
    ),
    "group_norm": lambda n: (
        lambda x: F.group_norm(
            x, n.attrs["groups"], n.tensors.get("weight"), n.tensors.get("bias"), n.attrs["eps"]
        )
    ),
    "quant_act": _quant_act,
    "relu": lambda n: F.relu,
    "tanh": lambda n: torch.tanh,
    "sigmoid": lambda n: torch.sigmoid,
    "silu": lambda n: F.silu,
    "leaky_relu": _attr_fn(F.leaky_relu, "negative_slope"),
    "elu": _attr_fn(F.elu, "alpha"),
    "gelu": lambda n: lambda x: F.gelu(x, approximate=n.attrs["approximate"]),
    "hardtanh": _attr_fn(F.hardtanh, "min_val", "max_val"),
    "prelu": lambda n: lambda x: F.prelu(x, n.tensors["weight"]),
    "rprelu": _rprelu,
    "pad": _pad,
    "interpolate": _interpolate,
    "pixel_shuffle": _attr_fn(F.pixel_shuffle, "factor"),
    "reshape": lambda n: lambda x: x.reshape(x.shape[0], *n.attrs["shape"]),
    "permute": lambda n: lambda x: x.permute(n.attrs["dims"]),
    "cat": lambda n: lambda *xs: torch.cat(xs, n.attrs["dim"]),
    "add": _elementwise(operator.add),
    "sub": _elementwise(operator.sub),
    "mul": _elementwise(operator.mul),
    "div": _elementwise(operator.truediv),
    "mean": lambda n: lambda x: x.mean(n.attrs["dims"], keepdim=n.attrs["keepdim"]),
    "constant": lambda n: lambda: n.tensors["value"],
}


def build(node: Node) -> Kernel:
    """The callable that runs ``node`` on its input tensors."""
    return OPS[node.op](node)
