"""Gradient rules: the straight-through estimator (STE) and its scaled / masked variants.

The forward value is always exactly the quantized value (``q + (x - x) == q`` bit for bit), so a
frozen model that stores codes + codebook reproduces the simulated forward exactly.
"""

from __future__ import annotations

import torch


def straight_through(proxy: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value``; backward the gradient of ``proxy`` (STE, Bengio et al. 2013; 001 §2.2)."""
    if not proxy.requires_grad:
        return value.detach()
    return value.detach() + (proxy - proxy.detach())


class _Through(torch.autograd.Function):
    """Forward a precomputed value (aliased, no copy); backward ``grad`` or ``grad * factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                factor: torch.Tensor | None) -> torch.Tensor:
        ctx.scaled = factor is not None
        if ctx.scaled:
            ctx.save_for_backward(factor)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if not ctx.scaled:
            return grad, None, None
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


def through(x: torch.Tensor, value: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Forward ``value``; backward the upstream gradient times ``factor`` (a mask or a derivative),
    or unchanged when ``factor`` is None (plain STE)."""
    if not x.requires_grad:
        return value.detach()
    return _Through.apply(x, value.detach(), factor)
