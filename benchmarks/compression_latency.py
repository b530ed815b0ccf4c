"""Joint compression on the packed runtime: the shipped dcgan-mnist generator unpruned at W4A1 against
50% / 75% channel-pruned W4A1 (torch-pruning, L1; 50% also with the latent layer 70% sparse), the hidden
widths 32/32/32 of compress-targets-mnist's w4a1-ch32 recipe (57% of the channels), 80% unstructured
(global) + W4 and the FP32 model, packed file bytes and batch-64 latency on one thread (issue 15's target:
50% channels + W4A1 at <= 1/1.8 of the unpruned W4A1 latency; file <= 1/25 of FP32, unstructured 80% + W4
<= 1/15).

Latency and size do not depend on the fine-tune, so the models are the conversions of the FP generator
(no training). Every model is exported, loaded (liblowbit when built, else the Python kernels) and timed
round-robin, best of ``--repeats`` (wall clock), in one process, so the ratios are side by side.

    OMP_NUM_THREADS=1 python benchmarks/compression_latency.py --repeats 20 [--json out.json] \
        [--checkpoint NAME=PATH ...]

``--checkpoint NAME=PATH`` adds a trained (pruned, quantized) GAN checkpoint's generator as row NAME, e.g. a
trial of configs/studies/compress-two-stage-mnist.yaml, timed in the same round-robin.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import best_times  # noqa: E402

from lowbit.export import export_packed, load  # noqa: E402
from lowbit.nn import PruneSpec, QuantSpec, compress  # noqa: E402
from lowbit.train.networks import load_generator, resolve_checkpoint

W4A1 = QuantSpec(weight="dorefa", weight_bits=4, act="act", act_bits=1, act_opts={"learn_range": True},
                 overrides={"9": {"weight": "minmax"}})
VARIANTS = {
    "W4A1": [W4A1],
    "50% channels + W4A1": [PruneSpec(kind="channels", ratio=0.5), W4A1],
    "50% ch + 70% sparse L0 + W4A1": [PruneSpec(kind="channels", ratio=0.5),
                                      PruneSpec(ratio=0.7, layers=["0"]), W4A1],
    "32/32/32 channels + W4A1": [PruneSpec(kind="channels", ratio=0.75, layers=["0"]),
                                 PruneSpec(kind="channels", ratio=0.5, layers=["3"]), W4A1],
    "75% channels + W4A1": [PruneSpec(kind="channels", ratio=0.75), W4A1],
    "80% unstructured (global) + W4": [PruneSpec(ratio=0.8, scope="global"),
                                       QuantSpec(weight="minmax", weight_bits=4)],
}


def checkpoint_arg(entry: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--checkpoint`` as (NAME, PATH)."""
    name, sep, path = entry.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--checkpoint wants NAME=PATH, got {entry!r}")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="also time the generator of this GAN checkpoint as row NAME (may repeat)")
    args = parser.parse_args()
    trained = dict(checkpoint_arg(entry) for entry in args.checkpoint)
    torch.set_num_threads(1)
    fp32 = load_generator(resolve_checkpoint("dcgan-mnist"))
    fp32_bytes = sum(p.numel() * 4 for p in fp32.parameters())
    z = torch.randn(args.batch, fp32.latent_dim, generator=torch.Generator().manual_seed(0))
    rows, fns = {}, {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        models = {name: compress(fp32, specs) for name, specs in VARIANTS.items()}
        models.update({name: load_generator(path) for name, path in trained.items()})
        for name, model in models.items():
            path = export_packed(model.eval(), Path(folder) / f"{len(rows)}.lowbit")
            packed = load(path)
            fns[name] = lambda packed=packed: packed(z)
            rows[name] = {"bytes": path.stat().st_size, "native": packed.native is not None}
        fns["FP32 torch"] = lambda: fp32(z)
        rows["FP32 torch"] = {"bytes": fp32_bytes, "native": False}
        times = best_times(fns, args.repeats, time.perf_counter)
    base = times["W4A1"]
    print(f"dcgan-mnist generator, batch {args.batch}, 1 thread, best of {args.repeats} (wall clock)")
    print(f"{'model':<30} {'bytes':>10} {'FP32/x':>7} {'ms':>9} {'W4A1 ms / x':>12}")
    for name, row in rows.items():
        row.update(ms=1e3 * times[name], fp32_over=fp32_bytes / row["bytes"],
                   speedup_vs_w4a1=base / times[name])
        print(f"{name:<30} {row['bytes']:>10,} {row['fp32_over']:>7.1f} {row['ms']:>9.2f} "
              f"{row['speedup_vs_w4a1']:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
