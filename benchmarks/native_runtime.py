"""The native runtime (liblowbit, what lowbit-run runs) against onnxruntime FP32 and FP32 PyTorch, one thread.

The default dcgan-g-28 generator at W1A1 (1-bit minmax weights, sign activations): batch-1 latency and
batch-64 time of liblowbit through ctypes (the library lowbit-run calls; the "auto" kernel path and the
float path, every layer on the FMA float code), onnxruntime FP32 (the FP32 model exported with lowbit's ONNX
exporter, one intra-op thread) and FP32 PyTorch (one thread), timed round-robin, best of ``--repeats`` (wall
clock; ``--cpu-clock``: process CPU time). Start-up is the wall time of ``lowbit-run FILE -n 1 -o x.npy``
(process start, load, checks, first sample), best of 5, with the process's CPU time (user + system, best of
5: what a loaded machine inflates least), for dcgan-g-28 and ~1 MB files (the zoo's ResNet at 64 filters,
W1A1, also with ``input_act``); for the ~1 MB files also split into load and first sample through ctypes
(this build's liblowbit).

    python benchmarks/native_runtime.py --repeats 30 [--zoo] [--json results.json] [--baseline-cli OLD]
        [--baseline-lib OLD.so]

``--baseline-cli`` also times another lowbit-run build's start-up on the same files, taking turns;
``--baseline-lib`` another liblowbit build beside this one in every liblowbit timing (round-robin).

``--zoo`` adds the zoo's CycleGAN ResNet (6 blocks) and pix2pix U-Net on 3 x 64 x 64 images (first and last
layers 8-bit weights, every hidden layer W1A1, as ``inference.py --zoo``) at batch 1 and 16; the ResNet also
with ``input_act`` (row "W1A1 input_act": a sign in front of the convs reading the float residual stream).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import _generator, _onnx_session, best_times  # noqa: E402

from lowbit.export import export_packed  # noqa: E402
from lowbit.export.backends import native  # noqa: E402
from lowbit.nn import QuantSpec, convert  # noqa: E402

CLI = Path(__file__).resolve().parents[1] / "runtime" / "build" / "lowbit-run"


def startup_ms(
    path: Path, folder: Path, clis: tuple[Path, ...] = (CLI,), tries: int = 5
) -> list[tuple[float, float]]:
    """(best wall, best CPU) ms of one lowbit-run process (each of ``clis``, taking turns) that loads the file
    and writes one sample; CPU is the process's user + system time (every thread)."""
    best = [(float("inf"), float("inf"))] * len(clis)
    for _ in range(tries):
        for k, cli in enumerate(clis):
            start = time.perf_counter()
            process = subprocess.Popen([str(cli), str(path), "-n", "1", "-o", str(folder / "x.npy")])
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - start
            if status != 0:
                raise subprocess.CalledProcessError(status, str(cli))
            cpu = usage.ru_utime + usage.ru_stime
            best[k] = (min(best[k][0], 1e3 * wall), min(best[k][1], 1e3 * cpu))
    return best


def load_split_ms(path: Path, tries: int = 5) -> dict[str, float]:
    """Best wall and process-CPU ms of liblowbit's load (``lowbit_load_memory``) and of its first batch-1 run
    (through ctypes), each a fresh model."""
    data = path.read_bytes()
    best = {
        "load wall": float("inf"),
        "load cpu": float("inf"),
        "first wall": float("inf"),
        "first cpu": float("inf"),
    }
    for _ in range(tries):
        wall, cpu = time.perf_counter(), time.process_time()
        model = native.NativeModel(data, str(path))
        loaded_wall, loaded_cpu = time.perf_counter(), time.process_time()
        model.run(torch.randn(1, *model.input_shape).numpy())
        done_wall, done_cpu = time.perf_counter(), time.process_time()
        for key, seconds in (
            ("load wall", loaded_wall - wall),
            ("load cpu", loaded_cpu - cpu),
            ("first wall", done_wall - loaded_wall),
            ("first cpu", done_cpu - loaded_cpu),
        ):
            best[key] = min(best[key], 1e3 * seconds)
    return best


