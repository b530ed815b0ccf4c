"""QGAN's EM quantizer (001 §4.1): monotone EM, near-optimal fit, and the state-utilisation finding."""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import encode, fit_em, quantize


def _tensor(kind: str, n: int = 2000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, generator=gen)
    if kind == "laplacian":
        uniform = torch.rand(n, generator=gen) - 0.5
        return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    centers = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return centers + 0.3 * torch.randn(n, generator=gen)


def _grid_mse(x: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, n: int) -> torch.Tensor:
    """MSE of rounding to the nearest of ``beta + alpha·j`` (j = 0..n) for every (alpha, beta) pair."""
    out = torch.empty(len(alphas), len(betas), dtype=torch.float64)
    shifted = x.double()[None, :] - betas[:, None]  # [B, N]
    for i, alpha in enumerate(alphas.tolist()):
        z = torch.clamp(torch.round(shifted / alpha), 0, n)
        out[i] = (shifted - alpha * z).square().mean(dim=1)
    return out


def dense_grid_optimum(x: torch.Tensor, bits: int) -> float:
    """Lowest MSE over a dense (alpha, beta) grid, refined twice around the best cell."""
    n = 2**bits - 1
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    alphas = torch.linspace(span / n / 40, span / n, 90, dtype=torch.float64)
    betas = torch.linspace(lo - span / 10, float(x.mean()), 90, dtype=torch.float64)
    best = float("inf")
    for _ in range(3):
        mse = _grid_mse(x, alphas, betas, n)
        best = min(best, float(mse.min()))
        i, j = divmod(int(mse.argmin()), len(betas))
        da, db = float(alphas[1] - alphas[0]), float(betas[1] - betas[0])
        alphas = torch.linspace(float(alphas[i]) - 2 * da, float(alphas[i]) + 2 * da, 30, dtype=torch.float64)
        betas = torch.linspace(float(betas[j]) - 2 * db, float(betas[j]) + 2 * db, 30, dtype=torch.float64)
        alphas = alphas.clamp_min(1e-9)
    return best


def _mse(x: torch.Tensor, q: torch.Tensor) -> float:
    return float((x.double() - q.double()).square().mean())


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "bimodal"])
def test_em_is_monotone_and_within_one_percent_of_dense_grid(kind: str) -> None:
    x = _tensor(kind)
    for bits in (1, 2, 3, 4):
        fit = fit_em(x, bits)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.history, fit.history[1:], strict=False))
        final = _mse(x, quantize(x, "em", bits))
        assert final == pytest.approx(fit.history[-1], rel=1e-4)
        assert final <= dense_grid_optimum(x, bits) * 1.01, (kind, bits)


def test_paper_schedule_is_monotone_fixed_length_and_worse_at_four_bits() -> None:
    x = _tensor("gaussian", 20000, seed=1)
    for bits, iterations in ((2, 16), (3, 16), (4, 32)):
        fit = fit_em(x, bits, paper=True)
        assert len(fit.history) == iterations + 1
        assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.history, fit.history[1:], strict=False))
    paper = _mse(x, quantize(x, "em", 4, paper=True))
    default = _mse(x, quantize(x, "em", 4))
    assert default < paper


def test_em_uses_all_states_where_minmax_under_represents() -> None:
    x = _tensor("gaussian", 2**17, seed=2)
    minmax = torch.bincount(encode(x, "minmax", 2).codes.long(), minlength=4).double() / len(x)
    em = torch.bincount(encode(x, "em", 2).codes.long(), minlength=4).double() / len(x)
    assert float(minmax.sort(descending=True).values[:2].sum()) > 0.99  # 001 §3.1
    assert float(em.min()) > 0.05


def test_per_channel_fit_equals_fitting_each_row_alone() -> None:
    spread = torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    weights = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * spread
    joint = fit_em(weights, 2, channel_dim=0)
    for row in range(4):
        alone = fit_em(weights[row], 2)
        assert float(joint.alpha[row, 0]) == pytest.approx(float(alone.alpha), rel=1e-5)
        assert float(joint.beta[row, 0]) == pytest.approx(float(alone.beta), rel=1e-5, abs=1e-7)
