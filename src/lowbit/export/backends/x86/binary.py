"""Inference modules of a packed model: quantized weight layers (bit-serial kernels on binary input), acts.

A ``QuantWeightLayer`` keeps its k-bit codes and per-channel codebook. When its input comes from a binary
activation (sign, or any two-level quantizer such as 1-bit ``act`` with levels {0, a}: ``BinaryInput``) or
an affine multi-level one, possibly behind a folded BatchNorm (``LevelsInput``), it codes the input itself
and, on a kernel path, runs the ``csrc/`` kernels (derivation in ``kernels.h``'s header and docs/export.md);
otherwise (or on the "torch" path) it runs the float layer on the dequantized weights, the reference the
kernels are tested against. Table codebooks run as the planes of ``decompose_codebook``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.backends.x86 import build as kernels

WEIGHT_KINDS = ("conv2d", "conv_transpose2d", "linear")
BITS_PER_WORD = 64
ROW_ALIGN = 8


@dataclass(frozen=True)
class BinaryInput:
    """The two values of the binary activation feeding a layer and where it switches between them.

    Input x becomes ``high`` when x >= threshold (``ties_up``, the sign convention sign(0) = +1) or
    when x > threshold (otherwise: the nearest level with ties going down, as the torch backend), else
    ``low``; the threshold is the midpoint of the two values.
    """

    low: float
    high: float
    ties_up: bool

    @property
    def threshold(self) -> float:
        return (self.low + self.high) / 2

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The activation itself (the float reference path)."""
        high = x >= self.threshold if self.ties_up else x > self.threshold
        return torch.where(high, torch.full_like(x, self.high), torch.full_like(x, self.low))

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor whose bits (>= 0) the kernel packs: x - t (bit marks ``high``) when ties go up,
        t - x (bit marks ``low``) otherwise, so both conventions reuse the sign packer exactly."""
        if self.ties_up:
            return x if self.threshold == 0 else x - self.threshold
        return self.threshold - x

    @property
    def terms(self) -> tuple[float, float]:
        """``(a, c)`` with ``sum_i w_i x_i = c * sum_valid(w) + a * sum_i w_i bit_i`` for the packed bits:
        x_i = low + gap * bit_i when ties go up (sign: a = 2, c = -1), x_i = high - gap * bit_i otherwise."""
        gap = self.high - self.low
        return (gap, self.low) if self.ties_up else (-gap, self.high)


#: sign(x) with sign(0) = +1 (SPEC §2)
SIGN_INPUT = BinaryInput(-1.0, 1.0, ties_up=True)

#: most activation levels the kernels code into bit planes (4 planes)
MAX_LEVELS = 16
#: |level_j - (low + step * j)| allowed, relative to the largest |level|, for levels to count as affine
AFFINE_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class LevelsInput:
    """An affine multi-level activation (levels ``low + step * j``) that the kernels code while packing.

    Input channel c's code is ``j = #{m : signs[c] * x > thresholds[c, m]}`` (``>=`` when ``ties_up``) and its
    value ``levels[j]``; bit b of j is activation plane b, so a layer costs weight planes x activation planes
    (docs/export.md "Kernels"). Unfused, the thresholds are the levels' float32 midpoints for every channel
    (ties go down, as torch.bucketize); a folded BatchNorm makes them per channel (``fold_batch_norm``).
    """

    levels: torch.Tensor  # (L,) float32, ascending
    thresholds: torch.Tensor  # (C or 1, L - 1) float32, ascending along dim 1
    signs: torch.Tensor  # (C or 1,) float32 of +1 / -1
    ties_up: bool

    @property
    def terms(self) -> tuple[float, float]:
        """``(a, c)`` with value = c + a * code: the step and the lowest level."""
        low, high = float(self.levels[0]), float(self.levels[-1])
        return (high - low) / (len(self.levels) - 1), low

    def channel_args(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Thresholds (channels, L - 1) and signs (channels,), contiguous float32 (``levels_conv``'s)."""
        count = self.thresholds.shape[1]
        return (
            self.thresholds.expand(channels, count).contiguous(),
            self.signs.expand(channels).contiguous(),
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer code of every element of x (N, C, ...), exactly as the kernels' packer computes it."""
        thresholds, signs = self.channel_args(x.shape[1])
        view = (1, x.shape[1], *([1] * (x.dim() - 2)))
        y = (x * signs.reshape(view)).unsqueeze(-1)
        t = thresholds.reshape(*view, -1)
        return ((y >= t) if self.ties_up else (y > t)).sum(dim=-1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The activation itself (the float reference path)."""
        return self.levels[self.codes(x)]


def affine_levels(levels: torch.Tensor) -> torch.Tensor | None:
    """The sorted float32 levels when they are ``low + step * j`` (within AFFINE_TOLERANCE) and 3 to
    MAX_LEVELS of them, else None (such activations stay on the float path)."""
    values = levels.to(torch.float32).reshape(-1).sort().values
    count = values.numel()
    if not 3 <= count <= MAX_LEVELS or not bool(torch.isfinite(values).all()) or values[-1] <= values[0]:
        return None
    exact = values.to(torch.float64)
    line = exact[0] + (exact[-1] - exact[0]) / (count - 1) * torch.arange(count, dtype=torch.float64)
    if float((exact - line).abs().max()) > AFFINE_TOLERANCE * float(exact.abs().max()):
        return None
    return values


def levels_input(levels: torch.Tensor) -> LevelsInput:
    """The unfused coding of sorted float32 ``levels``: the torch backend's midpoints, ties going down."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return LevelsInput(levels, midpoints.reshape(1, -1), torch.ones(1), ties_up=False)


def _round_threshold(value: torch.Tensor, ties_up: bool) -> torch.Tensor:
    """float64 thresholds as float32 that float32 inputs compare against exactly as against the float64
    values: rounded down for ``y > t``, up for ``y >= t``."""
    rounded = value.to(torch.float32)
    wrong = rounded < value if ties_up else rounded > value
    towards = torch.full_like(rounded, math.inf if ties_up else -math.inf)
    return torch.where(wrong, torch.nextafter(rounded, towards), rounded)


def fold_batch_norm(
    levels: torch.Tensor,
    thresholds: torch.Tensor,
    ties_up: bool,
    shift: torch.Tensor | None,
    bn: dict[str, torch.Tensor],
    eps: float,
) -> LevelsInput:
    """The activation ``levels`` with ``thresholds`` (1, L-1), applied to ``BN(x) - shift``, as per-channel
    thresholds on x: BN(x) = (x - mean) * s + beta with s = gamma / sqrt(var + eps), so BN(x) - shift > t
    iff x > mean + (t + shift - beta) / s for s > 0, and -x > -(same) for s < 0 (the comparison flips);
    s = 0 makes the code constant (thresholds -inf or +inf). Computed in float64, rounded so the float32
    comparison equals the float64 one (exact folding up to float64 rounding; docs/export.md "Fusion")."""
    mean, var = bn["running_mean"].to(torch.float64), bn["running_var"].to(torch.float64)
    channels = mean.numel()
    gamma = bn["weight"].to(torch.float64) if "weight" in bn else torch.ones(channels, dtype=torch.float64)
    beta = bn["bias"].to(torch.float64) if "bias" in bn else torch.zeros(channels, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + eps)
    shifted = thresholds.to(torch.float64).expand(channels, -1)
    if shift is not None:
        shifted = shifted + shift.to(torch.float64).reshape(-1, 1)
    crossing = mean[:, None] + (shifted - beta[:, None]) / scale[:, None]
    signs = torch.where(scale < 0, -1.0, 1.0).to(torch.float64)
    folded = crossing * signs[:, None]
    passes = (beta[:, None] >= shifted) if ties_up else (beta[:, None] > shifted)
    constant = torch.where(passes, -math.inf, math.inf).to(torch.float64)
    folded = torch.where((scale == 0)[:, None], constant, folded)
    return LevelsInput(levels, _round_threshold(folded, ties_up), signs.to(torch.float32), ties_up)


@dataclass
class _Plan:
    """A layer's arguments to the ``binary_conv`` kernel (csrc/bitserial.cpp): every phase's packed rows,
    the phases as [ph, pw, n_tap_h, n_tap_w, tap_h..., tap_w...] (output pixels q*out_step + phase read
    input q*in_step + tap), a * coefficients (P*Co,), a * offsets (Co,) and [in_step, out_step], where a
    is the input's bit weight (2 for sign input, see ``BinaryInput.kernel_input_and_terms``)."""

    w_ts: list[torch.Tensor]
    phases: list[int]
    coef_a: torch.Tensor
    offset_a: torch.Tensor
    steps: list[int]


#: a codebook decomposition: (offset, plane coefficients, per-code plane mask) with
#: level[code] = offset + sum_p coef[p] * bit_p(mask[code])
Decomposition = tuple[float, list[float], list[int]]


def _additive(row: list[float], tol: float) -> Decomposition | None:
    """LQ-Nets' ``v^T e`` form (003 §3.1): 2^k levels that are all subset sums ``low + sum_{b in S} g_b`` of k
    generators (recovered smallest first, as subset-sum multisets are), so k planes weighted by the basis."""
    n = len(row)
    if n < 2 or n & (n - 1):
        return None
    order = sorted(range(n), key=row.__getitem__)
    low = row[order[0]]
    remaining = [(row[code] - low, code) for code in order[1:]]
    sums, masks, gens = [(0.0, 0)], {order[0]: 0}, []
    while remaining:
        g, bit = remaining[0][0], 1 << len(gens)
        grown = []
        for value, pattern in sums:
            match = next((j for j, (d, _) in enumerate(remaining) if abs(d - value - g) <= tol), None)
            if match is None:
                return None
            masks[remaining.pop(match)[1]] = pattern | bit
            grown.append((value + g, pattern | bit))
        sums += grown
        gens.append(g)
    return low, gens, [masks[code] for code in range(n)]


def _fixed_point(row: list[float], tol: float) -> Decomposition | None:
    """Levels on a grid ``low + q * z`` (z integer, q the smallest gap), e.g. signed powers of two (002 §2,
    ``{±2^-e}``: q = the smallest power): bit b of z is plane b with coefficient ``q * 2^b``."""
    low = min(row)
    ordered = sorted(row)
    gaps = [b - a for a, b in zip(ordered, ordered[1:], strict=False) if b - a > tol]
    if not gaps:
        return None
    q = min(gaps)
    z = [round((v - low) / q) for v in row]
    if any(abs(v - low - q * k) > tol for v, k in zip(row, z, strict=True)):
        return None
    return low, [q * 2**b for b in range(max(z).bit_length())], z


def _one_hot(row: list[float]) -> Decomposition:
    """Any table: plane l-1 marks code l, coefficient ``level_l - level_0`` (2^k - 1 planes)."""
    masks = [0 if code == 0 else 1 << (code - 1) for code in range(len(row))]
    return row[0], [v - row[0] for v in row[1:]], masks


def decompose_codebook(row: list[float]) -> Decomposition:
    """The exact (within AFFINE_TOLERANCE of the largest level) decomposition of one channel's codebook with
    the fewest planes: additive (LQ-Nets), fixed-point (powers of two), else one-hot."""
    tol = AFFINE_TOLERANCE * max(abs(v) for v in row)
    found = [d for d in (_additive(row, tol), _fixed_point(row, tol)) if d is not None]
    return min([*found, _one_hot(row)], key=lambda d: len(d[1]))


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _row_index(shape: torch.Size, channel_dim: int) -> torch.Tensor:
    """Codebook row of every weight element: its index along ``channel_dim``."""
    view = [1] * len(shape)
    view[channel_dim] = shape[channel_dim]
    return torch.arange(shape[channel_dim]).reshape(view).expand(shape)


def _pack_bit_rows(bits: torch.Tensor) -> torch.Tensor:
    """bool (rows, taps, C) -> int64 words (rows, taps * ceil(C/64)); channel c is bit c%64 of word c//64."""
    rows, taps, channels = bits.shape
    words = math.ceil(channels / BITS_PER_WORD)
    padded = torch.zeros(rows, taps, words * BITS_PER_WORD, dtype=torch.int64)
    padded[:, :, :channels] = bits.to(torch.int64)
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int64)
    return (
        (padded.reshape(rows, taps, words, BITS_PER_WORD) << shifts).sum(dim=-1).reshape(rows, taps * words)
    )


def _table_planes(codes: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planes, coefficients and offsets of a table codebook ``book`` (Co, levels) float64 for ``codes``
    (Co, ...): each channel decomposed on its own, channels with fewer planes padded with empty ones."""
    parts = [decompose_codebook(row) for row in book.tolist()]
    count = max(len(coef) for _, coef, _ in parts)
    coef = torch.zeros(count, len(parts), dtype=torch.float64)
    masks = torch.zeros(len(parts), book.shape[1], dtype=torch.int64)
    for c, (_, row_coef, row_masks) in enumerate(parts):
        coef[: len(row_coef), c] = torch.tensor(row_coef, dtype=torch.float64)
        masks[c] = torch.tensor(row_masks)
    offset = torch.tensor([low for low, _, _ in parts], dtype=torch.float64)
    channel = torch.arange(codes.shape[0]).reshape(-1, *([1] * (codes.dim() - 1))).expand(codes.shape)
    mask = masks[channel, codes.long()]
    planes = torch.stack([(mask >> p) & 1 for p in range(count)]).bool()
    return planes, coef, offset


class QuantWeightLayer(nn.Module):
    """Conv2d / ConvTranspose2d / Linear rebuilt from k-bit codes + a per-channel codebook."""

    def __init__(
        self,
        kind: str,
        codes: torch.Tensor,
        codebook: torch.Tensor,
        channel_dim: int,
        bias: torch.Tensor | None,
        hyper: dict,
        binary_input: BinaryInput | LevelsInput | None,
        affine: bool,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in WEIGHT_KINDS:
            raise ConfigError(f"unknown weight layer kind '{kind}'; valid: {', '.join(WEIGHT_KINDS)}")
        self.kind, self.binary_input, self.affine = kind, binary_input, affine
        self.hyper = dict(hyper)
        self.kernel_path = kernels.TORCH_PATH
        channels = codes.shape[channel_dim]
        self.codebook = codebook.to(torch.float32).expand(channels, -1).contiguous()
        self.codes = codes.to(torch.uint8)
        self.mask = None if mask is None else mask.to(torch.float32)
        weight = self.codebook[_row_index(codes.shape, channel_dim), codes.long()]
        self.register_buffer("weight", weight if self.mask is None else weight * self.mask)
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32))
        self._plan: _Plan | None = None
        self._base_cache: dict[tuple[int, int], torch.Tensor] = {}

    # ----- float reference path -----
    def _is_pointwise_transpose(self, x: torch.Tensor) -> bool:
        """A transposed conv on a 1x1 input without padding (a generator's latent layer) is one matmul."""
        hyper = self.hyper
        return (
            self.kind == "conv_transpose2d"
            and x.dim() == 4
            and x.shape[2] == x.shape[3] == 1
            and _pair(hyper["padding"]) == (0, 0)
            and _pair(hyper["output_padding"]) == (0, 0)
            and hyper["groups"] == 1
        )

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_pointwise_transpose(x):
            in_channels, out_channels, kh, kw = self.weight.shape
            out = (x.reshape(x.shape[0], in_channels) @ self.weight.reshape(in_channels, -1)).reshape(
                x.shape[0], out_channels, kh, kw
            )
            return out if self.bias is None else out + self.bias[:, None, None]
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "conv2d":
            return F.conv2d(
                x,
                self.weight,
                self.bias,
                self.hyper["stride"],
                self.hyper["padding"],
                self.hyper["dilation"],
                self.hyper["groups"],
            )
        return F.conv_transpose2d(
            x,
            self.weight,
            self.bias,
            self.hyper["stride"],
            self.hyper["padding"],
            self.hyper["output_padding"],
            self.hyper["groups"],
            self.hyper["dilation"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary_input is None:
            return self._float_forward(x)
        if self.kernel_path == kernels.TORCH_PATH or self.hyper.get("groups", 1) != 1:
            return self._float_forward(self.binary_input.apply(x))
        return self._kernel_forward(x)

    # ----- bit-serial kernel path -----
    def _conv_codes(self) -> torch.Tensor:
        """Codes as (Co, Ci, Kh, Kw): conv layout (a transposed conv's weight is (Ci, Co, Kh, Kw))."""
        return self._conv_layout(self.codes)

    def _conv_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return tensor[:, :, None, None]
        return tensor.transpose(0, 1) if self.kind == "conv_transpose2d" else tensor

    def _masked(
        self, planes: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pruned layer: w = mask * (offset + sum coef plane) = offset * mask + sum coef (plane & mask),
        so the mask becomes one more plane with coefficient ``offset`` and the offset becomes 0 (exact)."""
        if self.mask is None:
            return planes, coef, offset
        keep = self._conv_layout(self.mask).bool()
        return (
            torch.cat([planes & keep, keep[None]]),
            torch.cat([coef, offset[None]]),
            torch.zeros_like(offset),
        )

    def _planes(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bit planes (P, Co, Ci, Kh, Kw), coefficients (P, Co) and offsets (Co,) with
        w = offset + sum_p coef[p] * plane_p (affine: bit planes, coef = scale * 2^b; tables: the cheapest
        ``decompose_codebook`` of each channel)."""
        book = self.codebook.to(torch.float64)
        offset = book[:, 0]
        if self.affine:
            bits = max(1, math.ceil(math.log2(book.shape[1])))
            scale = book[:, 1] - book[:, 0] if book.shape[1] > 1 else torch.zeros_like(offset)
            planes = torch.stack([(codes.long() >> b) & 1 for b in range(bits)]).bool()
            coef = torch.stack([scale * 2**b for b in range(bits)])
        else:
            planes, coef, offset = _table_planes(codes, book)
        return planes, coef, offset

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        if self.kind == "linear":
            return (1, 1), (0, 0), (1, 1)
        return _pair(self.hyper["stride"]), _pair(self.hyper["padding"]), _pair(self.hyper["dilation"])

    def _phase_taps(
        self, kernel: tuple[int, int]
    ) -> list[tuple[int, int, list[int], list[int], list[int], list[int]]]:
        """(ph, pw, kh indices, kw indices, tap_h offsets, tap_w offsets) for every phase."""
        stride, padding, dilation = self._geometry()
        if self.kind != "conv_transpose2d":
            kh, kw = list(range(kernel[0])), list(range(kernel[1]))
            return [
                (
                    0,
                    0,
                    kh,
                    kw,
                    [k * dilation[0] - padding[0] for k in kh],
                    [k * dilation[1] - padding[1] for k in kw],
                )
            ]

        def axis(phase: int, dim: int) -> tuple[list[int], list[int]]:
            ks = [
                k for k in range(kernel[dim]) if (phase + padding[dim] - k * dilation[dim]) % stride[dim] == 0
            ]
            return ks, [(phase + padding[dim] - k * dilation[dim]) // stride[dim] for k in ks]

        result = []
        for ph, pw in itertools.product(range(stride[0]), range(stride[1])):
            (kh, th), (kw, tw) = axis(ph, 0), axis(pw, 1)
            result.append((ph, pw, kh, kw, th, tw))
        return result

    def _build_plan(self) -> _Plan:
        """Pack every phase's plane rows word-major (L, rows padded to 8), the layout the kernels stream,
        plus the phase list, the plane coefficients and offsets times the input's bit weight a (eq. 1's
        factor 2 for sign input, exact) and the input/output steps, all in the form ``binary_conv`` takes."""
        bit_weight = self.binary_input.terms[0]
        codes = self._conv_codes()
        planes, coef, offset = self._masked(*self._planes(codes))
        n_planes, out_channels, in_channels = planes.shape[:3]
        w_ts, phase_list = [], []
        for ph, pw, kh, kw, th, tw in self._phase_taps(tuple(codes.shape[2:])):
            sub = planes[:, :, :, kh][:, :, :, :, kw].permute(0, 1, 3, 4, 2)
            rows = _pack_bit_rows(sub.reshape(n_planes * out_channels, len(kh) * len(kw), in_channels))
            padded_rows = math.ceil(rows.shape[0] / ROW_ALIGN) * ROW_ALIGN
            w_t = torch.zeros(rows.shape[1], padded_rows, dtype=torch.int64)
            w_t[:, : rows.shape[0]] = rows.t()
            w_ts.append(w_t.contiguous())
            phase_list += [ph, pw, len(th), len(tw), *th, *tw]
        stride = self._geometry()[0]
        in_step, out_step = ((1, 1), stride) if self.kind == "conv_transpose2d" else (stride, (1, 1))
        return _Plan(
            w_ts,
            phase_list,
            (bit_weight * coef).reshape(-1).contiguous(),
            (bit_weight * offset).contiguous(),
            [*in_step, *out_step],
        )

    def _base(self, height: int, width: int) -> torch.Tensor:
        """bias + c * (layer on an all-ones input), the input-independent term of eq. (1) (c = -1 for sign
        input, see ``BinaryInput.terms``), as (Ho, Wo, Co)."""
        key = (height, width)
        if key not in self._base_cache:
            in_channels = self._conv_codes().shape[1]
            ones = torch.ones(1, in_channels, height, width, dtype=torch.float64)
            weight = self.weight.to(torch.float64)
            if self.kind == "linear":
                corr = F.linear(ones[:, :, 0, 0], weight)[:, :, None, None]
            elif self.kind == "conv2d":
                corr = F.conv2d(
                    ones, weight, None, self.hyper["stride"], self.hyper["padding"], self.hyper["dilation"]
                )
            else:
                corr = F.conv_transpose2d(
                    ones,
                    weight,
                    None,
                    self.hyper["stride"],
                    self.hyper["padding"],
                    self.hyper["output_padding"],
                    1,
                    self.hyper["dilation"],
                )
            base = self.binary_input.terms[1] * corr[0]
            if self.bias is not None:
                base = base + self.bias.to(torch.float64)[:, None, None]
            self._base_cache[key] = base.permute(1, 2, 0).contiguous()
        return self._base_cache[key]

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.kind == "linear"
        x4 = x.reshape(x.shape[0], x.shape[1], 1, 1) if flat else x
        if self._plan is None:
            self._plan = self._build_plan()
        plan = self._plan
        args = (plan.w_ts, plan.phases, plan.coef_a, plan.offset_a)
        path = kernels.path_id(self.kernel_path)
        x4 = x4.to(torch.float32)
        base = self._base(x4.shape[2], x4.shape[3])
        if isinstance(self.binary_input, LevelsInput):
            thresholds, signs = self.binary_input.channel_args(x4.shape[1])
            ties_up = self.binary_input.ties_up
            ops = kernels.kernel_ops()
            out = ops.levels_conv(x4, *args, base, plan.steps, path, thresholds, signs, ties_up)
        else:
            x4 = self.binary_input.kernel_input(x4)
            out = kernels.kernel_ops().binary_conv(x4, *args, base, plan.steps, path)
        return (
            out.reshape(out.shape[0], -1) if flat else out.permute(0, 3, 1, 2)
        )  # NCHW, channels-last memory
