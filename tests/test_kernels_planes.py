"""Multi-plane kernels (issue 13): 2-16 level activations as bit planes, table codebooks at their real cost,
BatchNorm folded into the packing thresholds, thread counts, and Conv2d coverage, against the torch backend
on every kernel path this CPU runs and on the native runtime.

Tolerance vs torch (docs/export.md "Kernels"): the kernels count exact integers and combine them in float64,
so they differ from torch's float32 accumulation by at most ~2e-5 x sum |w| x max |level| per output; across
ISA paths and thread counts they are bit-identical.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gan_zoo import trained_like_dcgan
from lowbit.export import PackedModel
from lowbit.export.backends import native
from lowbit.export.backends.x86 import build as kernels
from lowbit.export.backends.x86.binary import (
    QuantWeightLayer,
    affine_levels,
    decompose_codebook,
    fold_batch_norm,
    levels_input,
)
from lowbit.export.format import write_graph
from lowbit.export.ir import capture
from lowbit.export.runtime import plan_graph, run_steps
from lowbit.nn import QuantSpec, convert
from lowbit.quant.search import powers_of_two

KERNEL_PATHS = [path for path in kernels.available_paths() if path != kernels.TORCH_PATH]
RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
CLI, ARM_CLI = RUNTIME / "build" / "lowbit-run", RUNTIME / "build-arm64" / "lowbit-run"
QEMU = shutil.which("qemu-aarch64")
needs_kernels = pytest.mark.skipif(not KERNEL_PATHS, reason="C++ kernels unavailable here (no compiler)")


def _levels(count: int, low: float, high: float) -> torch.Tensor:
    return torch.linspace(low, high, count, dtype=torch.float32)


def _torch_activation(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The torch backend's rule, written out: nearest level, ties going down (bucketize on the midpoints)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x, midpoints)]


def _layer(kind, cin, cout, k, stride, pad, wbits, levels, seed, table=False):
    """A random packed layer fed by ``levels`` and the float weight of the reference (built independently)."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"conv2d": (cout, cin, k, k), "conv_transpose2d": (cin, cout, k, k), "linear": (cout, cin)}[kind]
    channel_dim = 1 if kind == "conv_transpose2d" else 0
    codes = torch.randint(0, 2**wbits, shape, generator=gen, dtype=torch.uint8)
    if table:
        codebook = torch.randn(cout, 2**wbits, generator=gen).sort(dim=1).values
    else:
        codebook = (torch.rand(cout, 1, generator=gen) + 0.1) * torch.arange(2**wbits) + torch.randn(
            cout, 1, generator=gen
        )
    view = [1] * len(shape)
    view[channel_dim] = -1
    weight = codebook[torch.arange(cout).reshape(view).expand(shape), codes.long()]
    bias = torch.randn(cout, generator=gen)
    hyper = {"stride": (stride, stride), "padding": (pad, pad), "output_padding": (0, 0), "dilation": (1, 1),
             "groups": 1}
    coding = levels_input(levels if levels.numel() == 2 else affine_levels(levels))  # 2 levels: one plane
    layer = QuantWeightLayer(kind, codes, codebook, channel_dim, bias, hyper, coding, affine=not table)
    return layer, weight, bias, hyper


def _reference(kind, xa, weight, bias, hyper):
    if kind == "linear":
        return F.linear(xa, weight, bias)
    if kind == "conv2d":
        return F.conv2d(xa, weight, bias, hyper["stride"], hyper["padding"])
    return F.conv_transpose2d(xa, weight, bias, hyper["stride"], hyper["padding"])


def _tolerance(weight, levels):
    per_output = weight.abs().reshape(weight.shape[0], -1).sum(dim=1).max().item()
    return 2e-5 * per_output * levels.abs().max().item() + 1e-5


# ----- multi-level activations -----

