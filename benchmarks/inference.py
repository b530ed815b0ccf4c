"""Inference speed of packed low-bit generators vs FP32 PyTorch and onnxruntime, side by side (one run).

For W1A1, W2A1 and W4A1 generators (all layers quantized, sign activations, or with ``--act act`` the main
job's 1-bit ``act`` {0, a}; ``--act dorefa --act-bits 2`` for W2A2 / W4A4 on the bit-plane kernels; first/last
layer as the model has them) it times: the whole generator (latency
at batch 1, samples/s at batch 64) and the binary-input layers alone (the ConvTranspose2d layers fed by the
binary activations), for FP32 PyTorch and for the packed
model on every kernel path (avx512 / avx2 / scalar bit-serial kernels, and the pure-torch fallback).
Each number is the best of ``--repeats`` timed calls after warm-up, all contestants timed round-robin so
machine load hits them alike; the default clock is process CPU time (``--clock wall`` for elapsed time),
which a busy shared machine inflates far less than wall time. Ratios are FP32 time / packed time
(higher is better).

``--zoo`` times the test zoo's CycleGAN ResNet generator (6 blocks) and pix2pix U-Net (6 levels) on
3 x 64 x 64 images instead (first and last layers 8-bit weights, every hidden layer W1A1 with sign
activations): FP32 PyTorch, onnxruntime FP32 (the FP32 model exported with lowbit's ONNX exporter) and the
packed model per backend, at batch 1 and 16.

    python benchmarks/inference.py --threads 1 --repeats 30 [--act sign|act|dorefa] [--act-bits 1-4]
        [--clock cpu|wall|thread] [--json F]
    python benchmarks/inference.py --zoo --threads 1 --repeats 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lowbit.export import available_paths, export_onnx, export_packed, load
from lowbit.export.backends import x86
from lowbit.models import create_model
from lowbit.nn import QuantSpec, convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_times(
    fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float], settle: float = 0.0
) -> dict[str, float]:
    """Best (minimum) seconds per call of each function, all timed round-robin after two warm-up calls.

    Round-robin makes load changes hit every contestant alike; the minimum is the least
    load-sensitive estimate on a shared machine (timeit's advice). Every other round runs in reverse
    order, so no contestant always follows the same one: with a fixed order, an A/A run (one liblowbit
    build in two slots) timed the second slot up to 17% faster at batch 1. ``settle`` > 0 (multi-threaded
    groups): before each timed call, sleep that many seconds, so the thread pools of the contestant before
    (onnxruntime's, torch's, liblowbit's spin after a call) go idle, then make one untimed call, so the
    contestant's own pool is awake, as in a deployment that runs one model."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_ in range(repeats):
        for name, fn in order if round_ % 2 == 0 else reversed(order):
            if settle > 0:
                time.sleep(settle)
                fn()
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: min(values) for name, values in times.items()}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter, "thread": time.thread_time}


def _generator(model_name: str, width: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(model_name, **({} if width is None else {"width": width}))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.02)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _binary_layer_inputs(fp32: nn.Module, z: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(input, input of the BatchNorm two modules before) of every ConvTranspose2d that follows an activation,
    from the FP32 model's own forward: the packed layer folds that BatchNorm and reads the second."""
    inputs, seen, h = {}, [], z.reshape(z.shape[0], -1, 1, 1)
    for index, module in enumerate(fp32):
        if index > 0 and isinstance(module, nn.ConvTranspose2d):
            inputs[index] = (h, seen[index - 2] if isinstance(fp32[index - 2], nn.BatchNorm2d) else h)
        seen.append(h)
        h = module(h)
    return inputs


def _run_layers(layers: list[Callable], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer(x) for layer, x in zip(layers, inputs, strict=True)]


def _binary_steps(packed: nn.Module) -> list[Callable]:
    """The planned weight layers fed by two-level activations (kernels, or torch on the torch path)."""
    producers = {node.name: node for node in packed.graph.nodes}
    claimed = {node.name for node in packed.graph.nodes if x86.claims(node, producers)}
    return [step.run for step in packed.steps if step.node.name in claimed]


def _onnx_session(model: nn.Module, example: torch.Tensor, folder: Path, threads: int) -> Callable:
    """onnxruntime FP32 on ``model`` exported by lowbit, with ``threads`` intra-op threads."""
    import onnxruntime

    path = export_onnx(model, folder / "fp32.onnx", example_input=example)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})


