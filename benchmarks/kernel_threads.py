"""How the bit-serial kernels split a layer across threads, measured so that machine load hardly matters.

For the kernel layers of dcgan-g-28 (batch 64, every hidden ConvTranspose2d, BatchNorm folded) it times each
layer at 1 and 2 threads, side by side in one run, with two CPU clocks: the process's CPU time (all threads:
the work plus any overhead of splitting it) and the calling thread's CPU time (its share). On an idle
machine the 2-thread latency is about max(caller share, the other thread's share), so

    speedup bound = 1-thread CPU / max(caller CPU, process CPU - caller CPU)

is what two free cores give; wall time on a shared, oversubscribed machine says little (it is printed too).

    python benchmarks/kernel_threads.py [--bits 1 4] [--act act|sign|dorefa] [--act-bits 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import ACTIVATIONS, _generator  # noqa: E402

from lowbit.export import export_packed, load  # noqa: E402
from lowbit.export.backends.x86 import build  # noqa: E402
from lowbit.export.runtime import run_steps  # noqa: E402
from lowbit.nn import QuantSpec, convert  # noqa: E402

CLOCKS = {"process": time.process_time, "caller": time.thread_time, "wall": time.perf_counter}


def layer_times(step, x: torch.Tensor, threads: int, repeats: int) -> dict[str, float]:
    """Mean ms per call of ``step`` on ``x`` with ``threads`` threads on every clock, over the same calls (a
    minimum per clock would pair the caller's luckiest call with another call's process time)."""
    torch.set_num_threads(threads)
    step.run(x)
    start = {name: clock() for name, clock in CLOCKS.items()}
    for _ in range(repeats):
        step.run(x)
    return {name: 1e3 * (clock() - start[name]) / repeats for name, clock in CLOCKS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--act", choices=ACTIVATIONS, default="act")
    parser.add_argument("--act-bits", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--path", default="auto", help="kernel path (auto: the fastest)")
    args = parser.parse_args()
    fp32 = _generator("dcgan-g-28", None)
    z = torch.randn(64, fp32.latent_dim, 1, 1, generator=torch.Generator().manual_seed(0))
    print("| model | layer | 1 thread ms (process) | 2 threads ms: process / caller / wall (means) "
          "| split overhead | speedup bound |")
    print("|" + "---|" * 6)
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        for bits in args.bits:
            act = ACTIVATIONS[args.act]
            spec = QuantSpec(weight="minmax", weight_bits=bits, act_bits=args.act_bits, **act)
            path = export_packed(convert(fp32, spec).eval(), Path(folder) / f"w{bits}.lowbit")
            packed = load(path, kernel_path=build.resolve_path(args.path))  # the Python x86 backend
            values = run_steps(packed.steps, z)
            for step in (s for s in packed.steps if s.backend.startswith("x86:") and s.backend != "x86:gemm"):
                x = values[step.inputs[0]]
                one, two = (layer_times(step, x, threads, args.repeats) for threads in (1, 2))
                other = two["process"] - two["caller"]
                bound = one["process"] / max(two["caller"], other)
                name = f"W{bits}A{args.act_bits} {packed.kernel_path}"
                print(f"| {name} | {step.node.module} | {one['process']:.3f} "
                      f"| {two['process']:.3f} / {two['caller']:.3f} / {two['wall']:.3f} "
                      f"| {two['process'] / one['process'] - 1:+.0%} | {bound:.2f}x |")


if __name__ == "__main__":
    main()
