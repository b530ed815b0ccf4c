"""The ``x86`` backend: conv, transposed conv and linear nodes whose input is a two-level activation run on
the bit-serial kernels of ``csrc/``  (AVX-512 VPOPCNTDQ, AVX2 or scalar, picked at run time).

A weight node is claimed when its input comes from a ``quant_act`` node with two levels, possibly through
reflect / replicate pads, nearest up-sampling and reshapes (which commute with an element-wise activation):
the node then reads the
activation's *input* and binarises it while packing, so the float activation tensor is never built when
nothing else reads it. Everything else runs on the torch backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.export.backends import torch as torch_backend
from lowbit.export.backends.x86 import build
from lowbit.export.backends.x86.binary import SIGN_INPUT, BinaryInput, QuantWeightLayer
from lowbit.export.ir import Node
from lowbit.export.weights import codebook, codes, mask

NAME = "x86"
WEIGHT_OPS = ("conv2d", "conv_transpose2d", "linear")
#: ops that commute with an element-wise two-level activation, so the kernel may apply them before it.
PASSTHROUGH = ("reshape",)


def binary_input(act: Node) -> BinaryInput | None:
    """The two levels of a ``quant_act`` node as the kernels see them, or None when it has more levels."""
    if act.op != "quant_act" or act.tensors["levels"].numel() != 2:
        return None
    low, high = sorted(float(v) for v in act.tensors["levels"])
    if high <= low:
        return None
    if (low, high) == (-1.0, 1.0):
        return SIGN_INPUT
    return BinaryInput(low, high, ties_up=False)


def _commutes(node: Node) -> bool:
    if node.op == "pad":
        return node.attrs["mode"] in ("reflect", "replicate")
    if node.op == "interpolate":
        return node.attrs["mode"] == "nearest"
    return node.op in PASSTHROUGH


def activation_source(
    node: Node, producers: dict[str, Node], accepts: Callable[[Node], object] = binary_input
) -> tuple[Node, list[Node]] | None:
    """The activation feeding ``node`` that ``accepts`` takes (default: a two-level one) and the commuting
    nodes in between (in order)."""
    chain: list[Node] = []
    current = producers.get(node.inputs[0])
    while current is not None and _commutes(current):
        chain.insert(0, current)
        current = producers.get(current.inputs[0])
    if current is None or accepts(current) is None:
        return None
    return current, chain


def _hyper(node: Node) -> dict:
    a = node.attrs
    if node.op == "linear":
        return {}
    hyper = {
        "stride": tuple(a["stride"]),
        "padding": tuple(a["padding"]),
        "dilation": tuple(a["dilation"]),
        "groups": a["groups"],
    }
    if node.op == "conv_transpose2d":
        hyper["output_padding"] = tuple(a["output_padding"])
    return hyper


def kernel_layer(node: Node, binary: BinaryInput) -> QuantWeightLayer:
    """The bit-serial layer of a packed weight node fed by ``binary``."""
    weight = node.attrs["weight"]
    return QuantWeightLayer(
        node.op,
        codes(node),
        codebook(node),
        weight["channel_dim"],
        node.tensors.get("bias"),
        _hyper(node),
        binary,
        affine=weight["codebook"] == "affine",
        mask=mask(node),
    )


def claims(node: Node, producers: dict[str, Node]) -> bool:
    """Whether this backend runs ``node``: a packed, ungrouped weight layer fed by a two-level activation."""
    if node.op not in WEIGHT_OPS or node.attrs["weight"]["format"] != "packed":
        return False
    if node.attrs.get("groups", 1) != 1 or node.attrs.get("pad_mode", "reflect") == "constant":
        return False
    found = activation_source(node, producers)
    if found is None:
        return False
    chain = found[1]
    return node.op == "linear" or not any(step.op == "reshape" for step in chain)


def plan(node: Node, producers: dict[str, Node], path: str) -> tuple[Callable[..., torch.Tensor], list[str]]:
    """(callable, inputs) running ``node`` on ``path``'s kernels from its activation's input."""
    act, chain = activation_source(node, producers)
    binary = binary_input(act)
    layer = kernel_layer(node, binary)
    layer.kernel_path = path
    prelude = kernel_prelude(node, chain, act.tensors.get("shift"))

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(prelude(x))

    return run, [act.inputs[0]]


def kernel_prelude(
    node: Node, chain: list[Node], shift: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a kernel layer applies to its activation's input first: minus the per-channel ``shift`` (if
    given), the commuting ``chain``, then the layer's own reflect / replicate pad."""
    steps = [torch_backend.build(step) for step in chain]
    pad = node.attrs.get("pad")
    if pad is not None:
        steps.append(lambda x: torch.nn.functional.pad(x, pad, mode=node.attrs["pad_mode"]))

    def run(x: torch.Tensor) -> torch.Tensor:
        if shift is not None:
            x = x - shift.reshape(1, -1, *([1] * (x.dim() - 2)))
        for step in steps:
            x = step(x)
        return x

    return run


def claims_latent(node: Node) -> bool:
    """A transposed conv that a generator applies to its 1 x 1 latent (no padding, dilation or groups): on a
    1 x 1 input it is one GEMM, which this backend runs instead of torch's slow transposed-conv dispatch."""
    a = node.attrs
    return (
        node.op == "conv_transpose2d"
        and a["padding"] == [0, 0]
        and a["output_padding"] == [0, 0]
        and a["dilation"] == [1, 1]
        and a["groups"] == 1
    )


def plan_latent(node: Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The latent GEMM of ``claims_latent`` (any other input size falls back to the transposed conv)."""
    fallback = torch_backend.build(node)
    weight = torch_backend.weight_of(node)
    in_channels, out_channels, kh, kw = weight.shape
    matrix = weight.reshape(in_channels, -1).contiguous()
    bias = node.tensors.get("bias")

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (1, 1):
            return fallback(x)
        out = (x.reshape(x.shape[0], in_channels) @ matrix).reshape(x.shape[0], out_channels, kh, kw)
        return out if bias is None else out + bias[:, None, None]

    return run


def available() -> list[str]:
    """This machine's kernel paths, fastest first (empty without a C++ compiler)."""
    return [path for path in build.available_paths() if path != build.TORCH_PATH]
