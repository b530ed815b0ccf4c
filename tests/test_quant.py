"""Quantizer functions against formulas written out independently here (SPEC §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.quant import METHODS, encode, levels, quantize
from lowbit.quant.encoding import nearest_level
from lowbit.quant.lq import fit_lq

ONE_BIT_ONLY = {name for name, cls in METHODS.items() if cls.bit_range == (1, 1)}
CONSTANT_OK = {name for name, cls in METHODS.items() if cls.accepts_constant}


def _bits_for(method: str) -> list[int]:
    return [1] if method in ONE_BIT_ONLY else [1, 2, 3, 4]


@pytest.fixture
def weights() -> torch.Tensor:
    return torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_at_most_2_to_the_k_values_and_levels_match(method: str, weights: torch.Tensor) -> None:
    for bits in _bits_for(method):
        q = quantize(weights, method, bits)
        table = levels(weights, method, bits)
        emitted = q.unique()
        assert emitted.numel() <= 2**bits and table.numel() <= 2**bits
        assert torch.isin(emitted, table).all(), f"{method} emits values outside levels()"
        assert torch.equal(table, table.sort().values)
        assert torch.isfinite(q).all()


@pytest.mark.parametrize("method", sorted(set(METHODS) - CONSTANT_OK))
def test_per_channel_rows_have_their_own_levels(method: str, weights: torch.Tensor) -> None:
    bits = 1 if method in ONE_BIT_ONLY else 2
    scaled = weights * torch.arange(1, 6).reshape(1, 5, 1, 1)  # channel dim 1, like ConvTranspose2d
    q = quantize(scaled, method, bits, per_channel=True, channel_dim=1)
    table = levels(scaled, method, bits, per_channel=True, channel_dim=1)
    assert table.shape == (5, 2**bits)
    for c in range(5):
        assert torch.isin(q[:, c].unique(), table[c]).all()
    if method != "dorefa":  # DoReFa maps every channel onto the same [-1, 1] grid
        assert not torch.allclose(table[0], table[4])


def test_minmax_formula(weights: torch.Tensor) -> None:
    for bits in (1, 2, 3, 8):
        n = 2**bits - 1
        lo, hi = weights.min(), weights.max()
        expected = lo + torch.round((weights - lo) / (hi - lo) * n) * (hi - lo) / n
        assert torch.allclose(quantize(weights, "minmax", bits), expected, atol=1e-6)


def test_log_formula_keeps_sign_and_quantizes_log_magnitude(weights: torch.Tensor) -> None:
    eps, bits = 1e-8, 3
    n_mag = 2 ** (bits - 1) - 1
    logs = torch.log(weights.abs() + eps)
    lo, hi = logs.min(), logs.max()
    mag = torch.exp(lo + torch.round((logs - lo) / (hi - lo) * n_mag) * (hi - lo) / n_mag) - eps
    expected = torch.where(weights >= 0, mag, -mag)
    assert torch.allclose(quantize(weights, "log", bits), expected, rtol=1e-5, atol=1e-7)


def test_tanh_formula_with_clamped_ends(weights: torch.Tensor) -> None:
    bits = 2
    n = 2**bits - 1
    z = torch.round((torch.tanh(weights) + 1) / 2 * n)
    expected = torch.atanh(2 * z / n - 1).clamp(weights.min(), weights.max())
    assert torch.allclose(quantize(weights, "tanh", bits), expected, atol=1e-6)


def test_dorefa_formula_and_gradient_through_tanh(weights: torch.Tensor) -> None:
    bits, n = 2, 3
    w = weights.clone().requires_grad_(True)
    t = torch.tanh(weights)
    peak = t.abs().max()
    expected = 2 * torch.round(n * (t / (2 * peak) + 0.5)) / n - 1
    q = quantize(w, "dorefa", bits)
    assert torch.allclose(q, expected, atol=1e-6)
    q.sum().backward()
    assert torch.allclose(w.grad, (1 - t**2) / peak, rtol=1e-4)


def test_bwn_is_mean_abs_times_sign_per_channel(weights: torch.Tensor) -> None:
    alpha = weights.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = alpha * torch.where(weights >= 0, 1.0, -1.0)
    assert torch.allclose(quantize(weights, "bwn", 1, per_channel=True), expected)
    signs = torch.where(weights >= 0, 1.0, -1.0)
    assert torch.allclose(quantize(weights, "bwn", 1), weights.abs().mean() * signs)


def test_sign_gradient_is_exactly_upstream_inside_unit_interval() -> None:
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 7.0], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)
    out = quantize(x, "sign", 1)
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    out.backward(upstream)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]


def test_act_clips_quantizes_and_masks_gradient() -> None:
    x = torch.tensor([-0.5, 0.1, 0.34, 0.5, 0.9, 1.2], requires_grad=True)
    out = quantize(x, "act", 2)
    expected = torch.round(x.detach().clamp(0, 1) * 3) / 3
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    wide = quantize(x.detach(), "act", 1, lo=-1.0, hi=2.0)
    assert set(wide.tolist()) <= {-1.0, 2.0}


def test_ste_gradient_is_identity_for_weight_methods(weights: torch.Tensor) -> None:
    for method in ("minmax", "log", "tanh", "em", "bwn", "lq", "kmeans", "search"):
        w = weights.clone().requires_grad_(True)
        bits = 1 if method in ONE_BIT_ONLY else 2
        quantize(w, method, bits).backward(torch.full_like(w, 0.5))
        assert torch.equal(w.grad, torch.full_like(w, 0.5)), method


def test_kmeans_matches_sklearn_inertia() -> None:
    from sklearn.cluster import KMeans

    data = torch.randn(1500, generator=torch.Generator().manual_seed(1))
    for bits in (1, 2, 3):
        ours = float((quantize(data, "kmeans", bits) - data).square().mean())
        column = data.numpy().reshape(-1, 1).astype(np.float64)
        ref = KMeans(n_clusters=2**bits, n_init=3, random_state=0).fit(column)
        assert ours <= ref.inertia_ / len(data) * 1.01


def test_lq_levels_are_sums_of_signed_basis_and_beat_em_and_minmax() -> None:
    data = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    fit = fit_lq(data, 2)
    v1, v2 = fit.basis[0].tolist()
    expected = sorted(s1 * v1 + s2 * v2 for s1 in (-1, 1) for s2 in (-1, 1))
    assert np.allclose(levels(data, "lq", 2).tolist(), expected, atol=1e-5)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(fit.history, fit.history[1:], strict=False))
    mse = {m: float((quantize(data, m, 2) - data).square().mean()) for m in ("lq", "em", "minmax")}
    assert mse["lq"] < mse["em"] < mse["minmax"]


def test_encode_codes_index_codebook(weights: torch.Tensor) -> None:
    enc = encode(weights, "em", 3, per_channel=True)
    assert enc.codes.min() >= 0 and enc.codes.max() < 8
    assert torch.equal(enc.decode(), quantize(weights, "em", 3, per_channel=True))


BAD_BITS = [0, -1, 9, 2.5, True, "2"]


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_raise_value_error(bits: object, weights: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(weights, "minmax", bits)


def test_one_bit_methods_reject_other_widths(weights: torch.Tensor) -> None:
    for method in ("bwn", "sign"):
        with pytest.raises(ConfigError, match="supports bits 1"):
            quantize(weights, method, 2)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise(method: str, value: float, weights: torch.Tensor) -> None:
    bad = weights.clone()
    bad[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(bad, method, 1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_empty_tensor_raises(method: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.zeros(0, 3), method, 1)


@pytest.mark.parametrize("method", sorted(set(METHODS) - CONSTANT_OK))
def test_constant_weight_tensor_raises(method: str) -> None:
    with pytest.raises(ValueError, match="constant"):
        quantize(torch.full((4, 4), 0.3), method, 1)


def test_constant_activation_is_fine_for_activation_methods() -> None:
    assert quantize(torch.zeros(5), "sign", 1).tolist() == [1.0] * 5
    assert quantize(torch.full((5,), 2.0), "act", 2).tolist() == [1.0] * 5


def test_unknown_method_lists_valid_ones(weights: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="did you mean 'minmax'") as info:
        quantize(weights, "minmx", 2)
    for name in METHODS:
        assert name in str(info.value)


def test_unknown_option_and_bad_option_values(weights: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="valid options: eps"):
        quantize(weights, "log", 2, epsilon=1e-3)
    with pytest.raises(ValueError, match="lo=1.0 must be below hi"):
        quantize(weights, "act", 2, lo=1.0, hi=0.5)
    with pytest.raises(ValueError, match="channel_dim"):
        quantize(weights, "minmax", 2, per_channel=True, channel_dim=7)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.arange(6), "minmax", 2)


def _least_squares_basis(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """QEM's basis step written out: nearest code vector e per value, then v = lstsq(E, x)."""
    bits = basis.shape[0]
    patterns = np.array([[1.0 if (j >> i) & 1 else -1.0 for i in range(bits)] for j in range(2**bits)])
    codes = patterns[np.abs(rows[:, None] - patterns @ basis).argmin(axis=1)]
    return np.linalg.lstsq(codes, rows, rcond=None)[0]