def contestants(
    fp32: torch.nn.Module,
    files: dict[str, Path],
    example: torch.Tensor,
    folder: Path,
    paths: tuple[str, ...] = ("auto", "float"),
    baseline: ctypes.CDLL | None = None,
) -> dict:
    """FP32 torch, onnxruntime FP32 and liblowbit on each packed file (label -> path) for each of ``paths``
    ("auto": the fastest kernel path, "float": every layer on the float code); with a ``baseline`` liblowbit
    (``native.open_library``), that build too."""
    fns = {"FP32 torch": fp32, "onnxruntime FP32": _onnx_session(fp32, example, folder, threads=1)}
    builds = {"": None} if baseline is None else {"": None, ", baseline": baseline}
    for tag, path in files.items():
        for kernel_path in paths:
            for build, lib in builds.items():
                model = native.NativeModel(path.read_bytes(), str(path), lib)
                chosen = model.set_kernel_path(kernel_path)
                label = "float path" if kernel_path == "float" else chosen
                fns[f"lowbit-run {tag} ({label}{build})"] = lambda x, model=model: model.run(x.numpy())
    return fns


def time_batches(
    fns: dict, inputs: dict[str, torch.Tensor], repeats: int, clock=time.perf_counter
) -> dict[str, dict[str, float]]:
    """ms per call of every contestant for each named input, round-robin, best of ``repeats`` on ``clock``."""
    results = {}
    for key, x in inputs.items():
        with torch.no_grad():
            best = best_times({name: partial(fn, x) for name, fn in fns.items()}, repeats, clock)
        results[key] = {name: 1e3 * seconds for name, seconds in best.items()}
    return results


def print_table(title: str, results: dict[str, dict[str, float]], repeats: int) -> None:
    for key, row in results.items():
        ort = row["onnxruntime FP32"]
        print(f"\n{title}, {key} (ms, best of {repeats}; x = onnxruntime time / this time)")
        for name, ms in row.items():
            print(f"  {name:48s} {ms:9.3f}   x{ort / ms:.2f}")


def megabyte_resnets(folder: Path) -> dict[str, Path]:
    """The zoo's CycleGAN ResNet at 64 filters (6 blocks), W1A1, 8-bit first / last layers: ~1 MB packed;
    as is and with ``input_act`` (every layer but the 8-bit stem on the kernels, as ``inference.py``)."""
    from gan_zoo import ResnetGenerator

    torch.manual_seed(0)
    model = ResnetGenerator(ngf=64, n_blocks=6)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    w8 = {"weight": "minmax", "weight_bits": 8}
    spec = QuantSpec(
        weight="bwn", weight_bits=1, act="sign", act_bits=1, overrides={"model.1": w8, "model.23": w8}
    )
    # act null: with input_act the 8-bit first layer keeps reading the float image
    w8_float_input = {**w8, "act": None, "act_bits": 32}
    overrides = {"model.1": w8_float_input, "model.23": w8_float_input}
    example = torch.randn(1, 3, 64, 64)
    specs = {
        "ResNet-64 W1A1 (~1 MB)": spec,
        "ResNet-64 W1A1 input_act (~1 MB)": dataclasses.replace(spec, input_act=True, overrides=overrides),
    }
    return {
        name: export_packed(
            convert(model, spec).eval(), folder / f"resnet-64-{k}.lowbit", example_input=example
        )
        for k, (name, spec) in enumerate(specs.items())
    }


