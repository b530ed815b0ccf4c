"""``lowbit export CONFIG`` (packed / ONNX file from a GAN checkpoint) and ``lowbit generate MODEL``."""

from __future__ import annotations

import argparse

from lowbit.commands import add_config_args


def register(sub) -> None:
    """Add ``lowbit export`` and ``lowbit generate`` to the root parser."""
    export = sub.add_parser(
        "export",
        help="write a bit-packed (or ONNX QDQ) generator from a GAN checkpoint",
        description="Export the generator of a GAN checkpoint as a bit-packed low-bit file (format: packed) "
        "or ONNX with QuantizeLinear/DequantizeLinear nodes (format: onnx, 4/8-bit only), then check it "
        "against the simulated quantized model. Config keys: checkpoint, output, format, quant, opset, "
        "verify_samples, seed (docs/export.md).",
    )
    add_config_args(export)
    export.set_defaults(func=run_export_command)

    generate = sub.add_parser(
        "generate",
        help="sample an image grid from a packed model or a GAN checkpoint",
        description="Draw N samples (z ~ N(0, I) with --seed) from MODEL - a packed file written by "
        "`lowbit export`, a GAN checkpoint or a shipped checkpoint name - and save them as a PNG grid.",
    )
    generate.add_argument("model", help="packed model file, GAN checkpoint or shipped checkpoint name")
    generate.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    generate.add_argument("-o", "--output", default="samples.png", help="PNG file to write")
    generate.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    generate.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    generate.add_argument(
        "--kernel-path",
        default=None,
        help="binary-layer kernels for packed models: auto, avx512, avx2, scalar, torch",
    )
    generate.set_defaults(func=run_generate_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Load the config, export, and print size, compression and parity."""
    from lowbit.config import load_config
    from lowbit.export.job import ExportConfig, run_export

    result = run_export(load_config(ExportConfig, args.config, args.overrides))
    print(
        f"wrote {result.path}: {result.nbytes:,} bytes, {result.compression:.1f}x smaller than the FP32 "
        f"safetensors ({result.fp32_nbytes:,} bytes)"
    )
    if result.max_abs_diff is not None:
        print(
            f"parity vs the simulated model: max |diff| {result.max_abs_diff:.3g}, "
            f"{100 * result.mismatch_fraction:.3f}% of pixels off by > 1e-3"
        )
    return 0


def run_generate_command(args: argparse.Namespace) -> int:
    """Sample ``-n`` images and write the grid."""
    from lowbit.data.grid import save_image_grid
    from lowbit.errors import ConfigError
    from lowbit.export.api import load, sample
    from lowbit.export.format import is_packed
    from lowbit.limits import check_count

    check_count("-n", args.n, "grid_samples")
    if args.nrow < 1:
        raise ConfigError(f"--nrow must be >= 1 (images per grid row), got {args.nrow}")
    if is_packed(args.model):
        model = load(args.model, kernel_path=args.kernel_path)
    else:
        from lowbit.train.gan import load_generator

        model = load_generator(args.model)
    images = sample(model, args.n, seed=args.seed)
    path = save_image_grid(images, args.output, nrow=args.nrow)
    print(f"wrote {args.n} samples to {path}")
    return 0
