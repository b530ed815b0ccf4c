"""The integer path of the ``x86`` backend: weight layers fed by a uniform multi-level activation (e.g. the
8-bit ``act`` / DoReFa quantizers: levels ``lo + step * q``) with affine k-bit weights (k <= 8) run on the
int8 dot-product kernels of ``csrc/int8*.cpp`` (AVX-512 VNNI, AVX2, NEON sdot, scalar).

Derivation in ``csrc/int8.h`` and docs/export.md "The integer path": with ``q`` the activation's level
index and ``z`` the weight code, ``sum_i w_i x_i = step*scale * sum z q + step*offset * sum q + lo * (layer on
ones)``; the two sums are exact int32, the combine is float64 in one fixed order, so every kernel path gives
the same bits and differs from the torch backend only by float rounding (``TOLERANCE``).

A node is claimed when the claim policy (``x86.prefers_planes``: two-level inputs, and at most 4 plane
pairs on more than 4 output channels, stay on the bit planes) does not give it to the bit-serial path and
its input comes from such an activation, possibly through the ops that commute with it (as for binary layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.export.backends.x86 import (
    activation_source,
    build,
    claims,
    integer_weights,
    kernel_layer,
    kernel_prelude,
)
from lowbit.export.backends.x86.binary import QuantWeightLayer
from lowbit.export.ir import Node

NAME = "x86-int8"
WEIGHT_OPS = ("conv2d", "conv_transpose2d", "linear")
MAX_LEVELS = 256
#: how far (in steps) a stored level may sit from lo + k * step and still count as uniform.
UNIFORM_SLACK = 1e-3
CO_ALIGN = 16
BYTES_PER_WORD = 4
#: |kernel - torch backend| <= TOLERANCE * (1 + max |torch backend|) on one layer fed the same input:
#: float32 vs float64 sums of the same products.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class UniformInput:
    """A multi-level activation with levels ``lo + step * q`` (q = 0..count-1) as the kernels see it.

    ``bounds`` are -inf, the float32 midpoints the torch backend buckets with, +inf: the kernels find each
    input's level exactly as ``torch.bucketize`` does (nearest, ties down)."""

    lo: float
    step: float
    count: int
    bounds: torch.Tensor

    @property
    def terms(self) -> tuple[float, float]:
        """``(a, c)``: ``sum_i w_i x_i = c * sum_valid(w) + a * sum_i w_i q_i`` (as ``BinaryInput.terms``)."""
        return self.step, self.lo


def uniform_input(act: Node) -> UniformInput | None:
    """The levels of a ``quant_act`` node when they are 3..256 evenly spaced values, else None."""
    if act.op != "quant_act":
        return None
    levels = act.tensors["levels"].to(torch.float32).sort().values
    count = levels.numel()
    if not 2 < count <= MAX_LEVELS or not torch.isfinite(levels).all():
        return None
    lo, step = float(levels[0]), (float(levels[-1]) - float(levels[0])) / (count - 1)
    ideal = lo + step * torch.arange(count, dtype=torch.float64)
    if step <= 0 or float((levels.double() - ideal).abs().max()) > UNIFORM_SLACK * step:
        return None
    midpoints = (levels[1:] + levels[:-1]) / 2
    infinity = torch.tensor([math.inf])
    return UniformInput(lo, step, count, torch.cat([-infinity, midpoints, infinity]).contiguous())


def claims_int8(node: Node, producers: dict[str, Node]) -> bool:
    """Whether the integer path runs ``node``: a packed, ungrouped, unpruned weight layer with an affine
    codebook of at most 256 levels, fed by a uniform activation, that the bit-serial path does not take."""
    if node.op not in WEIGHT_OPS or claims(node, producers) or not integer_weights(node):
        return False
    if node.attrs.get("groups", 1) != 1:
        return False
    if node.attrs.get("pad") is not None and node.attrs.get("pad_mode", "reflect") == "constant":
        return False
    found = activation_source(node, producers, uniform_input)
    if found is None:
        return False
    return node.op == "linear" or not any(step.op == "reshape" for step in found[1])


@dataclass
class Int8Plan:
    """A layer's arguments to ``int8_conv``: per phase the weight bytes as int32 words (words, co_pad), the
    phase list, coef = step * scale and offset = step * (offset + zero_point * scale) per channel, steps."""

    w_ts: list[torch.Tensor]
    phases: list[int]
    coef: torch.Tensor
    offset: torch.Tensor
    steps: list[int]


