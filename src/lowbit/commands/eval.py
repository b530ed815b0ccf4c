"""``lowbit eval CHECKPOINT``: FID / IS / KID, compression metrics and weight analysis of a generator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    """Add ``lowbit eval`` to the root parser."""
    parser = sub.add_parser(
        "eval",
        help="score a GAN checkpoint (FID/IS/KID) and measure its size, FLOPs and BOPs",
        description="Generate --n images from the checkpoint's generator, score them against the real "
        "dataset with the dataset's shipped classifier (or Inception-v3 with --inception-weights), "
        "measure params/FLOPs/BOPs/size per layer and the quantized weights' utilisation; prints a "
        "table and writes JSON.",
    )
    parser.add_argument(
        "checkpoint", help="GAN checkpoint (.safetensors written by `lowbit train`) or shipped name"
    )
    parser.add_argument(
        "--dataset", default=None, help="real dataset to compare with (default: the training one)"
    )
    parser.add_argument(
        "--split", default=None, choices=("train", "test"),
        help="real split (default: train; test for image-to-image checkpoints)"
    )
    parser.add_argument("--n", type=int, default=10_000, help="generated and real samples (default 10000)")
    parser.add_argument("--batch", type=int, default=250, help="generation batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents, IS splits and KID subsets")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets of min(1000, n) samples")
    parser.add_argument(
        "--inception-weights",
        default=None,
        metavar="FILE",
        help="standard FID Inception-v3 weights (.pth or .safetensors): score with Inception-v3",
    )
    parser.add_argument("--out", default=None, metavar="JSON", help="write the full result here")
    parser.add_argument(
        "--histograms",
        default=None,
        metavar="PNG",
        help="weight histogram plot (default: beside --out as <out>.weights.png)",
    )
    parser.add_argument(
        "--grid",
        default=None,
        metavar="PNG",
        help="image-to-image checkpoints: input | FP | quantized | target grid (default: <out>.grid.png)",
    )
    parser.set_defaults(func=run_eval)


def _histogram_path(args: argparse.Namespace) -> Path | None:
    if args.histograms:
        return Path(args.histograms)
    return Path(args.out).with_suffix(".weights.png") if args.out else None


def _grid_path(args: argparse.Namespace) -> Path | None:
    if args.grid:
        return Path(args.grid)
    return Path(args.out).with_suffix(".grid.png") if args.out else None


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the tables, write the JSON."""
    from lowbit.io import atomic_write_text
    from lowbit.metrics.checkpoint_eval import evaluate_checkpoint, format_report

    result = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        n=args.n,
        batch=args.batch,
        seed=args.seed,
        split=args.split,
        kid_subsets=args.kid_subsets,
        inception_weights=args.inception_weights,
        histogram_png=_histogram_path(args),
        grid_png=_grid_path(args),
    )
    print(format_report(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}" + (f" and {result['histogram_png']}" if result["histogram_png"] else ""))
    return 0
