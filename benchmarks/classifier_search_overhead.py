"""Training cost of weight search, RDHS vs SGT, relative to full precision (seed 002 Table 4 shape).

One ResNet-20 training step (32x32 single-channel inputs, SGD with momentum, cross-entropy) for the
FP net and for 1/2/3-bit search over the ``binary`` / ``pow2-2`` / ``pow2-3`` value spaces in RDHS
and SGT mode, with the paper's m logits per weight and with centered logits (m - 1, the same
trajectory under SGD), first conv and last FC in full precision (the classifier trainer's rule). The
variants are stepped in turn, round by round, so that load changes hit them alike; the median step
time is reported, both the wall time and the CPU time of the stepping thread (``time.thread_time``,
run with one torch thread; other jobs on a shared machine disturb it far less). Memory is the one
the classifier trainer records as ``peak_train_bytes``: the tensors autograd saves for backward
(distinct storages) + trainable parameters + their gradients + optimizer state. Not a test; run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_search_overhead.py --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models import create_model
from lowbit.nn import QuantSpec, convert
from lowbit.train.classifier import (
    OptimSpec,
    SavedTensorMeter,
    classifier_spec,
    make_optimizer,
    parameter_bytes,
)

VALUE_SPACES = {1: "binary", 2: "pow2-2", 3: "pow2-3"}


def search_spec(bits: int, mode: str, logits: str = "full") -> QuantSpec:
    """The weight-search spec of the study configs (fixed scale 1, mu 0), in either logits layout."""
    opts = {"values": VALUE_SPACES[bits], "scale": 1.0, "mode": mode, "logits": logits}
    return QuantSpec(weight="search", weight_bits=bits, weight_opts=opts)


def build_variants(bits: list[int]) -> dict[str, nn.Module]:
    """FP ResNet-20 and its RDHS / SGT conversions with full and centered logits (exact under SGD),
    all from the same initial weights."""
    base = create_model("resnet20", in_channels=1)
    variants: dict[str, nn.Module] = {"fp": base}
    for b in bits:
        for mode in ("rdhs", "sgt"):
            for logits, suffix in (("full", ""), ("centered", "-centered")):
                spec = classifier_spec(base, search_spec(b, mode, logits), True)
                variants[f"{mode}-w{b}{suffix}"] = convert(base, spec)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3], choices=sorted(VALUE_SPACES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images = torch.randn(args.batch, 1, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))
    models = build_variants(args.bits)
    optimizers = {name: make_optimizer(model.train(), OptimSpec(lr=0.01)) for name, model in models.items()}
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    memory: dict[str, int] = {}

    def step(name: str) -> None:
        model, optimizer = models[name], optimizers[name]
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        with SavedTensorMeter() as meter:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        wall[name].append(time.perf_counter() - start_wall)
        cpu[name].append(time.thread_time() - start_cpu)
        memory[name] = max(memory.get(name, 0), meter.nbytes() + parameter_bytes(model, optimizer))

    for name in models:  # warm-up (creates the optimizer state)
        step(name)
        wall[name].clear()
        cpu[name].clear()
    for _ in range(args.steps):
        for name in models:
            step(name)

    fp_wall, fp_cpu, fp_mem = statistics.median(wall["fp"]), statistics.median(cpu["fp"]), memory["fp"]
    print(f"ResNet-20, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.steps} interleaved steps")
    print("| run | step wall (s) | wall / FP | step CPU (s) | CPU / FP | training memory (MB) | "
          "memory / FP |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {w:.3f} | {w / fp_wall:.2f} | {c:.3f} | {c / fp_cpu:.2f} | "
              f"{memory[name] / 1e6:.1f} | {memory[name] / fp_mem:.2f} |")


if __name__ == "__main__":
    main()
