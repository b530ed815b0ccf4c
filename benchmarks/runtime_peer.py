"""lowbit against what a user would deploy instead (issue 13): FP32 PyTorch, onnxruntime FP32 and
onnxruntime's own int8 QDQ model, side by side with lowbit's Python x86 backend and its native runtime.

Models: dcgan-g-28 at W1A1 / W4A1 (sign activations), W2A2 / W4A4 / W2A8 / W4A8 (the ``act`` quantizer,
uniform levels) and the zoo's CycleGAN ResNet (6 blocks) and pix2pix U-Net on 3 x 64 x 64 images (first and
last layer 8-bit weights, the rest W1A1, as ``inference.py --zoo``); the ResNet twice: as converted (the convs
reading the float residual stream run float math) and with ``input_act`` (a sign in front of those convs, so
every layer but the 8-bit first one runs on the kernels; its quality cost is not measured here); and issue
16's trained W1A1 recipe (``configs/dcgan-mnist-w1a1.yaml``: hidden layers W1A1, 8-bit first and last layer)
as its quant spec on the shipped pretrained ``dcgan-mnist`` generator (timing needs no training). onnxruntime
runs the FP32 generator exported by lowbit's ONNX exporter; its int8 model is
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 activations calibrated on 8
random batches) of that file, where ORT quantizes the layers. Every (batch, threads) group is timed
round-robin (best of ``--repeats``), so the ratios in one row come from the same moments of a shared machine:
one-thread groups in process CPU time (time spent preempted does not count; equal to latency on an idle
machine), two-thread groups in wall time, each timed call after a 5 ms pause (the previous contestant's
spinning thread pool goes idle) and one untimed call (its own pool is awake). Then: the plan (which backend
runs each layer), a per-layer table (batch 64, one thread, Python x86 backend) with each kernel's achieved
binary or int8 operations per second and its share of the peak measured in the same run (VPOPCNTDQ / VNNI
loops, ``csrc/int8_roofline.cpp``), and each target of issue 13, met or missed and by how much.

    python benchmarks/runtime_peer.py --repeats 10 [--zoo-batch 8] [--json F] [--baseline-lib OLD.so]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import _cpu_model, _generator, _onnx_session, _zoo_models, best_times, zoo_variants  # noqa: E402

from lowbit.config import load_config  # noqa: E402
from lowbit.export import export_packed, load  # noqa: E402
from lowbit.export.backends import native, x86  # noqa: E402
from lowbit.export.backends.x86 import build  # noqa: E402
from lowbit.export.runtime import PackedModel, run_steps  # noqa: E402
from lowbit.nn import QuantSpec, convert  # noqa: E402
from lowbit.pipeline import RunConfig  # noqa: E402
from lowbit.train.networks import load_generator  # noqa: E402

SIGN = {"act": "sign", "act_bits": 1}
DCGAN_SPECS = {
    "W1A1": QuantSpec(weight="minmax", weight_bits=1, **SIGN),
    "W4A1": QuantSpec(weight="minmax", weight_bits=4, **SIGN),
    "W2A2": QuantSpec(weight="minmax", weight_bits=2, act="act", act_bits=2),
    "W4A4": QuantSpec(weight="minmax", weight_bits=4, act="act", act_bits=4),
    "W2A8": QuantSpec(weight="minmax", weight_bits=2, act="act", act_bits=8),
    "W4A8": QuantSpec(weight="minmax", weight_bits=4, act="act", act_bits=8),
}
RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dcgan-mnist-w1a1.yaml"
RECIPE = "dcgan-mnist W1A1-recipe"
ORT, ORT_INT8, TORCH = "onnxruntime FP32", "onnxruntime int8 QDQ", "FP32 torch"
#: (label, model, batch, threads, minimum x ORT FP32 or None: printed for reference) of issue 13; the
#: 2-thread target is separate.
TARGETS = [
    ("dcgan-g-28 W1A1 batch 1", "dcgan-g-28 W1A1", 1, 1, 1.5),
    ("dcgan-g-28 W1A1 batch 64", "dcgan-g-28 W1A1", 64, 1, 5.0),
    ("dcgan-g-28 W4A1 batch 1", "dcgan-g-28 W4A1", 1, 1, 1.2),
    ("dcgan-g-28 W4A1 batch 64", "dcgan-g-28 W4A1", 64, 1, 3.0),
    ("dcgan-g-28 W2A2 batch 64", "dcgan-g-28 W2A2", 64, 1, 2.5),
    ("dcgan-g-28 W4A4 batch 64", "dcgan-g-28 W4A4", 64, 1, 1.5),
    ("dcgan-g-28 W4A8 batch 64", "dcgan-g-28 W4A8", 64, 1, 1.3),
    ("cyclegan-resnet-6 batch 1, the rest W1A1 (input_act: every hidden conv reads 1-bit input)",
     "cyclegan-resnet-6 input_act", 1, 1, 4.0),
    ("cyclegan-resnet-6 batch 1 as converted (not the target's model: six convs read the float residual "
     "stream, W1A32)", "cyclegan-resnet-6", 1, 1, None),
    ("issue 16: W1A1 recipe (8-bit first / last layer) batch 64", RECIPE, 64, 1, 3.5),
]
THREAD_GAIN_TARGET, PEAK_SHARE_TARGET = 1.7, 0.40
GAIN_MODELS = ("dcgan-g-28 W1A1", "dcgan-g-28 W4A1", "dcgan-g-28 W4A8")
ROOFLINE_ITERATIONS = 1_000_000  # a few ms per try: the best of many short tries dodges preemption


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a fixed list of inputs."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def ort_int8_session(fp32_onnx: Path, shape: tuple[int, ...], threads: int) -> tuple[Callable | None, str]:
    """onnxruntime's static int8 QDQ model of the FP32 file (None and why, where ORT cannot make one)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice, once per layer
    target = fp32_onnx.with_suffix(".int8.onnx")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, *shape, generator=generator).numpy() for _ in range(8)]
    try:
        quantize_static(
            str(fp32_onnx),
            str(target),
            _Calibration(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (ORT raises many kinds; the benchmark reports and goes on)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return (lambda x: session.run(None, {"input": x.numpy()})), ""


def recipe_model() -> tuple[nn.Module, QuantSpec]:
    """Issue 16's W1A1 recipe: the pretrained FP32 generator its config starts from and its quant spec."""
    cfg = load_config(RunConfig, RECIPE_CONFIG)
    return load_generator(cfg.pretrained), cfg.generator_quant


def lowbit_contestants(
    name: str, path: Path, threads: int, baseline: Path | None = None
) -> dict[str, Callable]:
    """The packed file on the Python x86 backend (fastest kernel path) and in the native runtime (and in
    another liblowbit build, ``baseline``, for a side-by-side A/B; not counted as a lowbit contestant)."""
    python = load(path, backend="python")
    fns = {f"{name} | lowbit x86 ({python.kernel_path})": python}
    if native.available():
        runtime = load(path, backend="native")
        runtime.native.set_threads(threads)
        fns[f"{name} | lowbit native ({runtime.kernel_path})"] = runtime
    if baseline is not None:  # the same wrapper as the native contestant, on the other build
        old = load(path, backend="native")
        old.native = native.NativeModel(path.read_bytes(), str(path), native.open_library(baseline))
        old.native.set_threads(threads)
        fns[f"{name} | baseline native ({baseline.name})"] = old
    return fns


def peer_contestants(fp32: nn.Module, example: torch.Tensor, folder: Path, threads: int) -> tuple[dict, str]:
    """FP32 torch, ORT FP32 and (where ORT quantizes it) ORT int8 QDQ of one FP32 generator."""
    fns = {TORCH: fp32, ORT: _onnx_session(fp32, example, folder, threads)}
    int8, reason = ort_int8_session(folder / "fp32.onnx", tuple(example.shape[1:]), threads)
    if int8 is not None:
        fns[ORT_INT8] = int8
    return fns, reason


#: seconds the multi-threaded groups let the previous contestant's spinning threads go idle (best_times)
SETTLE = 0.005


def time_group(fns: dict[str, Callable], x: torch.Tensor, repeats: int, threads: int) -> dict[str, float]:
    """ms per call of every contestant on x, round-robin, best of ``repeats`` (CPU time for one thread; wall
    time after a settle pause and a warm call for more)."""
    clock, settle = (time.process_time, 0.0) if threads == 1 else (time.perf_counter, SETTLE)
    with torch.inference_mode():
        best = best_times({name: partial(fn, x) for name, fn in fns.items()}, repeats, clock, settle)
    return {name: 1e3 * seconds for name, seconds in best.items()}


def _phase_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Taps a transposed conv's output pixels meet along one axis, summed over the axis (sub-pixel phases)."""
    return sum(
        sum((o % stride + padding - k * dilation) % stride == 0 for k in range(kernel)) for o in range(size)
    )


def layer_ops(node, backend: str, x: torch.Tensor, out: torch.Tensor, act_planes: int) -> tuple[int, str]:
    """(operations, unit) of one kernel layer call: int8 MACs, or binary ops = MACs x weight planes x
    activation planes."""
    weight = node.attrs["weight"]
    shape = weight["shape"]
    if node.op == "linear":
        macs = x.shape[0] * shape[0] * shape[1]
    elif node.op == "conv2d":  # every output pixel meets the whole kernel (taps in the padding included)
        macs = out.numel() * shape[1] * shape[2] * shape[3]
    else:  # the sub-pixel phases: each output pixel meets only its phase's taps
        a = node.attrs
        taps = [
            _phase_taps(out.shape[2 + d], shape[2 + d], a["stride"][d], a["padding"][d], a["dilation"][d])
            for d in (0, 1)
        ]
        macs = out.shape[0] * shape[0] * shape[1] * taps[0] * taps[1]
    planes = weight["bits"] if weight["codebook"] == "affine" else weight["levels"] - 1
    return (macs, "int8 MAC") if backend.startswith("x86-int8") else (macs * planes * act_planes, "binary op")


def activation_planes(node, producers: dict) -> int:
    """Bit planes of the activation a bit-serial layer codes (1 for two levels)."""
    coding = x86.activation_input(x86.activation_source(node, producers)[0])
    levels = getattr(coding, "levels", None)
    return 1 if levels is None else math.ceil(math.log2(len(levels)))


def layer_table(
    name: str, model: PackedModel, x: torch.Tensor, peaks: dict[str, float], repeats: int
) -> list[dict]:
    """Every kernel layer of the Python x86 plan on its own input: ms, ops, achieved rate, share of peak."""
    values = run_steps(model.steps, model._input(x))
    producers = {node.name: node for node in model.graph.nodes}
    rows = []
    for step in model.steps:
        if not step.backend.startswith("x86") or step.backend == "x86:gemm":
            continue
        inputs = [values[n] for n in step.inputs]
        with torch.inference_mode():
            seconds = best_times({"k": partial(step.run, *inputs)}, repeats, time.process_time)["k"]
        planes = 1 if step.backend.startswith("x86-int8") else activation_planes(step.node, producers)
        ops, unit = layer_ops(step.node, step.backend, inputs[0], values[step.node.name], planes)
        peak = peaks["vnni"] if unit == "int8 MAC" else peaks["popcount"]
        rate = ops / seconds
        rows.append(
            {
                "model": name,
                "layer": step.node.name,
                "op": step.node.op,
                "backend": step.backend,
                "ms": 1e3 * seconds,
                "ops": ops,
                "unit": unit,
                "rate": rate,
                "peak_share": rate / peak if peak else float("nan"),
            }
        )
    return rows


def measure_peaks(tries: int = 30) -> dict[str, float]:
    """One thread's best measured binary ops/s (VPOPCNTDQ) and int8 MAC/s (VNNI); 0 where the CPU lacks it."""
    ops = build.kernel_ops()
    return {
        kind: max(ops.peak_rate(kind, ROOFLINE_ITERATIONS) for _ in range(tries))
        for kind in ("popcount", "vnni")
    }


GAIN_CALLS = 10  # calls per timed loop of thread_gain


def thread_gain(path: Path, x: np.ndarray, repeats: int) -> float:
    """Native runtime at 1 vs 2 threads on the same file: the median over ``repeats`` rounds of (wall time of
    GAIN_CALLS back-to-back calls on 1 thread) / (the same on 2 threads), the two loops of a round run one
    after the other in alternating order. A median of paired loops, not a ratio of two best times: on a
    shared 2-core machine a best 1-thread call needs one quiet core, a best 2-thread call two at once, so
    best / best reads the host's noise as poor scaling (1.4-1.9x on the same build)."""
    models = {}
    for threads in (1, 2):
        models[threads] = native.NativeModel(path.read_bytes(), str(path))
        models[threads].set_threads(threads)
    ratios = []
    for r in range(repeats):
        loop = {}
        for threads in (1, 2) if r % 2 == 0 else (2, 1):
            models[threads].run(x)
            start = time.perf_counter()
            for _ in range(GAIN_CALLS):
                models[threads].run(x)
            loop[threads] = time.perf_counter() - start
        ratios.append(loop[1] / loop[2])
    return float(np.median(ratios))


def best_lowbit(row: dict[str, float], model: str) -> tuple[str, float]:
    """The fastest lowbit contestant of ``model`` in a timing row."""
    mine = {k: v for k, v in row.items() if k.startswith(f"{model} | lowbit")}
    key = min(mine, key=mine.get)
    return key, mine[key]


def verdict(value: float, target: float) -> str:
    return (
        "MET" if value >= target else f"MISSED by {100 * (1 - value / target):.0f}% ({value:.2f} vs {target})"
    )


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Build every model, time every group, and return the results (also printed)."""
    dcgan = _generator("dcgan-g-28", None)
    files = {
        f"dcgan-g-28 {label}": export_packed(convert(dcgan, spec).eval(), folder / f"{label}.lowbit")
        for label, spec in DCGAN_SPECS.items()
    }
    mnist, recipe_spec = recipe_model()
    recipe = {RECIPE: export_packed(convert(mnist, recipe_spec).eval(), folder / "recipe.lowbit")}
    zoo = _zoo_models()
    variants = {name: zoo_variants(name, spec) for name, (_, spec) in zoo.items()}
    zoo_files = {
        label: export_packed(
            convert(zoo[name][0], spec).eval(), folder / f"{label}.lowbit",
            example_input=torch.randn(1, 3, 64, 64),
        )
        for name in zoo
        for label, spec in variants[name].items()
    }
    results: dict = {"timings": {}, "plans": {}, "ort_int8": {}}
    for name, path in {**files, **recipe, **zoo_files}.items():
        results["plans"][name] = [
            (r["name"], r["op"], r["backend"])
            for r in load(path, backend="python").plan_table()
            if r["act_bits"] is not None
        ]
    groups = [
        ("dcgan-g-28", dcgan, torch.randn(1, 100), files, (1, 64)),
        ("dcgan-mnist", mnist, torch.randn(1, 100), recipe, (1, 64)),
    ]
    groups += [
        (name, model, torch.randn(1, 3, 64, 64), {label: zoo_files[label] for label in variants[name]},
         (1, args.zoo_batch))
        for name, (model, _) in zoo.items()
    ]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fp32, example, packed, batches in groups:
            sub = folder / f"{name}-{threads}"
            sub.mkdir()
            fns, reason = peer_contestants(fp32, example, sub, threads)
            results["ort_int8"][name] = reason or "ok"
            for model_name, path in packed.items():
                fns.update(lowbit_contestants(model_name, path, threads, args.baseline_lib))
            for batch in batches:
                x = torch.randn(batch, *example.shape[1:])
                results["timings"][f"{name}|{batch}|{threads}"] = time_group(fns, x, args.repeats, threads)
    torch.set_num_threads(1)
    z64 = torch.randn(64, 100)
    if native.available():
        results["thread_gain"] = {
            name: thread_gain(files[name], z64.numpy(), 3 * args.repeats) for name in GAIN_MODELS
        }
    results["peaks"] = measure_peaks()
    results["layers"] = [
        row
        for name, path in {**files, **recipe}.items()
        for row in layer_table(name, load(path, backend="python"), z64, results["peaks"], args.repeats)
    ]
    return results


def _group_of(model: str) -> str:
    """The timing group of a contestant model: "dcgan-g-28 W1A1" -> "dcgan-g-28", "X input_act" -> "X"."""
    return model.split(" ")[0]


def print_report(results: dict, args: argparse.Namespace) -> None:
    print(
        f"# runtime_peer on {_cpu_model()}, torch {torch.__version__}, best of {args.repeats}, round-robin "
        "per group, 1 thread: process CPU time, 2 threads: wall time after a settle pause and a warm call; "
        "x = onnxruntime FP32 time / this time"
    )
    for key, row in results["timings"].items():
        group, batch, threads = key.split("|")
        ort = row[ORT]
        print(
            f"\n## {group}, batch {batch}, {threads} thread(s)\n"
            "| contestant | ms | x ORT FP32 | x FP32 torch |\n|---|---|---|---|"
        )
        for name, ms in row.items():
            print(f"| {name} | {ms:.3f} | {ort / ms:.2f} | {row[TORCH] / ms:.2f} |")
    print("\n## ORT int8 QDQ: " + "; ".join(f"{k}: {v}" for k, v in results["ort_int8"].items()))
    print("\n## Plan (weight layers: which backend runs each)")
    for name, plan in results["plans"].items():
        print(f"- {name}: " + ", ".join(f"{layer} {op} -> {backend}" for layer, op, backend in plan))
    peaks = results["peaks"]
    print(
        f"\n## Roofline (one thread): popcount peak {peaks['popcount'] / 1e9:.1f} G binary ops/s, "
        f"VNNI peak {peaks['vnni'] / 1e9:.1f} G int8 MAC/s"
    )
    print(
        "| model | layer | op | backend | ms (b64) | ops | achieved G/s | % of peak |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in results["layers"]:
        print(
            f"| {r['model']} | {r['layer']} | {r['op']} | {r['backend']} | {r['ms']:.3f} | "
            f"{r['ops']:.3g} {r['unit']} | "
            f"{r['rate'] / 1e9:.1f} | {100 * r['peak_share']:.1f}% |"
        )
    print("\n## Targets of issue 13 (best lowbit contestant of each model)")
    for label, model, batch, threads, target in TARGETS:
        row = results["timings"][f"{_group_of(model)}|{batch}|{threads}"]
        key, ms = best_lowbit(row, model)
        judged = f" >= {target}x ORT FP32" if target else ", for reference"
        print(
            f"- {label}{judged}: {row[ORT] / ms:.2f}x ({key.split(' | ')[1]})"
            + (f" -> {verdict(row[ORT] / ms, target)}" if target else "")
        )
    for model, gain in results.get("thread_gain", {}).items():
        print(
            f"- {model} batch 64, native 2 threads >= {THREAD_GAIN_TARGET}x 1 thread (median of paired "
            f"loops): {gain:.2f}x -> {verdict(gain, THREAD_GAIN_TARGET)}"
        )
    binary = [r for r in results["layers"] if r["model"] == "dcgan-g-28 W1A1" and r["unit"] == "binary op"]
    hot = max(binary, key=lambda r: r["ms"])
    print(
        f"- hot binary kernel (W1A1 {hot['layer']}) >= {PEAK_SHARE_TARGET:.0%} of popcount peak: "
        f"{hot['peak_share']:.1%} -> {verdict(hot['peak_share'], PEAK_SHARE_TARGET)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--zoo-batch", type=int, default=8, help="the zoo generators' large batch (64 takes minutes)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline-lib", type=Path, default=None, help="another liblowbit.so to time too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    print_report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
