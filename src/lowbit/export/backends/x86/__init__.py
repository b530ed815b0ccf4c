"""The ``x86`` backend: conv, transposed conv and linear nodes whose input is a two-level or affine 3-16 level
activation run on the bit-serial kernels of ``csrc/`` (AVX-512 VPOPCNTDQ, AVX2 or scalar, picked at run time).

A weight node is claimed when its input comes from such a ``quant_act`` node, possibly through reflect /
replicate pads, nearest up-sampling and reshapes (which commute with an element-wise activation): the node
then reads the activation's *input* and codes it while packing (sign bits, or the bit planes of the level
index), so the float activation tensor is never built when nothing else reads it. An eval BatchNorm right
before the activation folds into per-channel thresholds (``binary.fold_batch_norm``): the node then reads
the BatchNorm's input. Everything else runs on the torch backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowbit.export.backends import torch as torch_backend
from lowbit.export.backends.x86 import build
from lowbit.export.backends.x86.binary import (
    BITS_PER_WORD,
    SIGN_INPUT,
    BinaryInput,
    LevelsInput,
    QuantWeightLayer,
    affine_levels,
    fold_batch_norm,
    levels_input,
)
from lowbit.export.ir import Node
from lowbit.export.weights import codebook, codes, mask

NAME = "x86"
WEIGHT_OPS = ("conv2d", "conv_transpose2d", "linear")
#: ops that commute with an element-wise two-level activation, so the kernel may apply them before it.
PASSTHROUGH = ("reshape",)
#: most weight planes x activation planes a multi-level input runs as bit planes when the integer path can
#: take the layer (W4A4 measured 1.67x ORT on the integer path vs ~0.6x on 16 plane pairs; W2A2 about equal)
MAX_PLANE_PAIRS = 4
#: most output channels of a layer whose multi-level input spans more than one word (64 channels) a pixel that
#: runs on the integer path when it can: its few rows fall to the plane kernels' generic lane loop (W2A2's
#: 32->1 output layer took 1.1 ms there vs 0.6 ms on the integer path); within one word the one-word lane
#: kernels beat the integer path (dcgan-g-28 W2A2 at b=64: 1.86 vs 2.21 ms, docs/RESULTS.md)
FEW_OUTPUT_CHANNELS = 4
#: most weight levels the integer kernels take (signed bytes)
MAX_INTEGER_LEVELS = 256
#: rows (batch) from which the latent GEMM runs on oneDNN: torch's BLAS (MKL) takes a slow generic path on
#: AMD CPUs (64 x 100 x 2048: 0.30 ms vs oneDNN 0.15 ms on the AMD EPYC), but its one-row product is faster
#: (0.014 vs 0.029 ms)
ONEDNN_MIN_ROWS = 16


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


def activation_input(act: Node) -> BinaryInput | LevelsInput | None:
    """How the kernels code a ``quant_act`` node's output: two levels as sign bits, 3-16 affine levels as
    the bit planes of the level index; None for anything else (such a layer stays on the float path)."""
    if act.op != "quant_act":
        return None
    binary = binary_input(act)
    if binary is not None:
        return binary
    levels = affine_levels(act.tensors["levels"])
    return None if levels is None else levels_input(levels)


def act_thresholds(act: Node) -> torch.Tensor:
    """The unfused thresholds (float32) of a claimed activation, where its output switches level."""
    coding = activation_input(act)
    if isinstance(coding, LevelsInput):
        return coding.thresholds.reshape(-1)
    return torch.tensor([coding.threshold], dtype=torch.float32)


def _fold(act: Node, norm: Node) -> LevelsInput:
    """The activation ``act`` of the BatchNorm ``norm``'s output as per-channel thresholds on its input."""
    levels = act.tensors["levels"].to(torch.float32).reshape(-1).sort().values
    midpoints = ((levels[1:] + levels[:-1]) / 2).reshape(1, -1)  # the torch backend's float32 midpoints
    ties_up = activation_input(act) is SIGN_INPUT
    shift = act.tensors.get("shift")
    return fold_batch_norm(levels, midpoints, ties_up, shift, norm.tensors, norm.attrs["eps"])


def fused_norm(act: Node, chain: list[Node], producers: dict[str, Node]) -> Node | None:
    """The eval BatchNorm whose output ``act`` reads, when it folds into the packing thresholds (channels
    kept: no reshape between the activation and the layer), else None."""
    norm = producers.get(act.inputs[0])
    if norm is None or norm.op != "batch_norm" or any(step.op == "reshape" for step in chain):
        return None
    return norm


def _commutes(node: Node) -> bool:
    if node.op == "pad":
        return node.attrs["mode"] in ("reflect", "replicate")
    if node.op == "interpolate":
        return node.attrs["mode"] == "nearest"
    return node.op in PASSTHROUGH


def activation_source(
    node: Node, producers: dict[str, Node], accepts: Callable[[Node], object] | None = None
) -> tuple[Node, list[Node]] | None:
    """The activation feeding ``node`` that ``accepts`` takes (default: one the bit-serial kernels code,
    ``activation_input``) and the commuting nodes in between (in order)."""
    accepts = activation_input if accepts is None else accepts
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


