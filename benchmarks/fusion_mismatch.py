"""How often folding a BatchNorm into the packing thresholds changes an activation code, on dcgan-g-28.

For each recipe it runs the generator on the torch backend (BatchNorm and quantizer in float32, as the
simulated model), recodes every BatchNorm-fed activation from the BatchNorm's input with the folded
per-channel thresholds (``lowbit.export.backends.x86.binary.fold_batch_norm``), and counts the codes that
differ; then it compares the fused and unfused kernel plans' outputs.

    python benchmarks/fusion_mismatch.py [--width 64] [--samples 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gan_zoo import trained_like_dcgan  # noqa: E402
from lowbit.export.backends import x86  # noqa: E402
from lowbit.export.ir import capture  # noqa: E402
from lowbit.export.runtime import plan_graph, run_steps  # noqa: E402
from lowbit.nn import QuantSpec, convert  # noqa: E402

#: recipe -> (weight bits, activation method, activation bits)
RECIPES = {
    "W1A1": (1, "sign", 1),
    "W4A1 act": (4, "act", 1),
    "W2A2": (2, "dorefa", 2),
    "W4A4": (4, "dorefa", 4),
}


def code_mismatches(graph, values) -> tuple[int, int]:
    """(differing, total) activation codes: folded thresholds on the BatchNorm input vs the float32 graph."""
    producers = {node.name: node for node in graph.nodes}
    differing = total = 0
    for node in graph.nodes:
        norm = producers.get(node.inputs[0]) if node.op == "quant_act" else None
        if norm is None or norm.op != "batch_norm":
            continue
        coding = x86._fold(node, norm)
        folded = coding.levels[coding.codes(values[norm.inputs[0]])]
        differing += int((folded != values[node.name]).sum())
        total += folded.numel()
    return differing, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    paths = x86.available()
    print("| recipe | codes differing (folded vs float32 BN) | fused vs unfused outputs: max abs diff |")
    print("|---|---|---|")
    for name, (bits, act, act_bits) in RECIPES.items():
        spec = QuantSpec(weight="minmax", weight_bits=bits, act=act, act_bits=act_bits)
        model = convert(trained_like_dcgan(width=args.width), spec).eval()
        z = torch.randn(args.samples, 100, 1, 1, generator=torch.Generator().manual_seed(0))
        graph, _ = capture(model, z[:1])
        differing, total = code_mismatches(graph, run_steps(plan_graph(graph, "torch"), z))
        outputs = "no kernel path here"
        if paths:
            fused = run_steps(plan_graph(graph, paths[0]), z)[graph.output]
            unfused = run_steps(plan_graph(graph, paths[0], fuse_norm=False), z)[graph.output]
            outputs = f"{float((fused - unfused).abs().max()):.2e} ({paths[0]})"
        print(f"| {name} | {differing:,} / {total:,} = {differing / total:.1e} | {outputs} |")


if __name__ == "__main__":
    main()
