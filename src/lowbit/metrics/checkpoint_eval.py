"""Everything ``lowbit eval`` reports for one GAN checkpoint: scores, compression, weight analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowbit.metrics.compression import compression_report
from lowbit.metrics.evaluation import evaluate
from lowbit.metrics.extractors import module_device, resolve_extractor
from lowbit.metrics.scores import KID_SUBSETS
from lowbit.metrics.weights import plot_weight_histograms, weight_stats


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    n: int = 10_000,
    batch: int = 250,
    seed: int = 0,
    split: str | None = None,
    kid_subsets: int = KID_SUBSETS,
    inception_weights: str | Path | None = None,
    histogram_png: str | Path | None = None,
    grid_png: str | Path | None = None,
) -> dict[str, Any]:
    """Scores, compression metrics and weight statistics of a GAN checkpoint's generator.

    ``dataset`` defaults to the one the checkpoint was trained on (``split``: train for noise GANs,
    test for image-to-image GANs, whose scores add PSNR / SSIM); ``histogram_png`` (if given and the
    generator has quantized layers) receives the FP-vs-quantized weight histograms; ``grid_png`` (an
    image-to-image checkpoint only) receives the input | FP | quantized | target grid, FP being the
    checkpoint it was fine-tuned from.
    """
    from lowbit.data.paired import PAIRED_DATASETS, target_domain
    from lowbit.train.networks import checkpoint_config, load_generator

    generator = load_generator(path)
    cfg = checkpoint_config(path)
    dataset = dataset or cfg.data.dataset
    split = split or ("test" if dataset in PAIRED_DATASETS else "train")
    extractor = resolve_extractor(target_domain(dataset) or dataset, inception_weights=inception_weights)
    options = {"n": n, "batch": batch, "seed": seed, "split": split, "kid_subsets": kid_subsets}
    scores = evaluate(generator, dataset, extractor=extractor, **options)
    shape = getattr(generator, "input_shape", None) or (generator.latent_dim,)
    example = torch.randn(1, *shape, device=module_device(generator))
    grid = _comparison(generator, cfg, dataset, grid_png) if grid_png and "psnr" in scores else None
    plot = (
        plot_weight_histograms(generator, histogram_png, title=f"{Path(path).name}: weights")
        if histogram_png is not None
        else None
    )
    return {
        "checkpoint": str(path),
        "dataset": dataset,
        "split": split,
        "seed": seed,
        "scores": scores,
        "extractor_card": extractor.card,
        "compression": compression_report(generator, example).to_dict(),
        "weights": weight_stats(generator),
        "histogram_png": None if plot is None else str(plot),
        "grid_png": None if grid is None else str(grid),
    }


def _comparison(generator: torch.nn.Module, cfg: Any, dataset: str, path: str | Path) -> Path:
    """input | FP (the ``init_from`` checkpoint, when there is one) | this generator | target (16 pairs)."""
    from lowbit.data import load_pairs
    from lowbit.train.i2i import comparison_grid
    from lowbit.train.networks import load_generator

    inputs, targets = load_pairs(dataset, "test", cfg.data.root, limit=16)
    models = ([load_generator(cfg.init_from)] if cfg.init_from else []) + [generator]
    return comparison_grid(models, inputs, targets, Path(path))


def format_report(result: dict[str, Any]) -> str:
    """Plain-text tables of an ``evaluate_checkpoint`` result (scores, then per-layer costs)."""
    s = result["scores"]
    lines = [
        f"{result['checkpoint']}  vs {result['dataset']}/{result['split']}  extractor {s['extractor']}",
        *([f"  PSNR {s['psnr']:.3f} dB ± {s['psnr_std']:.3f}   SSIM {s['ssim']:.4f} ± {s['ssim_std']:.4f}"]
          if "psnr" in s else []),
        f"  FID {s['fid']:.3f}   IS {s['is']:.3f} ± {s['is_std']:.3f}"
        f"   KID {s['kid']:.5g} ± {s['kid_std']:.3g}   (n={s['n']} generated, {s['n_real']} real)",
        "",
    ]
    comp = result["compression"]
    width = max([14] + [len(row["name"]) + 2 for row in comp["layers"]])  # nested names (U-Net) are long
    header = (
        f"  {'layer':<{width}}{'kind':<18}{'params':>10}{'FLOPs':>14}{'W':>4}{'A':>4}{'BOPs':>18}"
        f"{'bytes':>12}"
    )
    lines += [header, "  " + "-" * (len(header) - 2)]
    for row in comp["layers"]:
        lines.append(
            f"  {row['name']:<{width}}{row['kind']:<18}{row['params']:>10,}{row['flops']:>14,}"
            f"{row['weight_bits']:>4}{row['act_bits']:>4}{row['bops']:>18,}{row['size_bytes']:>12,}"
        )
    lines.append(
        f"  {'total':<{width + 18}}{comp['params']:>10,}{comp['flops']:>14,}{'':>8}{comp['bops']:>18,}"
        f"{comp['size_bytes']:>12,}"
    )
    lines.append(
        f"  size {comp['size_bytes']:,} B (FP32 {comp['fp32_bytes']:,} B, BN/other {comp['other_bytes']:,} B)"
        f"  compression ratio {comp['compression_ratio']:.2f}x   FLOPs/BOPs per sample"
    )
    for row in result["weights"]:
        lines.append(
            f"  {row['layer']:<{width}}{row['method']} {row['bits']}-bit: utilisation "
            f"{row['utilisation']:.3f}, code entropy {row['entropy_bits']:.3f} bits"
        )
    return "\n".join(lines)
