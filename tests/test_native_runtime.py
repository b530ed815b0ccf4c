"""The native runtime (runtime/, built by `make runtime`, which `make test` runs first): liblowbit and
lowbit-run against the Python torch backend on the export zoo and lowbit's DCGAN, the ARM64 build under
qemu-aarch64 against the x86 one, corrupted and hostile files under AddressSanitizer + UBSan, the CLI's PNG
and .npy output, and `lowbit.export.load` running on it by default."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gan_zoo import ZOO, calibrated, resigned, trained_like_dcgan, zoo_specs
from lowbit.errors import CheckpointError
from lowbit.export import PackedModel, load
from lowbit.export.backends import native
from lowbit.export.format import write_graph
from lowbit.export.ir import capture
from lowbit.nn import QuantSpec, convert

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
CLI = RUNTIME / "build" / "lowbit-run"
ARM_CLI = RUNTIME / "build-arm64" / "lowbit-run"
FUZZ = RUNTIME / "build-asan" / "fuzz_load"
QEMU = shutil.which("qemu-aarch64")
SPECS = zoo_specs()
#: native vs torch backend: every output within this much of the reference, times max(1, max |reference|).
#: (float accumulation order differs: ~1e-7 relative is what the zoo shows; binary layers count exactly.)
TOLERANCE = 5e-5
#: ARM64 vs x86-64 runtime (the same code and the same fused multiply-adds; libm's last bit differs, see the
#: test). On x86 CPUs without AVX2 + FMA the float products multiply then add: within TOLERANCE of the rest.
ARM_TOLERANCE = 1e-6
#: binary activations right after a shift-free layer tie at exact zeros and flip (docs/export.md
#: "Exactness"): the Python kernels warn about these two as well; compared with the kernels' own rule.
SYSTEMATIC_TIES = {("cyclegan-resnet", "w1a1-sign"), ("pix2pix-unet", "w1a1-sign")}

pytestmark = pytest.mark.skipif(
    not CLI.exists() or not native.available(), reason="native runtime not built: run `make runtime`"
)


def _dcgan() -> nn.Module:
    """lowbit's DCGAN-28 generator with trained-like batch-norm statistics, W1A1 sign."""
    return convert(trained_like_dcgan(width=16), SPECS["w1a1-sign"]).eval()


#: every zoo model with a table codebook (W2 EM) and both kinds of binary layers; 4-bit affine codes on two
#: (the zoo x spec matrix of test_export_zoo takes minutes; this keeps the native tests near 30 s)
CASES = [(name, spec) for name in ZOO for spec in ("w2-em", "w1a1-sign", "w1a1-act")] + [
    ("examples-dcgan", "w4"),
    ("cyclegan-resnet", "w4"),
    ("dcgan-g-28", "w1a1-sign"),
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path, np.ndarray]]:
    """(name, spec) -> (packed file, input .npy, torch-backend output) for every case, captured without the
    export's own parity runs (they are test_export_zoo's job)."""
    folder = tmp_path_factory.mktemp("native-zoo")
    files, fp32 = {}, {}
    for name, spec in CASES:
        if name not in fp32:
            fp32[name] = None if name == "dcgan-g-28" else calibrated(name)
        model = _dcgan() if name == "dcgan-g-28" else convert(fp32[name], SPECS[spec]).eval()
        shape = [100] if name == "dcgan-g-28" else ZOO[name][1]
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
        graph, _ = capture(model, x[:1])
        path = write_graph(graph, folder / f"{name}-{spec}.lowbit")
        np.save(folder / f"{name}-{spec}.npy", x.numpy())
        expected = PackedModel(graph, "torch")(x).numpy()
        files[(name, spec)] = (path, folder / f"{name}-{spec}.npy", expected)
    return files


