"""Binary quantizers: BWN weights (fixed or learned per-channel scales) and ``rsign``, a two-level
activation with learned levels {a, b} and a learned per-channel shift (ReActNet's RSign).

* ``bwn`` (000 §3.2 eq.2): ``Q = alpha·sign(W)`` (sign(0) = +1). ``scale="mean"``: ``alpha = mean |W|``
  per output channel, recomputed from W (closed form). ``scale="learned"``: ``alpha`` is a
  parameter per output channel started at ``mean |W|`` and trained by ``dL/dalpha = sum dL/dQ·sign W``
  (XNOR-Net++, Bulat & Tzimiropoulos, BMVC 2019). Weights get the STE either way.
* ``rsign`` (ReActNet, Liu et al., ECCV 2020, §3.2 RSign): ``y = a`` if ``x - shift_c <= (a+b)/2``
  else ``b`` (the nearest of {a, b} to ``x - shift_c``, ties to ``a``), ``shift_c`` learned per
  channel (dim 1), ``a < b`` learned per layer. Gradient into ``x`` (``t`` = the position of
  ``x - shift_c`` between the levels, -1 at ``a`` and +1 at ``b``): ``grad="ste"``
  ``1{|t| <= 1}`` (clipped STE between the levels) or ``grad="approx"`` ``2 - 2|t|`` for
  ``|t| < 1`` (Bi-Real Net's ApproxSign, Liu et al., ECCV 2018, eq. 5: the derivative of the
  piecewise polynomial ``2t + t^2`` / ``2t - t^2``). ``dL/dshift_c = -sum dL/dx`` over the
  channel, ``dL/da = sum dL/dy·1{y = a}``, ``dL/db = sum dL/dy·1{y = b}``. The kernels fuse it:
  a per-channel shift before a two-level threshold folds into the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.quant import uniform
from lowbit.quant.checks import per_row, row_shape
from lowbit.quant.encoding import Encoding, affine_encoding
from lowbit.quant.modules import Quantizer
from lowbit.quant.registry import QuantOptions, Site, number, one_of, register

GRADIENTS = ("ste", "approx")


@dataclass(frozen=True)
class BWNOptions(QuantOptions):
    """``scale``: "mean" (``mean |W|`` per row, recomputed) or "learned" (a trained parameter per row)."""

    scale: str = "mean"

    def check(self, method: str, bits: int) -> None:
        one_of(method, "scale", self.scale, ("mean", "learned"))


@register
class BWNQuantizer(Quantizer):
    """BWN (000 §3.2 eq.2): ``Q = alpha·sign(W)``, ``alpha = mean |W|`` per channel or tensor; STE."""

    method = "bwn"
    roles = ("weight",)
    bit_range = (1, 1)
    Options = BWNOptions

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        target = LearnedScaleBWN if options.scale == "learned" else cls
        return target(bits, site.channel_dim, site.rows, **options.as_dict())

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, **options: Any) -> None:
        super().__init__(bits, channel_dim, **options)

    def encode(self, x: torch.Tensor) -> Encoding:
        return uniform.encode_bwn(x, self.bits, self.channel_dim)


class LearnedScaleBWN(BWNQuantizer):
    """``bwn`` with ``scale="learned"``: ``alpha`` [rows] is a parameter started at ``mean |W|``
    (XNOR-Net++); ``Q = alpha·sign(W)`` with the gradient into ``alpha`` and the STE into ``W``."""

    cacheable = False

    def __init__(self, bits: int, channel_dim: int | None = None, rows: int = 1, **options: Any) -> None:
        super().__init__(bits, channel_dim, rows, **options)
        self.alpha = nn.Parameter(torch.ones(rows))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def refit(self, x: torch.Tensor) -> None:
        """``alpha = mean |W|`` per row (BWN's closed form)."""
        self.alpha.copy_(per_row(x.detach().abs(), self.channel_dim, torch.Tensor.mean).reshape(-1))
        self.fitted.fill_(True)

    def _alpha(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            self.refit(x)
        return self.alpha.reshape(row_shape(x, self.channel_dim))

    def encode(self, x: torch.Tensor) -> Encoding:
        alpha = self._alpha(x).detach()
        return affine_encoding((x.detach() >= 0).to(x.dtype), 2 * alpha, -alpha, 2, self.channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype)
        value = self._alpha(x) * sign  # equals codebook[row, code] bit for bit: ±alpha
        return value + (x - x.detach()) if x.requires_grad else value


@dataclass(frozen=True)
class RSignOptions(QuantOptions):
    """``lo``/``hi``: the starting levels a < b; ``learn_levels``: train them; ``shift``: a learned
    threshold shift per "channel" (dim 1) or per "layer"; ``grad``: "ste" or "approx" (ApproxSign)."""

    lo: float = 0.0
    hi: float = 1.0
    learn_levels: bool = True
    shift: str = "channel"
    grad: str = "ste"

    def check(self, method: str, bits: int) -> None:
        if not number(method, "lo", self.lo) < number(method, "hi", self.hi):
            raise ConfigError(f"{method}: lo={self.lo} must be below hi={self.hi}; give two levels lo < hi")
        one_of(method, "shift", self.shift, ("channel", "layer"))
        one_of(method, "grad", self.grad, GRADIENTS)


def level_position(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``t = (u - (lo+hi)/2) / ((hi-lo)/2)``: -1 at ``lo``, 0 at the threshold, +1 at ``hi``."""
    half = ((hi - lo) / 2).clamp_min(torch.finfo(u.dtype).tiny)
    return (u - (lo + hi) / 2) / half


def surrogate_slope(t: torch.Tensor, grad: str) -> torch.Tensor:
    """``dy/du`` of the relaxed two-level function: ``1{|t| <= 1}`` (ste) or ``max(2 - 2|t|, 0)``
    (approx: Bi-Real's ApproxSign)."""
    if grad == "approx":
        return (2 - 2 * t.abs()).clamp_min(0)
    return (t.abs() <= 1).to(t.dtype)


def _channel_sum(g: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``g`` summed to the shape of ``shift`` ([C] along dim 1, or [1])."""
    if shift.numel() == 1:
        return g.sum().reshape(shift.shape)
    dims = [d for d in range(g.dim()) if d != 1]
    return g.sum(dim=dims)


class _TwoLevel(torch.autograd.Function):
    """Forward ``where(x - shift > (lo+hi)/2, hi, lo)``; backward as the module docstring says."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor,  # type: ignore[override]
                hi: torch.Tensor, grad: str) -> torch.Tensor:
        ctx.grad = grad
        ctx.save_for_backward(x, shift, lo, hi)
        return torch.where(_shifted(x, shift) > (lo + hi) / 2, hi, lo)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):  # type: ignore[override]
        x, shift, lo, hi = ctx.saved_tensors
        u = _shifted(x, shift)
        grad_x = upstream * surrogate_slope(level_position(u, lo, hi), ctx.grad)
        high = (u > (lo + hi) / 2).to(upstream.dtype)
        grad_hi = (upstream * high).sum()
        return grad_x, -_channel_sum(grad_x, shift), upstream.sum() - grad_hi, grad_hi, None


def _shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x - shift`` with a per-channel ``shift`` broadcast along dim 1."""
    if shift.numel() == 1:
        return x - shift
    return x - shift.reshape(1, -1, *([1] * (x.dim() - 2)))


@register
class RSignQuantizer(Quantizer):
    """ReActNet's RSign generalised to two learned levels: ``y = nearest of {a, b} to x - shift_c``
    (ties to ``a``), a learned per-channel ``shift`` and per-layer ``a < b``; gradient "ste" or
    "approx" (Bi-Real ApproxSign). See the module docstring for the formulas."""

    method = "rsign"
    roles = ("activation",)
    bit_range = (1, 1)
    Options = RSignOptions
    cacheable = False
    accepts_constant = True

    def __init__(self, bits: int, channels: int = 1, **options: Any) -> None:
        super().__init__(bits, None, **options)
        opts = self.options
        self.grad = opts.grad
        start = torch.tensor([float(opts.lo), float(opts.hi)])
        if opts.learn_levels:
            self.level_values = nn.Parameter(start)
        else:
            self.register_buffer("level_values", start)
        self.shift = nn.Parameter(torch.zeros(channels if opts.shift == "channel" else 1))

    @classmethod
    def build(cls, bits: int, options: QuantOptions, site: Site) -> Quantizer:
        """A per-channel shift needs the channel count: dim 1 of ``site.shape`` (N x C x ...)."""
        if options.shift == "channel" and len(site.shape) < 2:
            raise ConfigError("rsign: a per-channel shift needs the channel count, which is unknown here; "
                              "pass channels to QuantAct (convert infers it from the preceding layer) "
                              "or set act_opts shift: layer")
        return cls(bits, site.shape[1] if options.shift == "channel" else 1, **options.as_dict())

    def _levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.level_values.min(), self.level_values.max()

    def input_shift(self) -> torch.Tensor | None:
        return self.shift.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._levels()
        return _TwoLevel.apply(x, self.shift.to(x.dtype), lo.to(x.dtype), hi.to(x.dtype), self.grad)

    def encode(self, x: torch.Tensor) -> Encoding:
        lo, hi = (v.detach() for v in self._levels())
        codes = (_shifted(x.detach(), self.shift.detach()) > (lo + hi) / 2).long()
        return Encoding(codes, torch.stack([lo, hi]).reshape(1, 2), None)

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._levels()
        return torch.stack([lo, hi]).detach().reshape(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={tuple(self.shift.shape)}, grad={self.grad}"