def print_startup(results: dict, name: str, path: Path, folder: Path, baseline: Path | None = None) -> None:
    """Start-up of lowbit-run on ``path``, recorded in ``results`` and printed with the file size; with a
    ``baseline`` lowbit-run (e.g. an older build), that one's too, taking turns with this one."""
    times = startup_ms(path, folder, (CLI,) if baseline is None else (CLI, baseline))
    size = path.stat().st_size
    (wall, cpu) = times[0]
    results[f"start-up ms (lowbit-run -n 1), {name}"] = wall
    results[f"start-up CPU ms (lowbit-run -n 1), {name}"] = cpu
    results[f"packed file bytes, {name}"] = size
    print(f"\nstart-up of {name} (lowbit-run -n 1, best of 5): {wall:.1f} ms (CPU {cpu:.1f}), {size:,} bytes")
    if baseline is not None:
        (base_wall, base_cpu) = times[1]
        results[f"start-up ms (baseline lowbit-run -n 1), {name}"] = base_wall
        results[f"start-up CPU ms (baseline lowbit-run -n 1), {name}"] = base_cpu
        print(
            f"  baseline {baseline}: {base_wall:.1f} ms (CPU {base_cpu:.1f}); this build"
            f" x{base_wall / wall:.2f} wall, x{base_cpu / cpu:.2f} CPU"
        )


def print_split(results: dict, name: str, path: Path) -> None:
    """Load and first sample of ``path`` through ctypes, recorded in ``results`` and printed."""
    split = load_split_ms(path)
    results[f"load / first sample ms (ctypes), {name}"] = split
    print(
        f"  split (ctypes, best of 5): load {split['load wall']:.1f} ms (CPU {split['load cpu']:.1f}), first "
        f"sample {split['first wall']:.1f} ms (CPU {split['first cpu']:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--zoo", action="store_true", help="also the zoo's ResNet and U-Net (3 x 64 x 64)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline-cli", type=Path, help="another lowbit-run build to time start-up against")
    parser.add_argument("--baseline-lib", type=Path, help="another liblowbit build to time runs against")
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time runs in process CPU time (one thread each; a shared machine)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_clock else time.perf_counter
    baseline = None if args.baseline_lib is None else native.open_library(args.baseline_lib)
    if not native.available() or not CLI.exists():
        sys.exit("error: the native runtime is not built; run `make runtime`")
    torch.set_num_threads(1)
    fp32 = _generator("dcgan-g-28", None)
    spec = QuantSpec(weight="minmax", weight_bits=1, act="sign", act_bits=1)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = export_packed(convert(fp32, spec).eval(), folder / "w1a1.lowbit")
        fns = contestants(fp32, {"W1A1": path}, torch.randn(1, fp32.latent_dim), folder, baseline=baseline)
        inputs = {f"batch {b}": torch.randn(b, fp32.latent_dim) for b in (1, 64)}
        results["dcgan-g-28"] = time_batches(fns, inputs, args.repeats, clock)
        print_table("dcgan-g-28 W1A1", results["dcgan-g-28"], args.repeats)
        print_startup(results, "dcgan-g-28 W1A1", path, folder, args.baseline_cli)
        for name, resnet in megabyte_resnets(folder).items():
            print_startup(results, name, resnet, folder, args.baseline_cli)
            print_split(results, name, resnet)
        if args.zoo:
            from inference import _zoo_models, zoo_variants

            for name, (model, zoo_spec) in _zoo_models().items():
                x1 = torch.randn(1, 3, 64, 64)
                zoo_files = {
                    "W1A1" + label[len(name) :]: export_packed(
                        convert(model, spec).eval(), folder / f"{label}.lowbit", example_input=x1
                    )
                    for label, spec in zoo_variants(name, zoo_spec).items()
                }
                fns = contestants(model, zoo_files, x1, folder, paths=("auto",), baseline=baseline)
                inputs = {"batch 1": x1, "batch 16": torch.randn(16, 3, 64, 64)}
                results[name] = time_batches(fns, inputs, max(3, args.repeats // 3), clock)
                print_table(
                    f"{name} (first/last layer W8, the rest W1A1)", results[name], max(3, args.repeats // 3)
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
