"""Bit packing, the bit-serial decomposition, and the C++ kernels vs float reference layers on every path."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.backends.x86 import build as kernels
from lowbit.export.backends.x86.binary import SIGN_INPUT, BinaryInput, QuantWeightLayer
from lowbit.export.pack import pack_codes, packed_nbytes, storage_bits, unpack_codes

KERNEL_PATHS = [path for path in kernels.available_paths() if path != kernels.TORCH_PATH]


# ----- packing -----


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 9, 33, 1001])
def test_pack_round_trip_every_width_and_odd_sizes(bits, count):
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    width = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}[bits]
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(count * width / 8) == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(packed, bits, (count,)), codes)


def test_pack_layout_is_lsb_first():
    # codes 1,0,1,1 at 1 bit -> bits 0,2,3 set = 0b1101 = 13; 2-bit codes 3,1 -> 3 | 1<<2 = 7
    assert pack_codes(torch.tensor([1, 0, 1, 1]), 1).tolist() == [13]
    assert pack_codes(torch.tensor([3, 1]), 2).tolist() == [7]
    assert pack_codes(torch.tensor([2, 15, 1]), 4).tolist() == [2 | 15 << 4, 1]


def test_pack_keeps_shape_and_rejects_bad_input():
    codes = torch.randint(0, 4, (3, 5, 2, 7), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 2), 2, codes.shape), codes)
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ConfigError, match="1 to 8 bits"):
        storage_bits(9)
    with pytest.raises(CheckpointError, match="damaged"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (10,))


# ----- the decomposition the kernels implement (docs/export.md, csrc/bitserial.cpp eq. 1-2) -----


def test_bit_serial_decomposition_matches_direct_sum():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4):
        n = 301
        z = rng.integers(0, 2**bits, n)
        scale, offset = rng.uniform(0.1, 1.0), rng.normal()
        valid = rng.random(n) < 0.8  # padding / transposed-conv holes contribute 0
        x = np.where(rng.random(n) < 0.5, 1.0, -1.0) * valid
        xpos = (x > 0).astype(np.int64)
        direct = np.sum((scale * z + offset) * x)
        plane_sum = sum(
            2**b * (2 * np.sum(((z >> b) & 1) & xpos) - np.sum(((z >> b) & 1) * valid)) for b in range(bits)
        )
        popcount_form = scale * plane_sum + offset * (2 * xpos.sum() - valid.sum())
        assert popcount_form == pytest.approx(direct, rel=1e-12, abs=1e-9)


# ----- kernels vs float reference layers -----


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0)


def _reference(kind, x, weight, bias, hyper, activation=_sign):
    xs = activation(x)
    if kind == "linear":
        return F.linear(xs, weight, bias)
    if kind == "conv2d":
        return F.conv2d(xs, weight, bias, hyper["stride"], hyper["padding"], hyper["dilation"])
    return F.conv_transpose2d(
        xs, weight, bias, hyper["stride"], hyper["padding"], hyper["output_padding"], 1, hyper["dilation"]
    )


CASES = [  # kind, cin, cout, kernel, stride, padding, output_padding, dilation, bits, affine, size
    ("conv_transpose2d", 128, 64, 3, 2, 1, 0, 1, 1, True, 4),
    ("conv_transpose2d", 37, 5, 4, 2, 1, 1, 1, 2, True, 5),
    ("conv_transpose2d", 70, 33, 5, 3, 2, 2, 2, 3, False, 4),
    ("conv_transpose2d", 1, 3, 3, 1, 0, 0, 1, 4, True, 3),
    ("conv_transpose2d", 130, 9, 4, 1, 2, 0, 1, 1, False, 3),
    ("conv2d", 70, 33, 3, 2, 1, 0, 1, 4, True, 9),
    ("conv2d", 130, 9, 3, 1, 2, 0, 2, 2, False, 7),
    ("conv2d", 64, 17, 5, 3, 0, 0, 1, 1, True, 11),
    ("linear", 200, 17, 1, 1, 0, 0, 1, 3, True, 1),
    ("linear", 64, 1, 1, 1, 0, 0, 1, 1, False, 1),
    # the specialised kernels (csrc/bitserial.cpp): DCGAN-like layers, register kernels for every plane
    # count with one or several channel blocks, few-row lane/pixel kernels, phases without taps
    ("conv_transpose2d", 64, 32, 4, 2, 1, 0, 1, 1, True, 7),
    ("conv_transpose2d", 32, 1, 4, 2, 1, 0, 1, 1, True, 6),
    ("conv_transpose2d", 64, 16, 3, 2, 1, 1, 1, 2, True, 5),
    ("conv2d", 100, 24, 3, 1, 1, 0, 1, 2, False, 6),
    ("conv_transpose2d", 40, 8, 4, 2, 1, 0, 1, 4, True, 4),
    ("conv2d", 64, 128, 3, 1, 1, 0, 1, 1, True, 5),
    ("conv_transpose2d", 20, 2, 3, 2, 0, 1, 1, 1, True, 5),
    ("conv_transpose2d", 30, 1, 4, 2, 1, 0, 1, 2, True, 9),
    ("conv2d", 200, 1, 3, 2, 1, 0, 1, 1, True, 9),
    ("conv_transpose2d", 16, 8, 1, 2, 0, 1, 1, 1, True, 3),
    # at most 32 input channels, co a multiple of 32, 4-bit weights: AVX-512's 32-bit-row kernel (1-3 blocks)
    ("conv_transpose2d", 32, 32, 4, 2, 1, 0, 1, 4, True, 7),
    ("conv2d", 20, 96, 3, 2, 1, 0, 1, 4, True, 7),
    ("conv2d", 32, 64, 3, 1, 1, 0, 1, 4, True, 6),
]


def _random_layer(case, seed, per_tensor=False, binary_input=SIGN_INPUT):
    kind, cin, cout, k, s, p, op, d, bits, affine, _ = case
    gen = torch.Generator().manual_seed(seed)
    shape = {"conv2d": (cout, cin, k, k), "conv_transpose2d": (cin, cout, k, k), "linear": (cout, cin)}[kind]
    channel_dim = 1 if kind == "conv_transpose2d" else 0
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    rows = 1 if per_tensor else cout
    if affine:
        codebook = (torch.rand(rows, 1, generator=gen) + 0.1) * torch.arange(2**bits) + torch.randn(
            rows, 1, generator=gen
        )
    else:
        codebook = torch.randn(rows, 2**bits, generator=gen).sort(dim=1).values
    bias = torch.randn(cout, generator=gen)
    hyper = {"stride": (s, s), "padding": (p, p), "output_padding": (op, op), "dilation": (d, d), "groups": 1}
    # the weight the reference uses, built here from codes and codebook independently of the layer
    view = [1] * len(shape)
    view[channel_dim] = -1
    row = torch.arange(cout).reshape(view).expand(shape) if rows > 1 else torch.zeros(shape, dtype=torch.long)
    weight = codebook[row, codes.long()]
    layer = QuantWeightLayer(
        kind, codes, codebook, channel_dim, bias, hyper, binary_input=binary_input, affine=affine
    )
    return layer, weight, bias, hyper


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_kernel_equals_reference_layer(path, case_index):
    case = CASES[case_index]
    layer, weight, bias, hyper = _random_layer(case, seed=case_index, per_tensor=case_index == 6)
    layer.kernel_path = path
    kind, cin, size = case[0], case[1], case[-1]
    gen = torch.Generator().manual_seed(100 + case_index)
    x = (
        torch.randn(3, cin, generator=gen)
        if kind == "linear"
        else torch.randn(3, cin, size, size, generator=gen)
    )
    x[0].view(-1)[:5] = 0.0  # sign(0) = +1
    expected = _reference(kind, x, weight, bias, hyper)
    got = layer(x)
    assert got.shape == expected.shape
    tol = 2e-5 * (weight.abs().sum() / weight.shape[0]).item() + 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("case_index", [0, 1, 4, 10, 12])
@pytest.mark.parametrize("levels", [(0.0, 1.3), (-0.5, 2.0)])
def test_kernel_equals_reference_layer_for_two_level_input(path, case_index, levels):
    """A two-level activation {low, high} (e.g. 1-bit `act`: {0, a}) feeding the layer: the kernel must
    equal the float layer on where(x > midpoint, high, low), ties at the midpoint going to low."""
    low, high = levels
    case = CASES[case_index]
    binary = BinaryInput(low, high, ties_up=False)
    layer, weight, bias, hyper = _random_layer(case, seed=case_index, binary_input=binary)
    layer.kernel_path = path
    kind, cin, size = case[0], case[1], case[-1]
    gen = torch.Generator().manual_seed(200 + case_index)
    shape = (3, cin) if kind == "linear" else (3, cin, size, size)
    x = torch.randn(*shape, generator=gen)
    x[0].view(-1)[:5] = (low + high) / 2  # exact ties go to the low level

    def two_level(t):
        return torch.where(t > (low + high) / 2, torch.tensor(high), torch.tensor(low))

    expected = _reference(kind, x, weight, bias, hyper, activation=two_level)
    tol = 2e-5 * (abs(high) + abs(low)) * (weight.abs().sum() / weight.shape[0]).item() + 1e-5
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=tol)


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("channels", [1, 17, 64, 100, 130])
def test_sign_packing_layout_for_both_memory_formats(channels):
    x = torch.randn(2, channels, 3, 5, generator=torch.Generator().manual_seed(channels))
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    positive = (x >= 0).permute(0, 2, 3, 1).numpy()  # N, H, W, C
    words = -(-channels // 64)
    for path in KERNEL_PATHS:
        for tensor in (x, x.to(memory_format=torch.channels_last)):
            bits = kernels.kernel_ops().pack_sign(tensor, kernels.path_id(path)).numpy().view(np.uint64)
            assert bits.shape == (2, 3, 5, words)
            unpacked = (bits[..., :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
            assert np.array_equal(
                unpacked.reshape(2, 3, 5, words * 64)[..., :channels].astype(bool), positive
            )
            assert not unpacked.reshape(2, 3, 5, words * 64)[..., channels:].any()  # padding bits stay 0


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
@pytest.mark.parametrize("case_index", [1, 4, *range(10, len(CASES))])
def test_every_path_agrees_bit_for_bit(case_index):
    case = CASES[case_index]
    layer, _, _, _ = _random_layer(case, seed=7)
    size = case[-1]
    x = torch.randn(2, case[1], size, size, generator=torch.Generator().manual_seed(3))
    outputs = []
    for path in KERNEL_PATHS:
        layer.kernel_path = path
        outputs.append(layer(x))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)  # integer popcounts: paths differ only in speed


@pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")
def test_reused_output_buffers_never_overwrite_a_live_output():
    # binary_conv hands a dropped output's memory to the next call; outputs still held must stay intact
    case = CASES[10]
    layer, weight, bias, hyper = _random_layer(case, seed=5)
    layer.kernel_path = KERNEL_PATHS[0]
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, case[1], case[-1], case[-1], generator=gen) for _ in range(3)]
    held = [layer(x) for x in xs]  # three live outputs: three buffers
    assert len({y.data_ptr() for y in held}) == 3
    del held[0]
    again = layer(xs[0])  # may take the dropped buffer, never a held one
    assert again.data_ptr() not in {y.data_ptr() for y in held}
    first = layer(xs[1]).data_ptr()  # dropped at once, so the next call reuses its memory
    assert layer(xs[2]).data_ptr() == first
    tol = 2e-5 * (weight.abs().sum() / weight.shape[0]).item() + 1e-5
    for x, y in zip(xs, [again, *held], strict=True):
        torch.testing.assert_close(y, _reference(case[0], x, weight, bias, hyper), rtol=0, atol=tol)


def test_unknown_or_unavailable_path_is_a_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'avx2'"):
        kernels.resolve_path("avx3")
    monkeypatch.setattr(kernels, "available_paths", lambda: ["scalar", "torch"])
    with pytest.raises(ConfigError, match="not available on this machine"):
        kernels.resolve_path("avx512")


def test_no_compiler_falls_back_to_torch_and_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "_LOADED", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="pure-torch path"):
        assert kernels.available_paths() == ["torch"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.resolve_path("auto") == "torch"
    layer, weight, bias, hyper = _random_layer(CASES[0], seed=1)
    layer.kernel_path = kernels.resolve_path(None)
    x = torch.randn(2, 128, 4, 4)
    torch.testing.assert_close(
        layer(x), _reference("conv_transpose2d", x, weight, bias, hyper), rtol=1e-5, atol=1e-4
    )
