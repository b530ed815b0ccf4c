"""The native runtime (liblowbit, what lowbit-run runs) against onnxruntime FP32 and FP32 PyTorch, one thread.

The default dcgan-g-28 generator at W1A1 (1-bit minmax weights, sign activations): batch-1 latency and
batch-64 time of liblowbit through ctypes (the library lowbit-run calls; the "auto" kernel path and the
float reference path), onnxruntime FP32 (the FP32 model exported with lowbit's ONNX exporter, one intra-op
thread) and FP32 PyTorch (one thread), timed round-robin, best of ``--repeats`` (wall clock). Start-up is
the wall time of ``lowbit-run FILE -n 1 -o x.npy`` (process start, load, checks, first sample), best of 5.

    python benchmarks/native_runtime.py --repeats 30 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import _generator, _onnx_session, best_times  # noqa: E402

from lowbit.export import export_packed  # noqa: E402
from lowbit.export.backends import native  # noqa: E402
from lowbit.nn import QuantSpec, convert  # noqa: E402

CLI = Path(__file__).resolve().parents[1] / "runtime" / "build" / "lowbit-run"


def startup_ms(path: Path, folder: Path, tries: int = 5) -> float:
    """Best wall time of one lowbit-run process that loads the file and writes one sample."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([str(CLI), str(path), "-n", "1", "-o", str(folder / "x.npy")], check=True)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not native.available() or not CLI.exists():
        sys.exit("error: the native runtime is not built; run `make runtime`")
    torch.set_num_threads(1)
    fp32 = _generator("dcgan-g-28", None)
    spec = QuantSpec(weight="minmax", weight_bits=1, act="sign", act_bits=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = export_packed(convert(fp32, spec).eval(), folder / "w1a1.lowbit")
        onnx = _onnx_session(fp32, torch.randn(1, fp32.latent_dim), folder, threads=1)
        models = {}
        for kernel_path in ("auto", "float"):
            models[kernel_path] = native.NativeModel(path.read_bytes(), str(path))
            models[kernel_path].set_kernel_path(kernel_path)
        chosen = models["auto"].set_kernel_path("auto")
        for batch in (1, 64):
            z = torch.randn(batch, fp32.latent_dim)
            fns = {
                "FP32 torch": partial(fp32, z),
                "onnxruntime FP32": partial(onnx, z),
                f"lowbit-run W1A1 ({chosen})": partial(models["auto"].run, z.numpy()),
                "lowbit-run W1A1 (float reference)": partial(models["float"].run, np.asarray(z)),
            }
            with torch.no_grad():
                best = best_times(fns, args.repeats, time.perf_counter)
            results[f"batch {batch}"] = {name: 1e3 * seconds for name, seconds in best.items()}
        results["start-up ms (lowbit-run -n 1)"] = startup_ms(path, folder)
        results["packed file bytes"] = path.stat().st_size
    ort = {key: value["onnxruntime FP32"] for key, value in results.items() if isinstance(value, dict)}
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value:,}")
            continue
        print(f"\n{key} (ms, best of {args.repeats}; x = onnxruntime time / this time)")
        for name, ms in value.items():
            print(f"  {name:36s} {ms:9.3f}   x{ort[key] / ms:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
