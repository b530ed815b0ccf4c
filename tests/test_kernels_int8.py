"""The integer path (csrc/int8*.cpp, backends/x86/int8.py, runtime/src/int8_layer.cpp): layers fed by a
uniform multi-level activation with affine 1-8 bit weights. Every kernel path this CPU runs against the scalar
path bit for bit and against the torch backend within int8.TOLERANCE, on random convs (stride 1 / 2, zero and
reflect padding), transposed convs and linear layers, unsigned and signed levels, per-channel shifts, 1 and 2
threads; W2A8 / W4A8 DCGAN end to end in Python and in the native runtime; the ARM64 build under qemu."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gan_zoo import trained_like_dcgan
from lowbit.export import PackedModel, available_paths, load
from lowbit.export.backends import native, x86
from lowbit.export.backends.x86 import build, int8
from lowbit.export.format import write_graph
from lowbit.export.ir import capture
from lowbit.export.runtime import run_steps
from lowbit.nn import QuantSpec, convert

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
CLI, ARM_CLI = RUNTIME / "build" / "lowbit-run", RUNTIME / "build-arm64" / "lowbit-run"
QEMU = shutil.which("qemu-aarch64")
PATHS = [path for path in available_paths() if path != build.TORCH_PATH]
#: ARM64 vs x86-64: the same integers, glibc's tanh differs in the last bit (as test_native_runtime)
ARM_TOLERANCE = 1e-6

pytestmark = pytest.mark.skipif(not PATHS, reason="no C++ compiler: the kernels cannot be built here")


def _target(kind: str, rng: random.Random, cin: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random weight layer of ``kind`` and the per-sample input shape of the model around it."""
    cout = rng.choice([1, 3, 5, 16, 24, 40])
    if kind == "linear":
        return nn.Linear(cin, cout), (7,)
    k, stride = rng.choice([1, 3, 4]), rng.choice([1, 2])
    size = rng.choice([5, 8])
    if kind == "conv_transpose2d":
        padding = rng.randint(0, k - 1)
        extra = rng.randint(0, stride - 1)
        return nn.ConvTranspose2d(cin, cout, k, stride, padding, output_padding=extra), (3, size, size)
    mode = rng.choice(["zeros", "reflect"])
    padding = rng.randint(0, min(k // 2 + 1, size - 1) if mode == "reflect" else k)
    return nn.Conv2d(cin, cout, k, stride, padding, padding_mode=mode), (3, size, size)


def _case(seed: int) -> tuple[PackedModel, torch.Tensor, str]:
    """A float stem, a quantized activation (3..256 uniform levels, unsigned or signed, maybe shifted) and a
    random packed weight layer (1-8 bit affine), as a torch-backend model; returns it, an input, the layer."""
    rng = random.Random(seed)
    kind = rng.choice(["conv2d", "conv2d", "conv_transpose2d", "conv_transpose2d", "linear"])
    cin = rng.choice([3, 8, 13, 32, 70])
    target, shape = _target(kind, rng, cin)
    stem = nn.Linear(7, cin) if kind == "linear" else nn.Conv2d(3, cin, 3, padding=1)
    torch.manual_seed(seed)
    model = nn.Sequential(stem, nn.ReLU(), target).eval()
    act_bits = rng.choice([2, 5, 8])
    signed = rng.random() < 0.5  # signed codes: levels symmetric around 0, like a signed 8-bit activation
    count = rng.choice([16, 255, 256]) if signed else 2**act_bits
    act_planes = math.ceil(math.log2(count))
    # The claim policy leaves at most 4 weight x activation plane pairs of <= 16 levels to the bit planes,
    # and none of a layer with at most FEW_OUTPUT_CHANNELS outputs and more than 64 inputs.
    outputs = target.out_features if kind == "linear" else target.out_channels
    few = outputs <= x86.FEW_OUTPUT_CHANNELS and cin > 64
    low_bits = 4 // act_planes + 1 if count <= 16 and not few else 1
    bits = rng.randint(low_bits, 8)
    spec = QuantSpec(
        weight="minmax",
        weight_bits=bits,
        act="act",
        act_bits=act_bits,
        overrides={"0": {"weight_bits": 32}},
    )
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(seed))
    graph, _ = capture(convert(model, spec).eval(), x[:1])
    act = next(node for node in graph.nodes if node.op == "quant_act")
    if signed:
        act.tensors["levels"] = torch.linspace(-0.8, 0.8, count)
    if rng.random() < 0.5:
        act.tensors["shift"] = 0.2 * torch.randn(cin, generator=torch.Generator().manual_seed(seed + 1))
    layer = [node for node in graph.nodes if node.op == kind][-1].name
    return PackedModel(graph, build.TORCH_PATH), x, layer


def _layer_output(
    model: PackedModel, path: str, x: torch.Tensor, layer: str, threads: int, channels_last: bool = False
) -> torch.Tensor:
    """The layer's output on ``path`` for the torch backend's own input to it (so only this layer differs),
    that input optionally in channels-last memory (as a previous kernel layer leaves it)."""
    reference = run_steps(model.steps, model._input(x))
    model.set_kernel_path(path)
    step = next(step for step in model.steps if step.node.name == layer)
    assert step.backend == f"{int8.NAME}:{path}"
    inputs = [reference[name] for name in step.inputs]
    if channels_last and inputs[0].dim() == 4:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = step.run(*inputs)
    finally:
        torch.set_num_threads(previous)
        model.set_kernel_path(build.TORCH_PATH)
    return out.contiguous()


@pytest.mark.parametrize("seed", range(14))
def test_every_path_equals_scalar_and_the_torch_backend_within_tolerance(seed):
    model, x, layer = _case(seed)
    expected = run_steps(model.steps, model._input(x))[layer]
    scalar = _layer_output(model, "scalar", x, layer, threads=1)
    scale = 1.0 + float(expected.abs().max())
    assert float((scalar - expected).abs().max()) <= int8.TOLERANCE * scale
    for path in PATHS:
        for threads in (1, 2):
            assert torch.equal(_layer_output(model, path, x, layer, threads), scalar), (path, threads)
        assert torch.equal(_layer_output(model, path, x, layer, 1, channels_last=True), scalar), path


def test_two_level_inputs_stay_on_the_binary_kernels_and_tables_on_torch():
    """The claim rule: 2 levels are the bit-serial path's, non-affine codebooks and uneven levels nobody's."""
    model, _, layer = _case(0)
    node = next(n for n in model.graph.nodes if n.name == layer)
    producers = {n.name: n for n in model.graph.nodes}
    act = next(n for n in model.graph.nodes if n.op == "quant_act")
    assert int8.claims_int8(node, producers)
    act.tensors["levels"] = torch.tensor([0.0, 0.1, 0.5, 1.0])
    assert int8.uniform_input(act) is None and not int8.claims_int8(node, producers)
    act.tensors["levels"] = torch.tensor([0.0, 1.0])
    assert not int8.claims_int8(node, producers)


def _dcgan(weight_bits: int) -> nn.Module:
    return convert(
        trained_like_dcgan(width=16),
        QuantSpec(weight="minmax", weight_bits=weight_bits, act="act", act_bits=8),
    ).eval()


@pytest.mark.parametrize("weight_bits", [2, 4, 8])
def test_w_a8_dcgan_runs_on_the_integer_path_end_to_end(weight_bits, tmp_path):
    """Python x86 and native runtime plan every hidden layer on the integer kernels and agree, the native
    runtime on every kernel path (also with 8-bit weights, whose bytes leave [-64, 64]); against the torch
    backend the only differences are levels that flip where a value sits on a midpoint within float error."""
    path = write_graph(capture(_dcgan(weight_bits), torch.randn(1, 100))[0], tmp_path / "g.lowbit")
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    expected = load(path, kernel_path="torch")(z)
    python = load(path, kernel_path=PATHS[0], backend="python")
    backends = [row["backend"] for row in python.plan_table() if row["op"] == "conv_transpose2d"]
    assert backends[1:] == [f"{int8.NAME}:{PATHS[0]}"] * 3
    out = python(z)
    assert float((out - expected).abs().max()) < 1e-2
    assert float(((out - expected).abs() > 1e-4).float().mean()) < 0.02
    if CLI.exists() and native.available():
        runtime = load(path, backend="native")
        assert [row["backend"] for row in runtime.plan_table() if row["op"] == "conv_transpose2d"][1:] == [
            f"native-int8:{runtime.kernel_path}"
        ] * 3
        assert float((runtime(z) - out).abs().max()) <= 1e-6
        for kernel_path in native.available_paths():
            runtime.native.set_kernel_path(kernel_path)
            assert float((runtime(z) - out).abs().max()) <= 1e-6, kernel_path


@pytest.mark.parametrize("count", [3, 16, 256])
def test_codes_equal_torch_bucketize_on_and_beside_every_bucket_edge(count):
    """A 1x1 layer whose channel c reads only input channel c with weight 1 outputs the level index itself:
    inputs on each float32 midpoint, one ulp either side, far outside and NaN-free, on every path."""
    levels = torch.linspace(-0.5, 1.5, count)
    midpoints = (levels[1:] + levels[:-1]) / 2
    edges = torch.cat(
        [midpoints, torch.nextafter(midpoints, midpoints + 1), torch.nextafter(midpoints, midpoints - 1)]
    )
    values = torch.cat([edges, torch.tensor([-1e30, -3.0, 0.0, 3.0, 1e30]), torch.randn(61)])
    values = values[: values.numel() // 4 * 4]
    x = values.reshape(4, 1, -1)[None].contiguous()  # (1, 4 channels, 1, W)
    words = torch.zeros(1, 4, 16, dtype=torch.int8)
    words[0, torch.arange(4), torch.arange(4)] = 1
    w_t = words.permute(0, 2, 1).contiguous().view(torch.int32).reshape(1, 16)
    source = int8.UniformInput(
        float(levels[0]),
        float(levels[1] - levels[0]),
        count,
        torch.cat([torch.tensor([-math.inf]), midpoints, torch.tensor([math.inf])]),
    )
    base = torch.zeros(1, x.shape[3], 4, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    expected = torch.bucketize(x[0, :, 0], midpoints).t().to(torch.float32)
    for path in PATHS:
        out = build.kernel_ops().int8_conv(
            x,
            None,
            source.bounds,
            source.lo,
            1 / source.step,
            [w_t],
            [0, 0, 1, 1, 0, 0],
            ones,
            torch.zeros(4, dtype=torch.float64),
            base,
            [1, 1, 1, 1],
            build.path_id(path),
        )
        assert torch.equal(out[0, 0], expected), path


def test_bad_kernel_arguments_get_a_clear_error():
    ops = build.kernel_ops()
    x = torch.randn(1, 4, 3, 3)
    w_t = torch.zeros(9, 16, dtype=torch.int32)
    args = (
        x,
        None,
        torch.tensor([0.0, 0.5, 1.0]),
        0.0,
        2.0,
        [w_t],
        [0, 0, 3, 3, -1, 0, 1, -1, 0, 1],
        torch.ones(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.zeros(3, 3, 2, dtype=torch.float64),
        [1, 1, 1, 1],
        build.path_id("scalar"),
    )
    with pytest.raises(RuntimeError, match="bounds must start at -inf"):
        ops.int8_conv(*args)


@pytest.mark.skipif(
    not ARM_CLI.exists() or QEMU is None or not CLI.exists(), reason="no aarch64 build or qemu"
)
def test_arm64_build_under_qemu_equals_x86(tmp_path):
    """sdot on q - 128 (NEON), the portable loops under qemu, and the x86 kernels count the same integers."""
    path = write_graph(capture(_dcgan(4), torch.randn(1, 100))[0], tmp_path / "g.lowbit")
    np.save(tmp_path / "z.npy", torch.randn(4, 100, generator=torch.Generator().manual_seed(2)).numpy())

    def run(binary: list[str], *extra: str) -> np.ndarray:
        out = tmp_path / "out.npy"
        command = [*binary, str(path), "--input", str(tmp_path / "z.npy"), "-o", str(out), *extra]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return np.load(out)

    x86 = run([str(CLI)])
    neon, portable = (
        run([QEMU, str(ARM_CLI)], "--kernel-path", "neon"),
        run([QEMU, str(ARM_CLI)], "--kernel-path", "scalar"),
    )
    assert np.array_equal(neon, portable)
    assert float(np.abs(neon - x86).max()) <= ARM_TOLERANCE


@pytest.mark.parametrize(
    ("weight_bits", "act_bits", "planes"),
    [(2, 2, 3), (4, 4, 0), (2, 8, 0)],
)
def test_claim_policy_picks_the_stated_kernel_family(weight_bits, act_bits, planes, tmp_path):
    """docs/export.md "Which kernels run a layer": W2A2 (4 plane pairs) on the bit planes, its one-channel
    output layer too (16 inputs: one word a pixel), W4A4 (16 pairs) and W2A8 (256 levels) on the integer
    path, in the Python plan and in liblowbit's own plan."""
    spec = QuantSpec(weight="minmax", weight_bits=weight_bits, act="dorefa", act_bits=act_bits)
    model = convert(trained_like_dcgan(width=16), spec).eval()
    path = write_graph(capture(model, torch.randn(1, 100))[0], tmp_path / "g.lowbit")
    python = load(path, kernel_path=PATHS[0], backend="python")
    hidden = [row["backend"] for row in python.plan_table() if row["op"] == "conv_transpose2d"][1:]
    assert hidden == [f"x86:{PATHS[0]}"] * planes + [f"{int8.NAME}:{PATHS[0]}"] * (3 - planes)
    if native.available():
        lib = native.NativeModel(path.read_bytes(), str(path))
        lib.set_kernel_path("auto")
        assert lib.kernel_layers() == (planes, 3 - planes)
