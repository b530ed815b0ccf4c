"""Closed-form quantizers: minmax, log, tanh (001 §2.2), dorefa, bwn, sign (000 §3), act.

Each ``encode_*`` returns the :class:`Encoding` (codes + codebook) of ``x``; each ``quantize_*``
returns the forward value with the method's gradient rule attached. ``channel_dim=None`` is per
tensor, an int is per channel along that dim (one codebook row per channel).
"""

from __future__ import annotations

import torch

from lowbit.quant.checks import as_rows, per_row, row_shape
from lowbit.quant.encoding import Encoding, affine_encoding
from lowbit.quant.grad import straight_through, through


def _row_min_max(x: torch.Tensor, channel_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, shape = as_rows(x, channel_dim), row_shape(x, channel_dim)
    return rows.amin(dim=1).reshape(shape), rows.amax(dim=1).reshape(shape)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros replaced by 1, so a constant row divides safely (its codes are all 0)."""
    return torch.where(t > 0, t, torch.ones_like(t))


def uniform_codes(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """``clamp(round((x - lo) / step), 0, n)``: the nearest point of the grid ``lo + step * j``."""
    return (x - lo).div_(_nonzero(step)).round_().clamp_(0, n)


def encode_minmax(x: torch.Tensor, bits: int, channel_dim: int | None = None) -> Encoding:
    """Minmax-Q (001 §2.2 eq.3): ``f(x) = (x - min X)/(max X - min X)·(2^k-1)``.

    The quantized value is ``Q = f^-1(round f(x))``.
    """
    n = 2**bits - 1
    lo, hi = _row_min_max(x.detach(), channel_dim)
    step = (hi - lo) / n
    return affine_encoding(uniform_codes(x.detach(), lo, step, n), step, lo, n + 1, channel_dim)


def encode_log(x: torch.Tensor, bits: int, channel_dim: int | None = None, eps: float = 1e-8) -> Encoding:
    """Log-Q (001 §2.2 eq.4): minmax on ``log(|x| + eps)`` with the sign kept.

    One bit holds the sign and ``k-1`` bits the log-magnitude, so at most ``2^k`` values; at k=1 the
    single magnitude is the middle of the log range.
    """
    data = x.detach()
    n_mag = 2 ** (bits - 1)
    logs = data.abs().add_(eps).log_()
    lo, hi = _row_min_max(logs, channel_dim)
    if n_mag == 1:
        mag_codes = torch.zeros_like(logs)
        log_levels = (lo + hi) / 2
    else:
        step = (hi - lo) / (n_mag - 1)
        mag_codes = uniform_codes(logs, lo, step, n_mag - 1)
        log_levels = lo.reshape(-1, 1) + step.reshape(-1, 1) * torch.arange(n_mag, dtype=x.dtype,
                                                                            device=x.device)
    mags = (torch.exp(log_levels.reshape(-1, n_mag)) - eps).clamp_min(0)
    codebook = torch.cat([-mags.flip(1), mags], dim=1)
    positive = (data >= 0).to(data.dtype)  # codes n_mag + mag for x >= 0, n_mag - 1 - mag below
    codes = (mag_codes * 2).add_(1).mul_(positive).add_(n_mag - 1).sub_(mag_codes).long()
    return Encoding(codes, codebook, channel_dim)


def encode_tanh(x: torch.Tensor, bits: int, channel_dim: int | None = None) -> Encoding:
    """Tanh-Q (001 §2.2 eq.5): ``f(x) = (tanh(x)+1)/2·(2^k-1)``, ``Q = atanh(2·round(f)/(2^k-1) - 1)``.

    The end levels ``atanh(±1) = ±inf`` (and any level outside the data) are clamped to the
    tensor's (row's) ``[min, max]`` so every level stays finite.
    """
    data = x.detach()
    n = 2**bits - 1
    codes = torch.round((torch.tanh(data) + 1) / 2 * n).long()
    lo, hi = _row_min_max(data, channel_dim)
    grid = torch.arange(n + 1, dtype=x.dtype, device=x.device) * (2 / n) - 1
    codebook = torch.clamp(torch.atanh(grid)[None, :], lo.reshape(-1, 1), hi.reshape(-1, 1))
    return Encoding(codes, codebook, channel_dim)


def _tanh_and_peak(x: torch.Tensor, channel_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(x.detach())
    return t, _nonzero(per_row(t.abs(), channel_dim, torch.Tensor.amax))


def _dorefa_encoding(t: torch.Tensor, peak: torch.Tensor, bits: int, channel_dim: int | None) -> Encoding:
    """Codes of DoReFa's weight normalisation to [0, 1], ``tanh(w) / (2·max|tanh(w)|) + 1/2``."""
    n = 2**bits - 1
    z = torch.round((t / (2 * peak) + 0.5) * n)
    scale = torch.full((1,), 2 / n, dtype=t.dtype, device=t.device)
    return affine_encoding(z, scale, -torch.ones_like(scale), n + 1, channel_dim)