#: the activations the benchmark can quantize with: sign ({-1, +1}), the main job's `act` ({0, a} at 1 bit,
#: 2^k affine levels at k bits) or DoReFa (2^k levels on [0, 1])
ACTIVATIONS = {
    "sign": {"act": "sign"},
    "act": {"act": "act", "act_opts": {"learn_range": True}},
    "dorefa": {"act": "dorefa"},
}


def bench(
    fp32: nn.Module,
    bits_list: list[int],
    repeats: int,
    folder: Path,
    clock: Callable[[], float],
    activation: str = "sign",
    act_bits: int = 1,
) -> list[dict]:
    """One row per (bit-width, kernel path): batch-1 latency, batch-64 time, binary layers at batch 64."""
    latent = fp32.latent_dim
    z1, z64 = torch.randn(1, latent), torch.randn(64, latent)
    layer_inputs = _binary_layer_inputs(fp32, z64)
    xs = [direct for direct, _ in layer_inputs.values()]
    folded_xs = [before_norm for _, before_norm in layer_inputs.values()]
    fp_layers = [fp32[i] for i in layer_inputs]
    workloads = {
        "b1": {"FP32": partial(fp32, z1)},
        "b64": {"FP32": partial(fp32, z64)},
        "binary": {"FP32": partial(_run_layers, fp_layers, xs)},
    }
    sizes = {}
    for bits in bits_list:
        spec = QuantSpec(weight="minmax", weight_bits=bits, act_bits=act_bits, **ACTIVATIONS[activation])
        path = export_packed(convert(fp32, spec).eval(), folder / f"w{bits}a{act_bits}.lowbit")
        for kernel_path in available_paths():
            packed = load(path, kernel_path=kernel_path)
            binary = _binary_steps(packed)
            key = f"W{bits}A{act_bits}|{kernel_path}"
            sizes[key] = path.stat().st_size
            workloads["b1"][key] = partial(packed, z1)
            workloads["b64"][key] = partial(packed, z64)
            folded = kernel_path != "torch"  # the kernel layers read their folded BatchNorm's input
            workloads["binary"][key] = partial(_run_layers, binary, folded_xs if folded else xs)
    best = {name: best_times(fns, repeats, clock) for name, fns in workloads.items()}
    rows = []
    for key, size in sizes.items():
        model, kernel_path = key.split("|")
        row = {"model": model, "path": kernel_path, "bytes": size}
        for name in workloads:
            row[f"fp32_ms_{name}"], row[f"packed_ms_{name}"] = 1e3 * best[name]["FP32"], 1e3 * best[name][key]
        rows.append(row)
    return rows


def _zoo_models() -> dict[str, tuple[nn.Module, QuantSpec]]:
    """The zoo's ResNet and U-Net generators at 3 x 64 x 64, calibrated, with their W1A1 specs."""
    from gan_zoo import ResnetGenerator, UnetGenerator

    models = {
        "cyclegan-resnet-6": ResnetGenerator(ngf=32, n_blocks=6),
        "pix2pix-unet-6": UnetGenerator(num_downs=6, ngf=32),
    }
    edges = {
        "cyclegan-resnet-6": ["model.1", "model.23"],
        "pix2pix-unet-6": ["model.model.0", "model.model.3"],
    }
    result = {}
    for name, model in models.items():
        torch.manual_seed(0)
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, 64, 64))
        # act null: with input_act the 8-bit first layer keeps reading the float image
        w8 = {"weight": "minmax", "weight_bits": 8, "act": None, "act_bits": 32}
        spec = QuantSpec(
            weight="bwn",
            weight_bits=1,
            act="sign",
            act_bits=1,
            overrides={layer: w8 for layer in edges[name]},
        )
        result[name] = (model.eval(), spec)
    return result


#: zoo models also measured with ``input_act`` (issue 13: convs reading a float residual stream)
INPUT_ACT_MODELS = ("cyclegan-resnet-6",)


def zoo_variants(name: str, spec: QuantSpec) -> dict[str, QuantSpec]:
    """Label -> spec of the packed files measured for a zoo model: its W1A1 spec, and for ``INPUT_ACT_MODELS``
    the same with an activation quantizer in front of every layer with a float input (``input_act``)."""
    variants = {name: spec}
    if name in INPUT_ACT_MODELS:
        variants[f"{name} input_act"] = dataclasses.replace(spec, input_act=True)
    return variants