MULTI_CASES = [  # kind, cin, cout, kernel, stride, padding, weight bits, levels, size
    ("conv_transpose2d", 64, 32, 4, 2, 1, 2, 4, 7),  # dcgan-g-28's middle layer at W2A2
    ("conv_transpose2d", 32, 1, 4, 2, 1, 4, 16, 6),  # its output layer at W4A4 (few-row kernels)
    ("conv2d", 70, 24, 3, 1, 1, 4, 16, 6),  # two words per pixel and plane
    ("conv2d", 16, 3, 3, 2, 1, 1, 8, 9),  # 3 planes, pixel kernels
    ("conv2d", 130, 40, 1, 1, 0, 2, 3, 5),  # 3 levels: 2 planes, one code unused
    ("linear", 200, 17, 1, 1, 0, 3, 4, 1),
    # narrow layers of 4-bit affine weights (<= 32 inputs, Co % 16): plane counts add up before the combine
    ("conv_transpose2d", 32, 32, 4, 2, 1, 4, 2, 7),  # a pruned generator's 32/32 layer, AVX-512's 32-bit rows
    ("conv2d", 20, 16, 3, 1, 1, 4, 2, 6),  # 16-channel blocks
    ("conv2d", 24, 48, 3, 2, 1, 4, 4, 7),  # two activation planes: not narrow, planes combined one by one
    ("conv_transpose2d", 32, 1, 4, 2, 1, 2, 4, 6),  # W2A2 output layer: two-plane lanes without a gather
    ("conv2d", 16, 1, 3, 1, 1, 1, 4, 9),  # one row, two activation planes, 9 lanes (a partial group)
]


@needs_kernels
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: f"{c[0]}-w{c[6]}-l{c[7]}")
def test_multi_level_input_equals_the_float_layer_on_every_path(case):
    kind, cin, cout, k, stride, pad, wbits, count, size = case
    levels = _levels(count, -0.5, 1.5)
    layer, weight, bias, hyper = _layer(kind, cin, cout, k, stride, pad, wbits, levels, seed=count)
    gen = torch.Generator().manual_seed(wbits)
    x = torch.randn(3, cin, *([] if kind == "linear" else [size, size]), generator=gen)
    midpoints = (levels[1:] + levels[:-1]) / 2
    x.view(-1)[: len(midpoints)] = midpoints  # exact ties go to the lower level
    expected = _reference(kind, _torch_activation(x, levels), weight, bias, hyper)
    outputs = []
    for path in KERNEL_PATHS:
        layer.kernel_path = path
        outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=_tolerance(weight, levels))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)  # exact integer counts, one combine order: bit-identical


def test_only_affine_levels_are_coded():
    assert affine_levels(torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])) is not None
    assert affine_levels(torch.tensor([0.0, 0.1, 0.5, 1.0])) is None  # non-uniform: stays on the float path
    assert affine_levels(torch.arange(17.0)) is None  # more than 4 planes
    assert affine_levels(torch.tensor([0.0, 1.0])) is None  # two levels: the sign packer's job


# ----- codebooks -----


def _rebuilt(row):
    offset, coef, masks = decompose_codebook(row)
    return [offset + sum(c for p, c in enumerate(coef) if mask >> p & 1) for mask in masks], len(coef)


def _lq_row(basis):
    return sorted(float(sum(v * e for v, e in zip(basis, signs, strict=True)))
                  for signs in itertools.product((-1.0, 1.0), repeat=len(basis)))


@pytest.mark.parametrize(
    ("row", "planes"),
    [
        (_lq_row([0.3, 0.7]), 2),  # LQ-Nets v^T e: k planes weighted by the basis
        (_lq_row([0.11, 0.37, 0.9]), 3),
        (_lq_row([0.2, 0.5, 1.1, 2.3]), 4),
        (sorted(powers_of_two(2)), 2),  # {±1, ±1/2}: additive
        (sorted(powers_of_two(3)), 5),  # {±1 .. ±1/8}: the grid of 1/8, codes 0..16 (one-hot: 7)
        (sorted(powers_of_two(4)), 9),  # one-hot: 15
        ([-1.3, -0.2, 0.05, 2.0], 3),  # a generic table: one-hot
    ],
)
def test_codebook_decompositions_are_exact_and_cheapest(row, planes):
    rebuilt, count = _rebuilt(row)
    assert count == planes
    np.testing.assert_allclose(rebuilt, row, rtol=0, atol=1e-6 * max(abs(v) for v in row))