def _mismatch(out: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(worst |difference| / max(1, max |expected|), share of outputs off by more than 1e-3 of that scale)."""
    scale = max(1.0, float(np.abs(expected).max()))
    diff = np.abs(out - expected) / scale
    return float(diff.max()), float((diff > 1e-3).mean())


def _fuzz(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The sanitizer build's robustness driver; a sanitizer report or crash is a non-zero exit."""
    result = subprocess.run([str(FUZZ), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _run_cli(binary: list[str], path: Path, x_npy: Path, out: Path, *extra: str) -> np.ndarray:
    result = subprocess.run(
        [*binary, str(path), "--input", str(x_npy), "-o", str(out), *extra], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return np.load(out)


@pytest.mark.parametrize(("name", "spec"), CASES)
def test_native_equals_the_torch_backend_on_the_zoo(zoo, name, spec):
    """Both the float code ("float") and the binary kernels ("auto") of liblowbit, through ctypes."""
    path, x_npy, expected = zoo[(name, spec)]
    x = np.load(x_npy)
    model = native.NativeModel(path.read_bytes(), str(path))
    for kernel_path in ("float", "auto"):
        model.set_kernel_path(kernel_path)
        worst, share = _mismatch(model.run(x), expected)
        if (name, spec) in SYSTEMATIC_TIES:
            assert np.isfinite(worst)  # tie flips cascade, as on the Python kernels (export warns)
        else:
            assert worst <= TOLERANCE, (kernel_path, worst)


def test_cli_equals_the_library_and_every_kernel_path_agrees(zoo, tmp_path):
    """lowbit-run --input gives the library's numbers; all kernel paths compute the same integers."""
    path, x_npy, _ = zoo[("examples-dcgan", "w1a1-sign")]
    model = native.NativeModel(path.read_bytes(), str(path))
    model.set_kernel_path("auto")
    expected = model.run(np.load(x_npy))
    for kernel_path in native.available_paths():
        out = _run_cli([str(CLI)], path, x_npy, tmp_path / "out.npy", "--kernel-path", kernel_path)
        assert np.array_equal(out, expected), kernel_path


FUSED_CASES = [("dcgan-g-28", "w1a1-sign"), ("patchgan", "w1a1-sign"), ("patchgan", "w1a1-act")]


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_layers_write_the_bits_their_reader_would_pack(zoo, case):
    """The fused threshold epilogue: on the register kernels (avx512, avx2) the layer before a
    BatchNorm-folded binary layer writes that layer's packed input (one such pair in each case: the other
    layers have too few channels for the register kernels, or nothing to fold), the scalar path packs float
    outputs; every path and thread count gives the same outputs bit for bit, for one sample and a batch."""
    path, x_npy, _ = zoo[case]
    x = np.load(x_npy)
    model = native.NativeModel(path.read_bytes(), str(path))
    model.set_kernel_path("scalar")
    assert model.fused_layers() == 0
    reference = model.run(x)
    for kernel_path in native.available_paths():
        model.set_kernel_path(kernel_path)
        assert model.fused_layers() == (1 if kernel_path == "avx512" else 0), kernel_path
        for threads in (1, 3):
            model.set_threads(threads)
            assert np.array_equal(model.run(x), reference), (kernel_path, threads)
            assert np.array_equal(model.run(x[:1]), reference[:1]), (kernel_path, threads)


def _narrow_dcgan(last: int) -> nn.Module:
    """A DCGAN generator 32 channels wide (the widths of compress-targets-mnist's w4a1-ch32 recipe; `last`
    channels in the last hidden layer: 16 as in 50% channels) at W4 with sign activations: its two inner
    layers read 32 channels (AVX-512's 32-bit-row kernel, 32- or 16-channel blocks)."""
    torch.manual_seed(1)
    layers = []
    for cin, cout, k, s, p in ((100, 32, 4, 1, 0), (32, 32, 3, 2, 1), (32, last, 4, 2, 1)):
        layers += [nn.ConvTranspose2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*layers, nn.ConvTranspose2d(last, 1, 4, 2, 1), nn.Tanh())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.02), module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0, 0.1)
    return convert(model.eval(), QuantSpec(weight="minmax", weight_bits=4, act="sign", act_bits=1)).eval()


@pytest.mark.parametrize("last", [32, 16])
def test_narrow_layers_fuse_and_agree_with_the_torch_backend(tmp_path, last):
    """32-channel layers (and a 16-channel one): the layers writing 32 channels for a BatchNorm-folded binary
    reader write its bits on avx512; every path and thread count gives the same outputs bit for bit, within
    TOLERANCE of the torch backend."""
    x = torch.randn(5, 100, 1, 1, generator=torch.Generator().manual_seed(2))
    graph, _ = capture(_narrow_dcgan(last), x[:1])
    path = write_graph(graph, tmp_path / "narrow.lowbit")
    expected = PackedModel(graph, "torch")(x).numpy()
    model = native.NativeModel(path.read_bytes(), str(path))
    model.set_kernel_path("scalar")
    reference = model.run(x.numpy())
    assert _mismatch(reference, expected)[0] <= TOLERANCE
    for kernel_path in native.available_paths():
        model.set_kernel_path(kernel_path)
        fused = 2 if last == 32 else 1  # a 16-channel writer stores floats (sinks take 32-channel blocks)
        assert model.fused_layers() == (fused if kernel_path == "avx512" else 0), kernel_path
        for threads in (1, 2):
            model.set_threads(threads)
            assert np.array_equal(model.run(x.numpy()), reference), (kernel_path, threads)


def _dyadic_binary_dcgan(act: str) -> nn.Module:
    """A W1 DCGAN generator (64/64/32 channels) whose weights are -0.5 / 0.25 and whose BatchNorms have eps
    0, scales +-1 or +-2 and shifts in quarters: every combine value and every folded threshold is a short
    dyadic number, so the thresholds sit exactly on values the layers reach (ties), and the negative scales
    flip the rule."""
    torch.manual_seed(3)
    layers = []
    for cin, cout, k, s, p in ((100, 64, 4, 1, 0), (64, 64, 4, 2, 1), (64, 32, 4, 2, 1)):
        conv = nn.ConvTranspose2d(cin, cout, k, s, p, bias=False)
        conv.weight.data = torch.where(torch.rand_like(conv.weight) < 0.5, -0.5, 0.25)
        norm = nn.BatchNorm2d(cout, eps=0.0)
        norm.weight.data = torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, (cout,))]
        norm.bias.data = torch.randint(-3, 4, (cout,)).float() / 4
        norm.running_mean.zero_(), norm.running_var.fill_(1.0)
        layers += [conv, norm, nn.ReLU()]
    model = nn.Sequential(*layers, nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh())
    return convert(model.eval(), QuantSpec(weight="minmax", weight_bits=1, act=act, act_bits=1)).eval()


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("act", ["sign", "act"])
def test_integer_epilogue_decides_ties_as_the_float_rule(tmp_path, act, extreme):
    """The fused layers' integer epilogue (a fixed-point line per border class and channel in place of the
    float combine) gives the bits of packing the float output, also where a threshold equals a reachable
    value (ties up for sign, strictly above for the {0, hi} activation) and where a negative BatchNorm scale
    reverses the rule: the avx512 plan fuses both 64- and 32-channel writers and agrees bit for bit with the
    scalar path. `extreme`: some BatchNorm scales 0 (infinite thresholds: a constant bit), 1e-30 or shifts of
    1e30 (thresholds far past every reachable value)."""
    x = torch.randn(64, 100, 1, 1, generator=torch.Generator().manual_seed(4)).numpy()
    model = _dyadic_binary_dcgan(act)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and extreme):
        norm.weight.data[::5], norm.weight.data[1::7], norm.bias.data[2::9] = 0.0, 1e-30, 1e30
    graph, _ = capture(model, torch.from_numpy(x[:1]))
    path = write_graph(graph, tmp_path / "dyadic.lowbit")
    model = native.NativeModel(path.read_bytes(), str(path))
    model.set_kernel_path("scalar")
    reference = model.run(x)
    if "avx512" not in native.available_paths():
        pytest.skip("the fused epilogue runs on AVX-512 only")
    model.set_kernel_path("avx512")
    assert model.fused_layers() == 2
    for threads in (1, 2):
        model.set_threads(threads)
        assert np.array_equal(model.run(x), reference), threads