def _weight_words(z: torch.Tensor, co_pad: int) -> torch.Tensor:
    """Signed weight bytes (Co, Ci, taps) -> int32 words (taps * ceil(Ci/4), co_pad), channel 4k + b of a
    word in its byte b (little endian, as x86 and ARM64 store it)."""
    out_channels, in_channels, taps = z.shape
    wc = math.ceil(in_channels / BYTES_PER_WORD)
    padded = torch.zeros(taps, wc * BYTES_PER_WORD, co_pad, dtype=torch.int8)
    padded[:, :in_channels, :out_channels] = z.permute(2, 1, 0).to(torch.int8)
    words = padded.reshape(taps, wc, BYTES_PER_WORD, co_pad).permute(0, 1, 3, 2).contiguous()
    return words.view(torch.int32).reshape(taps * wc, co_pad).contiguous()


def build_plan(layer: QuantWeightLayer, source: UniformInput) -> Int8Plan:
    """Weight words per phase (codes minus 128 for 8-bit codebooks, so they fit signed bytes), phases, and the
    combine's coefficients (see the module docstring)."""
    codes = layer._conv_codes().to(torch.int16)
    book = layer.codebook.to(torch.float64)
    offset = book[:, 0]
    scale = book[:, 1] - book[:, 0] if book.shape[1] > 1 else torch.zeros_like(offset)
    zero_point = 128 if book.shape[1] > 128 else 0
    out_channels = codes.shape[0]
    co_pad = math.ceil(out_channels / CO_ALIGN) * CO_ALIGN
    w_ts, phases = [], []
    for ph, pw, kh, kw, th, tw in layer._phase_taps(tuple(codes.shape[2:])):
        sub = codes[:, :, kh][:, :, :, kw] - zero_point
        w_ts.append(_weight_words(sub.reshape(out_channels, codes.shape[1], -1), co_pad))
        phases += [ph, pw, len(th), len(tw), *th, *tw]
    stride = layer._geometry()[0]
    in_step, out_step = ((1, 1), stride) if layer.kind == "conv_transpose2d" else (stride, (1, 1))
    coef = source.step * scale
    return Int8Plan(
        w_ts,
        phases,
        coef.contiguous(),
        (source.step * offset + zero_point * coef).contiguous(),
        [*in_step, *out_step],
    )


class Int8Layer:
    """A packed weight layer on the integer kernels: quantizes its float input to level indices itself."""

    def __init__(self, node: Node, source: UniformInput, shift: torch.Tensor | None, path: str) -> None:
        self.layer = kernel_layer(node, None)
        self.layer.binary_input = source  # the all-ones term of QuantWeightLayer._base: lo * layer(ones)
        self.source, self.shift, self.path = source, shift, path
        self.plan = build_plan(self.layer, source)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.layer.kind == "linear"
        x4 = (x.reshape(x.shape[0], x.shape[1], 1, 1) if flat else x).to(torch.float32)
        base = self.layer._base(x4.shape[2], x4.shape[3])
        plan = self.plan
        out = build.kernel_ops().int8_conv(
            x4,
            self.shift,
            self.source.bounds,
            self.source.lo,
            1.0 / self.source.step,
            plan.w_ts,
            plan.phases,
            plan.coef,
            plan.offset,
            base,
            plan.steps,
            build.path_id(self.path),
        )
        return out.reshape(out.shape[0], -1) if flat else out.permute(0, 3, 1, 2)


def plan_int8(
    node: Node, producers: dict[str, Node], path: str
) -> tuple[Callable[..., torch.Tensor], list[str]]:
    """(callable, inputs) running ``node`` on ``path``'s integer kernels from its activation's input."""
    act, chain = activation_source(node, producers, uniform_input)
    shift = act.tensors.get("shift")
    # The kernel subtracts a per-channel shift itself when nothing moves values before it.
    in_kernel = shift is not None and not chain and node.attrs.get("pad") is None
    prelude = kernel_prelude(node, chain, None if in_kernel else shift)
    kernel_shift = shift.to(torch.float32).contiguous() if in_kernel else None
    layer = Int8Layer(node, uniform_input(act), kernel_shift, path)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(prelude(x))

    return run, [act.inputs[0]]