def encode_dorefa(x: torch.Tensor, bits: int, channel_dim: int | None = None) -> Encoding:
    """DoReFa weights (000 §3.2 eq.3): ``Q = 2·quantize_k(tanh(w)/(2 max|tanh w|) + 1/2) - 1`` in
    [-1, 1], with ``quantize_k(r) = round((2^k-1)·r)/(2^k-1)``."""
    return _dorefa_encoding(*_tanh_and_peak(x, channel_dim), bits, channel_dim)


def dorefa_value_and_factor(x: torch.Tensor, bits: int, channel_dim: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """DoReFa weight value and its gradient factor: the STE skips only the rounding, so
    ``dQ/dw = d(tanh w / max|tanh w|)/dw = (1 - tanh^2 w) / max|tanh w|`` (max held constant)."""
    t, peak = _tanh_and_peak(x, channel_dim)
    return _dorefa_encoding(t, peak, bits, channel_dim).decode(), (1 - t.square()) / peak


def encode_bwn(x: torch.Tensor, bits: int = 1, channel_dim: int | None = None) -> Encoding:
    """BWN (000 §3.2 eq.2): ``Q = alpha·sign(W)``, ``alpha = ||W||_1 / n`` per channel or tensor."""
    data = x.detach()
    alpha = per_row(data.abs(), channel_dim, torch.Tensor.mean)
    return affine_encoding((data >= 0).to(data.dtype), 2 * alpha, -alpha, 2, channel_dim)


def encode_sign(x: torch.Tensor) -> Encoding:
    """Binary activation (000 §3.3 eq.5): ``sign(x)`` with sign(0) = +1; levels {-1, +1}."""
    z = (x.detach() >= 0).to(x.dtype)
    two = torch.full((1,), 2.0, dtype=x.dtype, device=x.device)
    return affine_encoding(z, two, -torch.ones_like(two), 2, None)


def sign_factor(x: torch.Tensor) -> torch.Tensor:
    """The sign gradient mask ``1{|x| <= 1}`` (000 §3.3 eq.6)."""
    return x.detach().abs() <= 1


def encode_act(x: torch.Tensor, bits: int, lo: float | torch.Tensor = 0.0,
               hi: float | torch.Tensor = 1.0) -> Encoding:
    """k-bit activation (DoReFa, 000 §3.2): clip to ``[lo, hi]`` then ``quantize_k`` on that range."""
    n = 2**bits - 1
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device).detach().reshape(1)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device).detach().reshape(1)
    step = (hi_t - lo_t) / n
    z = uniform_codes(torch.clamp(x.detach(), lo_t, hi_t), lo_t, step, n)
    return affine_encoding(z, step, lo_t, n + 1, None)


def quantize_act(x: torch.Tensor, bits: int, lo: float | torch.Tensor = 0.0,
                 hi: float | torch.Tensor = 1.0) -> torch.Tensor:
    """k-bit activation with the STE inside the clip range; a tensor ``hi`` gets the PACT gradient
    (``dQ/dhi = 1`` where ``x >= hi``), which is how :class:`QuantAct` learns its range."""
    value = encode_act(x, bits, lo, hi).decode()
    if isinstance(hi, torch.Tensor) and hi.requires_grad:
        return straight_through(torch.minimum(torch.clamp(x, min=float(lo)), hi), value)
    return through(x, value, (x.detach() >= lo) & (x.detach() <= hi))

