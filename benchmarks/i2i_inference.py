"""Inference speed of the packed generator of a ``lowbit run`` output (image-to-image or noise) vs its FP32
model in PyTorch and in onnxruntime, at batch 1 and 16 or ``--batches`` (issue 17: the packed W4A1 U-Net at
28 x 28, batch 16, against onnxruntime FP32; issue 16: the trained W1A1 DCGAN at batch 64).

    python benchmarks/i2i_inference.py runs/sr4-fashion-w4a1 --threads 1 --repeats 30
    python benchmarks/i2i_inference.py runs/dcgan-mnist-w1a1 --batches 1 64 --pretrained dcgan-mnist

Reads the run's ``results.json`` (the pretrained FP checkpoint, unless ``--pretrained`` names it) and
``generator.lowbit.safetensors``;
timing as ``benchmarks/inference.py`` (best of ``--repeats``, round-robin, process CPU clock). "packed native"
is liblowbit (the default backend of ``lowbit.export.load``); "packed <path>" the Python x86 backend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from inference import CLOCKS, _cpu_model, _onnx_session, best_times

from lowbit.export import available_paths, load
from lowbit.nn.inputs import default_example
from lowbit.train.networks import load_generator


def bench_run(run_dir: Path, repeats: int, threads: int, clock: str, batches: list[int],
              pretrained: str | None = None) -> list[dict]:
    """Times of FP32 torch, ORT FP32 and the packed file natively and on every kernel path, per batch."""
    fp32 = load_generator(pretrained or json.loads((run_dir / "results.json").read_text())["pretrained"])
    packed = run_dir / "generator.lowbit.safetensors"
    sample = default_example(fp32)
    inputs = {f"b{n}": torch.randn(n, *sample.shape[1:], generator=torch.Generator().manual_seed(n))
              for n in batches}
    rows = []
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        contestants = {"FP32 torch": fp32, "ORT FP32": _onnx_session(fp32, sample, Path(folder), threads)}
        native = load(packed)  # liblowbit when built (the default backend), else the Python x86 backend
        if native.native is not None:
            contestants["packed native"] = native
        contestants.update({f"packed {p}": load(packed, kernel_path=p) for p in available_paths()})
        for batch, x in inputs.items():
            timed = {key: partial(fn, x) for key, fn in contestants.items()}
            best = best_times(timed, repeats, CLOCKS[clock])
            rows += [{"batch": batch, "contestant": key, "ms": 1e3 * s, "vs_torch": best["FP32 torch"] / s,
                      "vs_ort": best["ORT FP32"] / s} for key, s in best.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="output directory of `lowbit run` (with export: true)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--clock", choices=CLOCKS, default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--pretrained", help="FP checkpoint (path or shipped name) instead of results.json's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench_run(args.run_dir, args.repeats, args.threads, args.clock, args.batches, args.pretrained)
    print(f"{args.run_dir.name} on {_cpu_model()}, torch {torch.__version__}, threads {args.threads}, "
          f"{args.clock} clock, best of {args.repeats}")
    print("| batch | contestant | ms | x FP32 torch | x ORT FP32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['contestant']} | {r['ms']:.3f} | {r['vs_torch']:.2f} | "
              f"{r['vs_ort']:.2f} |")


if __name__ == "__main__":
    main()