def kernel_layer(node: Node, binary: BinaryInput | LevelsInput) -> QuantWeightLayer:
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


def integer_weights(node: Node) -> bool:
    """Whether the integer path (``int8.py``) can take ``node``'s weights: packed, affine, unpruned, at most
    8 bits (table codebooks, sparse and wider weights only run as bit planes)."""
    weight = node.attrs["weight"]
    return (
        weight["format"] == "packed"
        and weight["codebook"] == "affine"
        and not weight.get("sparse")
        and weight["levels"] <= MAX_INTEGER_LEVELS
    )


def _bits(levels: int) -> int:
    """Planes needed for codes 0..levels-1."""
    return max(1, math.ceil(math.log2(levels)))


def _out_channels(node: Node) -> int:
    """Output channels of an ungrouped weight layer: conv (Co, Ci, kh, kw), transposed conv
    (Ci, Co, kh, kw), linear (Co, Ci)."""
    shape = node.attrs["weight"]["shape"]
    return shape[1] if node.op == "conv_transpose2d" else shape[0]


def _in_channels(node: Node) -> int:
    """Input channels of an ungrouped weight layer (see ``_out_channels``)."""
    shape = node.attrs["weight"]["shape"]
    return shape[0] if node.op == "conv_transpose2d" else shape[1]


def prefers_planes(node: Node, act: Node) -> bool:
    """The claim policy between the kernel families (docs/export.md "Which kernels run a layer"): two-level
    inputs run as bit planes; 3-16 affine levels too when weight planes x activation planes <= MAX_PLANE_PAIRS
    and the layer has more than FEW_OUTPUT_CHANNELS outputs or at most 64 inputs, or when the integer path
    cannot take the weights; otherwise (e.g. W4A4, W2A8, a W2A2 layer 128 -> 1) the integer path."""
    coding = activation_input(act)
    if not isinstance(coding, LevelsInput) or not integer_weights(node):
        return True
    if _out_channels(node) <= FEW_OUTPUT_CHANNELS and _in_channels(node) > BITS_PER_WORD:
        return False
    return _bits(node.attrs["weight"]["levels"]) * _bits(len(coding.levels)) <= MAX_PLANE_PAIRS


def claims(node: Node, producers: dict[str, Node]) -> bool:
    """Whether this backend's bit-serial kernels run ``node``: a packed, ungrouped weight layer fed by a
    coded activation, when the claim policy (``prefers_planes``) picks bit planes."""
    if node.op not in WEIGHT_OPS or node.attrs["weight"]["format"] != "packed":
        return False
    if node.attrs.get("groups", 1) != 1 or node.attrs.get("pad_mode", "reflect") == "constant":
        return False
    found = activation_source(node, producers)
    if found is None or not prefers_planes(node, found[0]):
        return False
    chain = found[1]
    return node.op == "linear" or not any(step.op == "reshape" for step in chain)


def plan(
    node: Node, producers: dict[str, Node], path: str, fuse_norm: bool = True
) -> tuple[Callable[..., torch.Tensor], list[str]]:
    """(callable, inputs) running ``node`` on ``path``'s kernels from its activation's input, or from the
    input of the BatchNorm before it when that folds into the thresholds (``fuse_norm``)."""
    act, chain = activation_source(node, producers)
    norm = fused_norm(act, chain, producers) if fuse_norm else None
    layer = kernel_layer(node, activation_input(act) if norm is None else _fold(act, norm))
    layer.kernel_path = path
    prelude = kernel_prelude(node, chain, act.tensors.get("shift") if norm is None else None)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(prelude(x))

    return run, [act.inputs[0] if norm is None else norm.inputs[0]]


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


def onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear ``(x, weight (out, in), bias, "none", [], "")``, or None where this torch build
    lacks it (a private op: looked up, never assumed)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def plan_latent(node: Node) -> Callable[[torch.Tensor], torch.Tensor]:
    """The latent GEMM of ``claims_latent`` (any other input size falls back to the transposed conv): from
    ONEDNN_MIN_ROWS rows on oneDNN where torch has it, else torch's BLAS."""
    fallback = torch_backend.build(node)
    weight = torch_backend.weight_of(node)
    in_channels, out_channels, kh, kw = weight.shape
    matrix = weight.reshape(in_channels, -1).contiguous()
    rows_major = matrix.t().contiguous()  # oneDNN's (out, in) weight
    linear = onednn_linear()
    bias = node.tensors.get("bias")

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (1, 1):
            return fallback(x)
        flat = x.reshape(x.shape[0], in_channels)
        if linear is not None and flat.shape[0] >= ONEDNN_MIN_ROWS and flat.dtype == torch.float32:
            product = linear(flat.contiguous(), rows_major, None, "none", [], "")
        else:
            product = flat @ matrix
        out = product.reshape(x.shape[0], out_channels, kh, kw)
        return out if bias is None else out + bias[:, None, None]

    return run


def available() -> list[str]:
    """This machine's kernel paths, fastest first (empty without a C++ compiler)."""
    return [path for path in build.available_paths() if path != build.TORCH_PATH]