def test_lq_basis_is_a_qem_fixed_point_and_moves_by_moving_average() -> None:
    from lowbit.nn import QuantLinear

    layer = QuantLinear(256, 2, bias=False, method="lq", bits=2, opts={"momentum": 0.75})
    quantizer = layer.weight_quantizer
    layer(torch.zeros(1, 256))  # first use: the full QEM fit
    for row in range(2):
        basis = quantizer.basis[row].double().numpy()
        refit = _least_squares_basis(layer.weight[row].detach().double().numpy(), basis)
        assert np.allclose(np.sort(np.abs(refit)), np.sort(np.abs(basis)), rtol=1e-3)
    old = quantizer.basis.clone()
    with torch.no_grad():
        layer.weight.mul_(1.5)
    layer.train()(torch.zeros(1, 256))
    for row in range(2):
        target = _least_squares_basis(layer.weight[row].detach().double().numpy(), old[row].double().numpy())
        expected = 0.75 * old[row].double().numpy() + 0.25 * target
        assert np.allclose(quantizer.basis[row].double().numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_levels", [2, 3, 4, 16, 32, 33, 64])
def test_nearest_level_matches_searchsorted_on_midpoints(n_levels: int) -> None:
    gen = torch.Generator().manual_seed(n_levels)
    levels = torch.randn(6, n_levels, generator=gen).sort(dim=1).values
    mids = (levels[:, 1:] + levels[:, :-1]) / 2
    rows = torch.cat([torch.randn(6, 500, generator=gen), mids, levels], dim=1)  # exact midpoints: ties
    expected = torch.tensor([[int((mid < value).sum()) for value in row]
                             for row, mid in zip(rows, mids, strict=True)])
    assert torch.equal(nearest_level(rows, levels), expected)