@needs_kernels
@pytest.mark.parametrize(("method", "bits", "planes"), [("lq", 2, 2), ("lq", 3, 3), ("search", 2, 2)])
def test_seed_codebooks_run_with_their_planes(method, bits, planes):
    """LQ-Nets and weight-search (signed powers of two) generators on the kernels at the papers' cost."""
    torch.manual_seed(0)
    spec = QuantSpec(weight=method, weight_bits=bits, act="sign", act_bits=1)
    model = convert(trained_like_dcgan(width=8), spec).eval()
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    graph, _ = capture(model, z[:1])
    expected = PackedModel(graph, "torch")(z)
    for path in KERNEL_PATHS:
        packed = PackedModel(graph, path)
        layers = [_kernel_layer(step) for step in packed.steps if step.backend == f"x86:{path}"]
        assert len(layers) == 3
        out = packed(z)
        assert [lay._plan.coef_a.numel() // lay._plan.offset_a.numel() for lay in layers] == [planes] * 3
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _kernel_layer(step) -> QuantWeightLayer:
    cells = [cell.cell_contents for cell in step.run.__closure__]
    return next(c for c in cells if isinstance(c, QuantWeightLayer))


# ----- BatchNorm folded into the thresholds -----


def _norm(channels: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.randn(channels, generator=gen)
    gamma[0], gamma[1] = 0.0, -abs(gamma[1])  # a dead channel and a negative scale (the comparison flips)
    return {
        "running_mean": torch.randn(channels, generator=gen) * 0.1,
        "running_var": torch.rand(channels, generator=gen) + 0.5,
        "weight": gamma,
        "bias": torch.randn(channels, generator=gen) * 0.3,
    }


@pytest.mark.parametrize(("count", "ties_up"), [(2, True), (2, False), (4, False), (16, False)])
def test_folded_thresholds_equal_the_batch_norm_in_float64(count, ties_up):
    """Folded codes equal the codes of BN(x) - shift evaluated in float64 (the real-number comparison up to
    float64 rounding), negative and zero scales included; vs float32 torch, rounding flips a few in 1e5."""
    channels, eps = 6, 1e-5
    bn = _norm(channels, seed=count)
    shift = torch.linspace(-0.2, 0.2, channels)
    levels = torch.tensor([-1.0, 1.0]) if ties_up else _levels(count, 0.0, 1.0)
    midpoints = ((levels[1:] + levels[:-1]) / 2).reshape(1, -1)
    coding = fold_batch_norm(levels, midpoints, ties_up, shift, bn, eps)
    x = torch.randn(4000, channels, generator=torch.Generator().manual_seed(5))
    codes = coding.codes(x)
    d = {k: v.to(torch.float64) for k, v in bn.items()}
    z = (x.double() - d["running_mean"]) / torch.sqrt(d["running_var"] + eps) * d["weight"] + d["bias"]
    u = (z - shift.double()).unsqueeze(-1)
    exact = ((u >= midpoints.double()) if ties_up else (u > midpoints.double())).sum(dim=-1)
    assert torch.equal(codes, exact)
    assert codes[:, 0].unique().numel() == 1  # gamma = 0: a constant code
    z32 = F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, eps)
    z32 = z32 - shift
    t32 = (z32.unsqueeze(-1) >= midpoints) if ties_up else (z32.unsqueeze(-1) > midpoints)
    assert (t32.sum(dim=-1) != codes).float().mean().item() < 1e-3


#: kind, cin, cout, kernel, stride, weight bits: a folded two-level input (one threshold per channel) into the
#: register kernels, the one-word lane kernels at 1, 5-8 and 9-16 rows, and two words per pixel
ONE_THRESHOLD_CASES = [
    ("conv_transpose2d", 64, 32, 4, 2, 1),
    ("conv_transpose2d", 32, 1, 4, 2, 1),
    ("conv_transpose2d", 32, 1, 4, 2, 8),
    ("conv_transpose2d", 20, 3, 3, 2, 4),
    ("conv2d", 100, 8, 3, 1, 2),
]


@needs_kernels
@pytest.mark.parametrize("ties_up", [True, False])
@pytest.mark.parametrize("case", ONE_THRESHOLD_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-w{c[5]}")
def test_folded_two_level_input_on_every_path_and_memory_format(case, ties_up):
    """A BatchNorm folded into a two-level activation (sign, or {0, 1.3} with ties going down) packs with its
    own one-threshold packer: NCHW and channels-last input give the float layer on the folded codes, and
    every path the same bits."""
    kind, cin, cout, k, stride, wbits = case
    levels3 = _levels(3, 0.0, 1.0)
    layer, weight, bias, hyper = _layer(kind, cin, cout, k, stride, 1, wbits, levels3, seed=wbits)
    levels = torch.tensor([-1.0, 1.0]) if ties_up else torch.tensor([0.0, 1.3])
    midpoints = ((levels[1:] + levels[:-1]) / 2).reshape(1, -1)
    layer.binary_input = fold_batch_norm(levels, midpoints, ties_up, None, _norm(cin, seed=cin), 1e-5)
    x = torch.randn(3, cin, 7, 7, generator=torch.Generator().manual_seed(cout))
    x[:, :, 0, 0] = layer.binary_input.thresholds[:, 0] * layer.binary_input.signs  # exact ties
    expected = _reference(kind, layer.binary_input.apply(x), weight, bias, hyper)
    outputs = []
    for path in KERNEL_PATHS:
        layer.kernel_path = path
        outputs += [layer(x), layer(x.to(memory_format=torch.channels_last))]
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=_tolerance(weight, levels))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def _w2a2_graph(width: int = 16):
    spec = QuantSpec(weight="minmax", weight_bits=2, act="dorefa", act_bits=2)
    model = convert(trained_like_dcgan(width=width), spec).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data[::3] *= -1  # negative scales on a third of the channels
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    return capture(model, z[:1])[0], z


@needs_kernels
def test_fused_generator_drops_the_batch_norms_and_matches_unfused():
    """W2A2 dcgan-g-28: fused, no BatchNorm or quant_act runs before a bit-plane layer (the one-channel output
    layer included: its 16 inputs fit one word, so the one-word lane kernels take it); the mismatch vs the
    unfused plan is rounding at thresholds only (measured share of differing outputs stays below 1%)."""
    graph, z = _w2a2_graph()
    path = KERNEL_PATHS[0]
    fused, unfused = plan_graph(graph, path), plan_graph(graph, path, fuse_norm=False)
    ran = [(step.node.op, step.backend.split(":")[0]) for step in fused[2:] if step.node.op != "tanh"]
    assert ran == [("conv_transpose2d", "x86")] * 3
    assert sum(step.node.op == "batch_norm" for step in unfused) == 3
    x = z.reshape(16, 100, 1, 1)
    a, b = run_steps(fused, x)[graph.output], run_steps(unfused, x)[graph.output]
    expected = PackedModel(graph, "torch")(z).reshape(a.shape)
    torch.testing.assert_close(b, expected, rtol=0, atol=1e-5)
    assert ((a - b).abs() > 1e-5).float().mean().item() < 0.01


@needs_kernels
@pytest.mark.parametrize("batch", [1, 64])
def test_latent_gemm_equals_the_transposed_conv_at_few_and_many_rows(batch):
    """The latent layer's GEMM (torch's BLAS for a few rows, oneDNN from x86.ONEDNN_MIN_ROWS on) equals the
    torch backend's transposed conv within float32 rounding."""
    graph, _ = _w2a2_graph()
    latent = next(step for step in plan_graph(graph, KERNEL_PATHS[0]) if step.backend == "x86:gemm")
    reference = next(step for step in plan_graph(graph, "torch") if step.node.name == latent.node.name)
    z = torch.randn(batch, 100, 1, 1, generator=torch.Generator().manual_seed(batch))
    torch.testing.assert_close(latent.run(z), reference.run(z), rtol=1e-5, atol=1e-5)


# ----- threads -----


@needs_kernels
@pytest.mark.parametrize("case", MULTI_CASES[:3], ids=lambda c: f"{c[0]}-w{c[6]}-l{c[7]}")
def test_every_thread_count_gives_the_same_bits(case):
    kind, cin, cout, k, stride, pad, wbits, count, size = case
    layer, _, _, _ = _layer(kind, cin, cout, k, stride, pad, wbits, _levels(count, -1.0, 1.0), seed=3)
    layer.kernel_path = KERNEL_PATHS[0]
    x = torch.randn(5, cin, size, size, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(layer(x).clone())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


# ----- Conv2d coverage -----


def _conv_model(cin, cout, k, stride, mode, act_bits, seed):
    """quant conv (float input) -> BN -> act -> the conv under test (quantized, ``mode`` padding)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, padding_mode=mode),
    )
    model[1].running_mean.normal_(0, 0.1)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


CONV_CASES = [  # cin, cout, kernel, stride, padding mode, weight bits, act bits, size
    (3, 8, 1, 1, "zeros", 1, 1, 6),
    (16, 16, 3, 1, "reflect", 2, 2, 7),
    (8, 33, 3, 2, "zeros", 4, 4, 9),
    (70, 8, 4, 2, "reflect", 1, 2, 8),
    (12, 1, 7, 1, "zeros", 2, 1, 9),
    (5, 24, 7, 2, "reflect", 4, 2, 11),
    (64, 64, 3, 2, "zeros", 1, 4, 8),
    (20, 3, 4, 1, "zeros", 3, 3, 6),
]


@needs_kernels
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"k{c[2]}s{c[3]}-{c[4]}-w{c[5]}a{c[6]}")
def test_conv2d_coverage_against_the_torch_backend(case):
    cin, cout, k, stride, mode, wbits, abits, size = case
    act = "sign" if abits == 1 else "dorefa"
    spec = QuantSpec(weight="minmax", weight_bits=wbits, act=act, act_bits=abits)
    model = convert(_conv_model(cin, cout, k, stride, mode, abits, seed=cin + k), spec).eval()
    x = torch.randn(3, cin, size, size, generator=torch.Generator().manual_seed(k))
    graph, _ = capture(model, x[:1])
    expected = PackedModel(graph, "torch")(x)
    scale = max(1.0, expected.abs().max().item())
    # The claim policy: bit planes for two levels, or at most 4 weight x activation plane pairs and more than
    # 4 output channels or at most 64 inputs; else the integer path.
    family = "x86" if abits == 1 or (wbits * abits <= 4 and (cout > 4 or cin <= 64)) else "x86-int8"
    outputs = []
    for path in KERNEL_PATHS:
        packed = PackedModel(graph, path)
        assert [step.backend for step in packed.steps].count(f"{family}:{path}") == 1
        outputs.append(packed(x))
        share = ((outputs[-1] - expected).abs() > 1e-3 * scale).float().mean().item()
        assert share < 0.01  # only BN-folding rounding at a threshold (or a midpoint tie) may flip a code
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


# ----- native runtime -----


@pytest.mark.skipif(not native.available(), reason="native runtime not built: run `make runtime`")
@pytest.mark.parametrize(("wbits", "abits"), [(2, 2), (4, 4)])
def test_native_runs_multi_level_generators_on_kernels(tmp_path, wbits, abits):
    """W2A2 / W4A4 dcgan-g-28 in liblowbit: the same folded thresholds and planes as the Python kernels, so
    the same outputs (to float32 rounding of the float ops), bit-identical for 1, 2 and 3 threads."""
    spec = QuantSpec(weight="minmax", weight_bits=wbits, act="dorefa", act_bits=abits)
    model = convert(trained_like_dcgan(width=16), spec).eval()
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    graph, _ = capture(model, z[:1])
    path = write_graph(graph, tmp_path / "g.lowbit")
    lib = native.NativeModel(path.read_bytes(), str(path))
    lib.set_kernel_path("auto")
    outputs = []
    for threads in (1, 2, 3):
        lib.set_threads(threads)
        outputs.append(lib.run(z.numpy()))
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
    expected = PackedModel(graph, "torch")(z).numpy()
    assert (np.abs(outputs[0] - expected) > 1e-5).mean() < 0.01  # BN-folding flips at thresholds only
    if KERNEL_PATHS:
        python = PackedModel(graph, KERNEL_PATHS[0])(z).numpy()
        assert np.abs(outputs[0] - python).max() <= 1e-6  # same codes: float ops' rounding only


def _cli(command: list[str], path: Path, x_npy: Path, out: Path, kernel_path: str) -> np.ndarray:
    result = subprocess.run([*command, str(path), "--input", str(x_npy), "-o", str(out), "--kernel-path",
                             kernel_path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return np.load(out)


@pytest.mark.skipif(not CLI.exists() or not ARM_CLI.exists() or QEMU is None,
                    reason="no x86 / aarch64 lowbit-run build or qemu-aarch64 here")
def test_arm64_neon_runs_planes_like_x86(tmp_path):
    """An LQ W2 (decomposed codebook) / 2-bit DoReFa (two activation planes) generator with folded
    BatchNorms: the NEON and portable ARM64 kernels count the same integers as x86 (libm's last bit aside)."""
    torch.manual_seed(0)
    spec = QuantSpec(weight="lq", weight_bits=2, act="dorefa", act_bits=2)
    model = convert(trained_like_dcgan(width=8), spec).eval()
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(6))
    path = write_graph(capture(model, z[:1])[0], tmp_path / "g.lowbit")
    np.save(tmp_path / "z.npy", z.numpy())
    x86 = _cli([str(CLI)], path, tmp_path / "z.npy", tmp_path / "x86.npy", "auto")
    neon = _cli([QEMU, str(ARM_CLI)], path, tmp_path / "z.npy", tmp_path / "neon.npy", "neon")
    portable = _cli([QEMU, str(ARM_CLI)], path, tmp_path / "z.npy", tmp_path / "arm.npy", "scalar")
    assert np.array_equal(neon, portable)
    assert np.abs(neon - x86).max() <= 1e-6
