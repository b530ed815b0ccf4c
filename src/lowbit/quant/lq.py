"""LQ-Nets learned quantizer (003; algorithm in SPEC §2): ``q(x) = v^T e`` with a learned basis
``v`` in R^k and codes ``e`` in {-1,+1}^k (weights) or {0,1}^k (activations).

The 2^k levels are all the ``v^T e``; each value goes to its nearest level. QEM refits ``v``:
fix ``v`` and assign codes ``B`` (k x N), then solve ``v = (B B^T)^-1 B x``. ``B B^T`` and ``B x``
are accumulated from per-level counts and sums, so a step costs O(N) plus a k x k solve per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.checks import as_rows
from lowbit.quant.em import fit_em
from lowbit.quant.encoding import nearest_level

RIDGE = 1e-9  # relative Tikhonov term: keeps the k x k solve regular when a code bit is never used


@dataclass
class LQFit:
    """Per-row basis ``[rows, k]`` and the MSE at the start and after each QEM step."""

    basis: torch.Tensor
    history: list[float]


def code_patterns(bits: int, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^k code vectors ``e`` as rows of a ``[2^k, k]`` matrix ({-1,1} if signed, else {0,1})."""
    index = torch.arange(2**bits)[:, None]
    bit = ((index >> torch.arange(bits)[None, :]) & 1).to(dtype)
    return 2 * bit - 1 if signed else bit


def sorted_levels(basis: torch.Tensor, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sorted levels ``[rows, 2^k]`` and, for each sorted position, its code pattern index."""
    levels = basis @ patterns.T
    return levels.sort(dim=1)


def initial_basis(x: torch.Tensor, bits: int, channel_dim: int | None, signed: bool) -> torch.Tensor:
    """Basis of the best uniform grid: ``v_i = 2^i·step/2`` (signed) or ``2^i·step`` ({0,1} codes),
    with ``step`` from the EM fit (001 §4.1) of ``x`` (of ``max(x, 0)`` for {0,1} codes)."""
    data = x.detach() if signed else x.detach().clamp_min(0)
    step = fit_em(data, bits, channel_dim).alpha.reshape(-1, 1)
    powers = 2.0 ** torch.arange(bits, dtype=x.dtype, device=x.device)[None, :]
    return step * powers / (2 if signed else 1)


def qem_step(rows: torch.Tensor, basis: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """One QEM step on ``rows`` ([R, cols]): assign nearest levels, then the least-squares basis."""
    levels, order = sorted_levels(basis, patterns)
    index = nearest_level(rows, levels)
    pattern = order.gather(1, index)
    counts = torch.zeros_like(levels).scatter_add_(1, pattern, torch.ones_like(rows))
    sums = torch.zeros_like(levels).scatter_add_(1, pattern, rows)
    gram = torch.einsum("rp,pi,pj->rij", counts, patterns, patterns)
    target = sums @ patterns
    ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1.0)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge[:, None, None] * eye, target)


def row_mse(rows: torch.Tensor, basis: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Per-row MSE of nearest-level quantization with ``basis``."""
    levels, _ = sorted_levels(basis, patterns)
    return (rows - levels.gather(1, nearest_level(rows, levels))).square().mean(dim=1)


def fit_lq(x: torch.Tensor, bits: int, channel_dim: int | None = None, signed: bool = True,
           iters: int = 30, tol: float = 1e-6, start: torch.Tensor | None = None) -> LQFit:
    """Fit the LQ basis by QEM from ``start`` (default: :func:`initial_basis`), keeping per row the
    best basis seen; stops when every row's relative gain is below ``tol`` or after ``iters`` steps."""
    rows = as_rows(x.detach(), channel_dim)
    patterns = code_patterns(bits, signed, x.dtype).to(x.device)
    basis = initial_basis(x, bits, channel_dim, signed) if start is None else start
    best_mse = row_mse(rows, basis, patterns)
    history = [float(best_mse.mean())]
    for _ in range(iters):
        candidate = qem_step(rows, basis, patterns)
        mse = row_mse(rows, candidate, patterns)
        better = mse < best_mse
        gain = (best_mse - mse) / best_mse.clamp_min(torch.finfo(mse.dtype).tiny)
        basis = torch.where(better[:, None], candidate, basis)
        best_mse = torch.where(better, mse, best_mse)
        history.append(float(best_mse.mean()))
        if bool((gain < tol).all()):
            break
    return LQFit(basis, history)