def bench_zoo(repeats: int, folder: Path, clock: Callable[[], float], threads: int) -> list[dict]:
    """FP32 torch, onnxruntime FP32 and the packed model per path at batch 1 and 16 for each zoo model."""
    rows = []
    for name, (fp32, spec) in _zoo_models().items():
        x1, x16 = torch.randn(1, 3, 64, 64), torch.randn(16, 3, 64, 64)
        ort = _onnx_session(fp32, x1, folder, threads)
        path = export_packed(convert(fp32, spec).eval(), folder / f"{name}.lowbit", example_input=x1)
        contestants = {"FP32 torch": fp32, "ORT FP32": ort}
        contestants.update({f"packed {p}": load(path, kernel_path=p) for p in available_paths()})
        for batch, x in (("b1", x1), ("b16", x16)):
            best = best_times({key: partial(fn, x) for key, fn in contestants.items()}, repeats, clock)
            for key, seconds in best.items():
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "contestant": key,
                        "ms": 1e3 * seconds,
                        "vs_torch": best["FP32 torch"] / seconds,
                        "vs_ort": best["ORT FP32"] / seconds,
                        "bytes": path.stat().st_size if key.startswith("packed") else None,
                    }
                )
    return rows


def format_zoo_table(rows: list[dict]) -> str:
    """Markdown table of the zoo rows: time and speed-up over FP32 torch and over onnxruntime."""
    lines = ["| model | batch | contestant | ms | x FP32 torch | x ORT FP32 | file bytes |", "|" + "---|" * 7]
    for r in rows:
        size = f"{r['bytes']:,}" if r["bytes"] else ""
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['contestant']} | {r['ms']:.2f} | {r['vs_torch']:.2f} | "
            f"{r['vs_ort']:.2f} | {size} |"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Markdown table: per model and kernel path, times and FP32/packed ratios."""
    header = (
        "| model | path | file bytes | b=1 latency ms FP32 / packed (x) | b=64 samples/s FP32 / packed (x) "
        "| binary layers b=64 ms FP32 / packed (x) |"
    )
    lines = [header, "|" + "---|" * 6]
    for r in rows:
        lat = f"{r['fp32_ms_b1']:.3f} / {r['packed_ms_b1']:.3f} ({r['fp32_ms_b1'] / r['packed_ms_b1']:.2f}x)"
        fp_sps, pk_sps = 64e3 / r["fp32_ms_b64"], 64e3 / r["packed_ms_b64"]
        thr = f"{fp_sps:,.0f} / {pk_sps:,.0f} ({pk_sps / fp_sps:.2f}x)"
        binary = (
            f"{r['fp32_ms_binary']:.2f} / {r['packed_ms_binary']:.2f} "
            f"({r['fp32_ms_binary'] / r['packed_ms_binary']:.2f}x)"
        )
        lines.append(f"| {r['model']} | {r['path']} | {r['bytes']:,} | {lat} | {thr} | {binary} |")
    return "\n".join(lines)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where that is missing)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dcgan-g-28")
    parser.add_argument("--width", type=int, default=None, help="generator width (default: the model's)")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument(
        "--act", choices=ACTIVATIONS, default="sign", help="activation: sign {-1,+1}, act {0,a} or dorefa"
    )
    parser.add_argument("--act-bits", type=int, default=1, help="activation bits (2-4: bit-plane kernels)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="cpu",
        help="cpu: process CPU time (robust on a shared machine; equals latency when idle and "
        "single-threaded); wall: elapsed time; thread: the calling thread's CPU time (with --threads 2 "
        "the critical path when the other thread's share is no larger: a load-robust thread-scaling view)",
    )
    parser.add_argument(
        "--zoo", action="store_true", help="time the zoo's ResNet and U-Net generators instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.zoo:
        with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
            rows = bench_zoo(args.repeats, Path(folder), CLOCKS[args.clock], args.threads)
        print(
            f"zoo generators, 3 x 64 x 64, on {_cpu_model()}, torch {torch.__version__}, "
            f"threads {args.threads}, "
            f"{args.clock} clock, best of {args.repeats}; first/last layers W8, hidden layers W1A1 (sign)"
        )
        print(format_zoo_table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    fp32 = _generator(args.model, args.width)
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        rows = bench(fp32, args.bits, args.repeats, Path(folder), CLOCKS[args.clock], args.act, args.act_bits)
    print(
        f"{args.model} (width {args.width or 'default'}) on {_cpu_model()}, torch {torch.__version__}, "
        f"threads {args.threads}, {args.clock} clock, best of {args.repeats}, {args.act_bits}-bit {args.act} "
        "activations; "
        "ratios are FP32 / packed time"
    )
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
