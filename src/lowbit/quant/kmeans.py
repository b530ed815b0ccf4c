"""Weight sharing by 1-D k-means (Han et al., survey 004 §1.2): 2^k centroids per tensor or row.

Lloyd iterations (nearest centroid, then centroid = mean of its members) run from two starts,
Han et al.'s linear start (evenly spaced over [min, max]) and the quantile start (the
``(j + 1/2)/2^k`` quantiles); each row keeps the result with the lower MSE. A centroid that loses
all members keeps its place.
"""

from __future__ import annotations

import torch

from lowbit.quant.checks import as_rows
from lowbit.quant.encoding import nearest_level


def linear_centroids(rows: torch.Tensor, n_levels: int) -> torch.Tensor:
    """``n_levels`` centroids evenly spaced over each row's ``[min, max]``."""
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    grid = torch.linspace(0, 1, n_levels, dtype=rows.dtype, device=rows.device)[None, :]
    return lo + (hi - lo) * grid


def quantile_centroids(rows: torch.Tensor, n_levels: int) -> torch.Tensor:
    """The ``(j + 1/2) / n_levels`` quantiles of each row."""
    ordered = rows.sort(dim=1).values
    picks = ((torch.arange(n_levels, device=rows.device) + 0.5) * rows.shape[1] / n_levels).long()
    return ordered[:, picks.clamp_max(rows.shape[1] - 1)]


def row_mse(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-row MSE of nearest-centroid quantization."""
    return (rows - centroids.gather(1, nearest_level(rows, centroids))).square().mean(dim=1)


def lloyd_step(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """One Lloyd iteration on ``rows`` ([R, cols]) with sorted ``centroids`` ([R, L]); result sorted."""
    index = nearest_level(rows, centroids)
    counts = torch.zeros_like(centroids).scatter_add_(1, index, torch.ones_like(rows))
    sums = torch.zeros_like(centroids).scatter_add_(1, index, rows)
    means = sums / counts.clamp_min(1)
    return torch.where(counts > 0, means, centroids).sort(dim=1).values


def fit_kmeans(x: torch.Tensor, bits: int, channel_dim: int | None = None, iters: int = 100,
               tol: float = 1e-7) -> torch.Tensor:
    """Sorted centroids ``[rows, 2^k]``: per row the better of the linear- and quantile-started runs."""
    rows = as_rows(x.detach(), channel_dim)
    linear = lloyd(rows, linear_centroids(rows, 2**bits), iters, tol)
    quantile = lloyd(rows, quantile_centroids(rows, 2**bits), iters, tol)
    better = row_mse(rows, quantile) < row_mse(rows, linear)
    return torch.where(better[:, None], quantile, linear)


def lloyd(rows: torch.Tensor, centroids: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Lloyd iterations until the largest centroid move is below ``tol`` times the row's spread."""
    spread = (rows.amax(dim=1, keepdim=True) - rows.amin(dim=1, keepdim=True)).clamp_min(1e-30)
    for _ in range(iters):
        moved = lloyd_step(rows, centroids)
        shift = ((moved - centroids).abs() / spread).max()
        centroids = moved
        if float(shift) < tol:
            break
    return centroids