def test_cli_reads_a_model_from_a_pipe_as_from_its_file(zoo, tmp_path):
    """A pipe reports no size, so the file reader falls back from one sized read to a growing loop: the file
    is made longer than its first two reads (64 KiB, then 64 KiB more) by padding the safetensors header."""
    path, x_npy, _ = zoo[("examples-dcgan", "w2-em")]
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length] + b" " * (1 << 17)
    from_file = _run_cli([str(CLI)], path, x_npy, tmp_path / "file.npy")
    piped = subprocess.run(
        [str(CLI), "/dev/stdin", "--input", str(x_npy), "-o", str(tmp_path / "pipe.npy")],
        input=len(header).to_bytes(8, "little") + header + data[8 + length :],
        capture_output=True,
    )
    assert piped.returncode == 0, piped.stderr
    assert np.array_equal(np.load(tmp_path / "pipe.npy"), from_file)


def test_cli_refuses_a_directory_as_unreadable(tmp_path):
    result = subprocess.run(
        [str(CLI), str(tmp_path), "-o", str(tmp_path / "x.npy")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr == f"error: cannot read {tmp_path}\n"


def test_results_do_not_depend_on_the_thread_count(zoo):
    """Threads share out column tiles of the float products and rows of the binary kernels; every output is
    summed in the same order whatever the count, so 1, 2 and 3 threads give the same bits on both paths."""
    for case in (("cyclegan-resnet", "w2-em"), ("dcgan-g-28", "w1a1-sign"), ("pix2pix-unet", "w1a1-act")):
        path, x_npy, _ = zoo[case]
        x = np.load(x_npy)
        model = native.NativeModel(path.read_bytes(), str(path))
        for kernel_path in ("float", "auto"):
            model.set_kernel_path(kernel_path)
            outputs = []
            for threads in (1, 2, 3):
                model.set_threads(threads)
                outputs.append(model.run(x))
            assert all(np.array_equal(out, outputs[0]) for out in outputs[1:]), (case, kernel_path)


def test_a_large_batch_activates_its_output_over_the_threads_alike(zoo):
    """Past 16,384 values the activation after a kernel layer (the output tanh) runs in chunks over the
    threads: every thread count gives the one-thread run's bits, and the samples those of a small batch."""
    path, x_npy, _ = zoo[("dcgan-g-28", "w1a1-sign")]
    x = np.load(x_npy)
    big = np.concatenate([x] * (-(-24 * 1024 // (x.shape[0] * 784)) + 1))  # > 16,384 output values
    model = native.NativeModel(path.read_bytes(), str(path))
    outputs = []
    for threads in (1, 2, 3):
        model.set_threads(threads)
        outputs.append(model.run(big))
    assert outputs[0].size > 16384 and all(np.array_equal(out, outputs[0]) for out in outputs[1:])
    assert np.array_equal(outputs[0][: x.shape[0]], model.run(x))


def test_float_tiles_agree_bit_for_bit_and_the_portable_one_within_tolerance(zoo, tmp_path):
    """The float products on the AVX2 tile equal the AVX-512 tile's bits (same FMAs in the same order); the
    portable tile (no FMA, for x86 CPUs without AVX2) stays within TOLERANCE of the torch backend."""
    for case in (("cyclegan-resnet", "w4"), ("examples-dcgan", "w2-em")):
        path, x_npy, expected = zoo[case]
        outputs = {}
        for tile in ("", "avx2", "portable"):
            result = subprocess.run(
                [
                    str(CLI),
                    str(path),
                    "--input",
                    str(x_npy),
                    "--kernel-path",
                    "float",
                    "-o",
                    str(tmp_path / "t.npy"),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "LOWBIT_FLOAT_TILE": tile},
            )
            assert result.returncode == 0, result.stderr
            outputs[tile] = np.load(tmp_path / "t.npy")
        assert np.array_equal(outputs["avx2"], outputs[""]), case
        assert _mismatch(outputs["portable"], expected)[0] <= TOLERANCE, case


@pytest.mark.skipif(not ARM_CLI.exists() or QEMU is None, reason="no aarch64 build or qemu-aarch64 here")
def test_arm64_build_under_qemu_equals_x86_on_the_zoo(zoo, tmp_path):
    """The static aarch64 lowbit-run (NEON kernels, picked from the hwcaps) against the x86 build on every zoo
    file: the binary layers count the same integers; the float products sum in the same order with fused
    multiply-adds on NEON as on AVX2 / AVX-512, tanh / sigmoid are the runtime's own float arithmetic, and the
    rest has no fused multiply-adds (-ffp-contract=off); glibc's exp / erf (elu, gelu) may still differ in the
    last bit between x86-64 and ARM64, so outputs agree within ARM_TOLERANCE, and most files bit for bit."""
    exact = 0
    for (name, spec), (path, x_npy, _) in zoo.items():
        x86 = _run_cli([str(CLI)], path, x_npy, tmp_path / "x86.npy")
        arm = _run_cli([QEMU, str(ARM_CLI)], path, x_npy, tmp_path / "arm.npy")
        assert _mismatch(arm, x86)[0] <= ARM_TOLERANCE, (name, spec)
        exact += np.array_equal(arm, x86)
    assert exact >= len(zoo) // 2
    path, x_npy, _ = zoo[("patchgan", "w2-em")]
    neon = _run_cli([QEMU, str(ARM_CLI)], path, x_npy, tmp_path / "a.npy", "--kernel-path", "neon")
    portable = _run_cli([QEMU, str(ARM_CLI)], path, x_npy, tmp_path / "b.npy", "--kernel-path", "scalar")
    assert np.array_equal(neon, portable)


def _png_pixels(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """Width, height, colour type and pixels of a PNG, checking every chunk's CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, _, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8)  # zlib checks the Adler-32
    channels = 3 if colour == 2 else 1
    rows = raw.reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()  # filter type None
    return width, height, colour, rows[:, 1:].reshape(height, width, channels)


def test_cli_writes_png_grids_and_npy_deterministically(zoo, tmp_path):
    path = zoo[("examples-dcgan", "w2-em")][0]
    run = [str(CLI), str(path), "-n", "5", "--seed", "3"]
    subprocess.run([*run, "-o", str(tmp_path / "a.npy")], check=True)
    subprocess.run([*run, "-o", str(tmp_path / "b.npy")], check=True)
    subprocess.run([*run, "-o", str(tmp_path / "grid.png")], check=True)
    images = np.load(tmp_path / "a.npy")
    assert images.shape == (5, 3, 32, 32) and np.array_equal(images, np.load(tmp_path / "b.npy"))
    width, height, colour, pixels = _png_pixels((tmp_path / "grid.png").read_bytes())
    assert (width, height, colour) == (3 * 34 + 2, 2 * 34 + 2, 2)  # 3 x 2 grid, 2-pixel borders
    first = np.clip(np.floor((images[0].transpose(1, 2, 0) + 1) * np.float32(127.5) + 0.5), 0, 255)
    assert np.array_equal(pixels[2:34, 2:34], first.astype(np.uint8))


def test_cli_reports_damaged_files_in_one_line(zoo, tmp_path):
    path = zoo[("examples-dcgan", "w4")][0]
    truncated = tmp_path / "cut.lowbit"
    truncated.write_bytes(path.read_bytes()[:-50])
    result = subprocess.run(
        [str(CLI), str(truncated), "-o", str(tmp_path / "x.npy")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "lies outside the file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----- RPReLU and pruned (sparse) weights -----


@pytest.fixture(scope="module")
def rprelu_and_sparse(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """name -> (packed file, input, torch-backend output): a conv / BatchNorm / RPReLU / sign stack, and
    lowbit's DCGAN pruned to 80% (unstructured) at W2 with sign activations."""
    from lowbit.nn import PruneSpec, QuantSpec, compress
    from lowbit.nn.rprelu import RPReLU

    folder = tmp_path_factory.mktemp("native-rprelu-sparse")
    torch.manual_seed(0)
    stack = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        RPReLU(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        RPReLU(8),
        nn.Conv2d(8, 4, 3, padding=1),
    )
    with torch.no_grad():
        for module in (stack[2], stack[5]):
            for name in ("shift_in", "slope", "shift_out"):
                getattr(module, name).uniform_(-0.5, 0.8)
        stack.train()(torch.randn(8, 3, 8, 8))
    spec = QuantSpec(weight="minmax", weight_bits=2, act="sign", act_bits=1)
    models = {
        "rprelu": (convert(stack.eval(), SPECS["w1a1-sign"]).eval(), [3, 8, 8]),
        "sparse": (compress(trained_like_dcgan(width=16), [PruneSpec(ratio=0.8), spec]).eval(), [100]),
    }
    cases = {}
    for name, (model, shape) in models.items():
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
        graph, _ = capture(model, x[:1])
        path = write_graph(graph, folder / f"{name}.lowbit")
        cases[name] = (path, x.numpy(), PackedModel(graph, "torch")(x).numpy())
    return cases


@pytest.mark.parametrize("name", ["rprelu", "sparse"])
def test_rprelu_and_pruned_weights_run_natively_like_the_torch_backend(rprelu_and_sparse, name):
    """liblowbit reads the rprelu node and the sparse storage (keep map + kept codes) itself: both paths
    agree with the torch backend, and lowbit.export.load now runs such files natively by default."""
    path, x, expected = rprelu_and_sparse[name]
    graph_ops = {node.op for node in load(path, kernel_path="torch").graph.nodes}
    weights = [node.attrs.get("weight", {}) for node in load(path, kernel_path="torch").graph.nodes]
    assert ("rprelu" in graph_ops) if name == "rprelu" else any(w.get("sparse") for w in weights)
    model = native.NativeModel(path.read_bytes(), str(path))
    for kernel_path in ("float", "auto"):
        model.set_kernel_path(kernel_path)
        assert _mismatch(model.run(x), expected)[0] <= TOLERANCE, kernel_path
    assert load(path).runs_native


# ----- hostile and corrupted files (under AddressSanitizer + UndefinedBehaviorSanitizer) -----


def _node(arch, op):
    return next(node for node in arch["nodes"] if node["op"] == op)


def _set(path: list, value):
    """An edit that sets arch[...path...] = value; the path starts at the first node with an op."""

    def edit(arch, tensors):
        target = _node(arch, path[0]) if path[0] != "arch" else arch
        for key in path[1:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


HOSTILE = {
    "codes bits": _set(["conv_transpose2d", "attrs", "weight", "bits"], 8),
    "levels": _set(["conv_transpose2d", "attrs", "weight", "levels"], 99),
    "channel_dim": _set(["conv_transpose2d", "attrs", "weight", "channel_dim"], 7),
    "huge channels": _set(["conv_transpose2d", "attrs", "in_channels"], 2**40),
    "zero stride": _set(["conv_transpose2d", "attrs", "stride"], [0, 1]),
    "huge kernel": _set(["conv_transpose2d", "attrs", "kernel_size"], [4000, 4000]),
    "negative padding": _set(["conv_transpose2d", "attrs", "padding"], [-3, 1]),
    "string stride": _set(["conv_transpose2d", "attrs", "stride"], "2"),
    "unknown op": _set(["batch_norm", "op"], "softmax"),
    "forward input": _set(["batch_norm", "inputs"], ["nowhere"]),
    "huge input": _set(["arch", "input_shape"], [2**20, 2**20]),
    "wrong output": _set(["arch", "output"], "ghost"),
    "output shape": _set(["arch", "output_shape"], [3, 33, 32]),
    "bad reshape": _set(["relu", "op"], "reshape"),
    "nan weights": lambda arch, tensors: tensors[next(k for k in tensors if k.endswith("running_var"))].fill_(
        float("nan")
    ),
    "short bn": lambda arch, tensors: tensors.update(
        {k: torch.ones(3) for k in tensors if k.startswith(_node(arch, "batch_norm")["name"] + ".")}
    ),
    "deep json": _set(["batch_norm", "attrs", "deep"], json.loads("[" * 200 + "]" * 200)),
}


def _random_number_edit(seed: int):
    """Replace one random number of the IR with a hostile value (the fuzz loop over re-signed files)."""
    rng = random.Random(seed)

    def edit(arch, tensors):
        places = []

        def walk(value):
            if not isinstance(value, (dict, list)):
                return
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    places.append((value, key))
                walk(item)

        walk(arch)
        container, key = rng.choice(places)
        container[key] = rng.choice([0, -1, 1, 2, 3, 7, 64, 4097, 2**31, 2**62, -(2**40), 0.5, 1e308])

    return edit


@pytest.mark.skipif(not FUZZ.exists(), reason="no sanitizer build (make -C runtime asan)")
def test_hostile_and_corrupted_files_fail_cleanly_under_sanitizers(zoo, tmp_path):
    """Re-signed hostile fields (the checksum passes) are each refused with an error code and message; random
    re-signed number edits, truncations and byte flips load or fail cleanly (ASan + UBSan: no bad access)."""
    source = zoo[("examples-dcgan", "w2-em")][0]
    hostile = [resigned(source, tmp_path / f"h{i}.lowbit", edit) for i, edit in enumerate(HOSTILE.values())]
    lines = _fuzz("files", *map(str, hostile)).stdout.splitlines()
    for name, line in zip(HOSTILE, lines, strict=True):
        assert line.startswith("2 ") and ("not a valid" in line or "node '" in line), (name, line)
    edited = [resigned(source, tmp_path / f"r{i}.lowbit", _random_number_edit(i)) for i in range(80)]
    assert len(_fuzz("files", *map(str, edited)).stdout.splitlines()) == len(edited)
    for case in (("examples-dcgan", "w1a1-sign"), ("cyclegan-resnet", "w2-em")):
        summary = _fuzz("random", str(zoo[case][0]), "300", "7").stdout
        counts = dict(zip(*[iter(summary.split())] * 2, strict=True))
        assert int(counts["format"]) + int(counts["checksum"]) > 250, summary


def _sparse_weight(arch):
    return next(node for node in arch["nodes"] if node.get("attrs", {}).get("weight", {}).get("sparse"))


def _tensor_edit(node_of, field: str, change):
    """An edit replacing tensor `field` of the node node_of(arch) picks by change(tensor)."""

    def edit(arch, tensors):
        key = f"{node_of(arch)['name']}.{field}"
        tensors[key] = change(tensors[key])

    return edit


def _drop_tensor(node_of, field: str):
    def edit(arch, tensors):
        del tensors[f"{node_of(arch)['name']}.{field}"]

    return edit


def _sparse_flag(value):
    def edit(arch, tensors):
        _sparse_weight(arch)["attrs"]["weight"]["sparse"] = value

    return edit


#: hostile values of the fields liblowbit reads for RPReLU and pruned weights
SPARSE_HOSTILE = {
    "mask missing": _drop_tensor(_sparse_weight, "mask"),
    "mask short": _tensor_edit(_sparse_weight, "mask", lambda t: t[:-1].clone()),
    "mask all kept": _tensor_edit(_sparse_weight, "mask", lambda t: torch.full_like(t, 255)),
    "codes short": _tensor_edit(_sparse_weight, "codes", lambda t: t[:-1].clone()),
    "codes as float": _tensor_edit(_sparse_weight, "codes", lambda t: t.to(torch.float32)),
    "sparse not bool": _sparse_flag(1),
    "mask without sparse": _sparse_flag(False),
}
RPRELU_HOSTILE = {
    "slope short": _tensor_edit(lambda arch: _node(arch, "rprelu"), "slope", lambda t: t[:-1].clone()),
    "shift_in missing": _drop_tensor(lambda arch: _node(arch, "rprelu"), "shift_in"),
    "shift_out nan": _tensor_edit(
        lambda arch: _node(arch, "rprelu"), "shift_out", lambda t: t * float("nan")
    ),
}


@pytest.mark.skipif(not FUZZ.exists(), reason="no sanitizer build (make -C runtime asan)")
def test_hostile_rprelu_and_sparse_fields_fail_cleanly_under_sanitizers(rprelu_and_sparse, tmp_path):
    """Every checked length and flag of the new fields is refused with a format error naming the node; random
    truncations and byte flips of both files load or fail cleanly (ASan + UBSan)."""
    for case, hostile in (("sparse", SPARSE_HOSTILE), ("rprelu", RPRELU_HOSTILE)):
        source = rprelu_and_sparse[case][0]
        files = [
            resigned(source, tmp_path / f"{case}{i}.lowbit", edit) for i, edit in enumerate(hostile.values())
        ]
        lines = _fuzz("files", *map(str, files)).stdout.splitlines()
        for name, line in zip(hostile, lines, strict=True):
            assert line.startswith("2 ") and "node '" in line, (name, line)
        summary = _fuzz("random", str(source), "150", "11").stdout
        counts = dict(zip(*[iter(summary.split())] * 2, strict=True))
        assert int(counts["format"]) + int(counts["checksum"]) > 100, summary


# ----- Python on the native backend -----


def test_load_runs_native_by_default_and_keeps_the_kernel_path_semantics(zoo):
    path, x_npy, expected = zoo[("unflatten-dcgan", "w1a1-sign")]
    x = torch.from_numpy(np.load(x_npy))
    model = load(path)
    assert model.runs_native and model.kernel_path == native.available_paths()[0]
    assert any(step.backend == f"native:{model.kernel_path}" for step in model.steps)
    assert _mismatch(model(x).numpy(), expected)[0] <= TOLERANCE
    assert model.set_kernel_path("torch") == "torch" and not model.runs_native
    assert torch.equal(model(x), torch.from_numpy(expected))  # bit-exact torch backend, as before
    assert model.set_kernel_path("float") == "float" and model.runs_native
    assert not load(path, kernel_path="torch").runs_native
    assert not load(path, backend="python").runs_native
    explicit = load(path, kernel_path="scalar")  # an explicit x86 path keeps the Python x86 backend
    assert not explicit.runs_native and explicit.steps[-1].backend != "native:float"
    with pytest.raises(CheckpointError, match="lies outside the file"):
        native.NativeModel(path.read_bytes()[:-10], "cut")


# ----- channels-last values between ops -----


class _LayoutMix(nn.Module):
    """Binary layers' channels-last outputs meeting every kind of consumer: instance norm, a broadcast
    multiply by a constant and a residual add with an NCHW operand (both read channels-first), a channel cat
    of two channels-last values, a nearest resize between a sign and its binary layer, a reflect-padded
    binary layer, flattens and a cat at the end (the ReLUs become signs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.body = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.norm = nn.InstanceNorm2d(16, affine=True)
        self.act2 = nn.ReLU()
        self.up = nn.Conv2d(32, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(self.act(self.bn(self.stem(x))))
        b = self.norm(a)
        mixed = a + b * self.scale
        joined = self.act2(torch.cat([b, a], 1))
        up = self.up(nn.functional.interpolate(joined, scale_factor=2, mode="nearest"))
        return torch.cat([up.flatten(1), mixed.flatten(1)], 1)


def test_channels_last_values_meet_every_kind_of_op_like_the_torch_backend(tmp_path):
    """liblowbit keeps binary layers' outputs channels-last; ops that take that layout keep it, the others
    read an NCHW copy: the kernel path agrees with the torch backend (and liblowbit's all-NCHW float path)."""
    torch.manual_seed(0)
    model = _LayoutMix()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 8, 8))
        # a shift in the instance norm: its output (of integer-valued binary sums) then never ties with a sign
        model.norm.weight.uniform_(0.5, 1.5), model.norm.bias.uniform_(-0.3, 0.3)
    packed = convert(model.eval(), SPECS["w1a1-sign"]).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graph, _ = capture(packed, x[:1])
    ops = {node.op for node in graph.nodes}
    assert {"quant_act", "instance_norm", "mul", "add", "cat", "interpolate", "reshape"} <= ops, ops
    path = write_graph(graph, tmp_path / "layout.lowbit")
    expected = PackedModel(graph, "torch")(x).numpy()
    native_model = native.NativeModel(path.read_bytes(), str(path))
    assert native_model.kernel_layers()[0] >= 2
    for kernel_path in ("float", "auto"):
        native_model.set_kernel_path(kernel_path)
        assert _mismatch(native_model.run(x.numpy()), expected)[0] <= TOLERANCE, kernel_path
