"""``RPReLU``: a PReLU with learned per-channel input and output shifts (ReActNet, Liu et al.,
ECCV 2020, §3.2 eq. 3): ``y = x - shift_in`` where it is >= 0, else ``slope·(x - shift_in)``, plus
``shift_out``, all per channel (dim 1). Starts as the identity (shifts 0, slope 1)."""

from __future__ import annotations

import torch
from torch import nn

INITIAL_SLOPE = 1.0


class RPReLU(nn.Module):
    """``y = where(x - shift_in >= 0, x - shift_in, slope·(x - shift_in)) + shift_out`` per channel.

    Parameters ``shift_in``, ``slope``, ``shift_out`` have shape [channels] and broadcast along
    dim 1 of an N x C x ... input. Between a BatchNorm and a two-level activation with slope > 0 it
    is monotone, so the binarised output is a per-channel threshold of its input: the kernels
    fold it into the next threshold.
    """

    def __init__(self, channels: int, slope: float = INITIAL_SLOPE) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), float(slope)))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.transpose(1, -1)  # channels last, so the [C] parameters broadcast (any rank >= 2)
        u = last - self.shift_in
        return (torch.where(u >= 0, u, self.slope * u) + self.shift_out).transpose(1, -1)

    def extra_repr(self) -> str:
        return f"channels={self.shift_in.numel()}"
