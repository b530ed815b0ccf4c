"""``lowbit export CONFIG`` (packed / ONNX file from a GAN checkpoint) and ``lowbit generate MODEL``."""

from __future__ import annotations

import argparse

from lowbit.commands import add_config_args


def register(sub) -> None:
    """Add ``lowbit export`` and ``lowbit generate`` to the root parser."""
    export = sub.add_parser(
        "export",
        help="write a bit-packed (or ONNX) generator from a GAN checkpoint; `export info FILE` shows a plan",
        description="Export the generator of a GAN checkpoint as a bit-packed low-bit file (format: packed) "
        "or ONNX, QDQ where the bits allow (format: onnx), then check it against the simulated quantized "
        "model. Config keys: checkpoint, output, format, quant, opset, verify_samples, seed "
        "(docs/export.md). "
        "`lowbit export info FILE [--kernel-path P]` prints the plan of a packed file per node (op, "
        "weight / activation bits, backend, bytes) and the totals.",
    )
    add_config_args(export)
    export.add_argument("file", nargs="?", help="with CONFIG = info: the packed file to describe")
    export.add_argument("--kernel-path", default=None, help="with info: plan for this kernel path")
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
        "--input",
        default=None,
        help="image-to-image models: a PNG image or an .npz of N x C x H x W images in [-1, 1] to translate",
    )
    generate.add_argument(
        "--kernel-path",
        default=None,
        help="binary-layer kernels for packed models: auto, avx512, avx2, scalar, torch",
    )
    generate.set_defaults(func=run_generate_command)


def run_export_command(args: argparse.Namespace) -> int:
    """Load the config, export, and print size, compression and parity (or, for ``info``, the plan)."""
    from lowbit.config import load_config
    from lowbit.errors import ConfigError
    from lowbit.export.job import ExportConfig, run_export

    if args.config == "info":
        if not args.file:
            raise ConfigError("usage: lowbit export info FILE (a packed file written by `lowbit export`)")
        return print_plan(args.file, args.kernel_path)
    if args.file:
        raise ConfigError(
            f"unexpected argument '{args.file}'; did you mean `lowbit export info {args.file}`?"
        )

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


def print_plan(path: str, kernel_path: str | None) -> int:
    """Print the per-node plan of a packed file and its totals."""
    import os

    from lowbit.export.api import load

    model = load(path, kernel_path=kernel_path)
    rows = model.plan_table()
    header = f"{'node':<28} {'op':<17} {'module':<28} {'W':>3} {'A':>3} {'backend':<11} {'bytes':>10}"
    print(
        f"{path}: input N x {' x '.join(map(str, model.input_shape))}, output N x "
        f"{' x '.join(map(str, model.output_shape)) or '1'}, kernel path {model.kernel_path}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        bits = ["" if row[key] is None else str(row[key]) for key in ("weight_bits", "act_bits")]
        print(
            f"{row['name'][:28]:<28} {row['op']:<17} {row['module'][:28]:<28} {bits[0]:>3} {bits[1]:>3} "
            f"{row['backend']:<11} {row['bytes']:>10,}"
        )
    on_kernels = sum(row["backend"] not in ("torch", "native:float") for row in rows)
    print(
        f"total: {len(rows)} nodes, {on_kernels} on the kernels, "
        f"{sum(r['bytes'] for r in rows):,} tensor bytes, "
        f"file {os.path.getsize(path):,} bytes"
    )
    return 0


def _input_images(path: str, shape: list[int]):
    """Images for an image-to-image model: an .npz (first array, N x C x H x W in [-1, 1]) or a PNG."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from lowbit.errors import ConfigError

    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"--input {path}: no such file; give a PNG image or an .npz of images")
    try:
        if source.suffix == ".npz":
            with np.load(source, allow_pickle=False) as data:
                array = np.asarray(data[data.files[0]], dtype=np.float32)
        else:
            mode = "L" if shape[0] == 1 else "RGB"
            pixels = np.asarray(Image.open(source).convert(mode), dtype=np.float32) / 127.5 - 1
            array = pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None]
    except (OSError, ValueError, IndexError, UnidentifiedImageError) as exc:
        raise ConfigError(
            f"--input {path} cannot be read ({exc}); give a PNG image or an .npz of images"
        ) from None
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or list(array.shape[1:]) != list(shape):
        raise ConfigError(
            f"--input {path} holds images of shape {list(array.shape)}, but the model takes "
            f"N x {' x '.join(map(str, shape))}; resize or convert them first"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def run_generate_command(args: argparse.Namespace) -> int:
    """Sample ``-n`` images (or translate ``--input`` images) and write the grid."""
    from lowbit.data.grid import save_image_grid
    from lowbit.errors import ConfigError
    from lowbit.export.api import load, run_images, sample
    from lowbit.export.format import is_packed
    from lowbit.limits import check_count

    check_count("-n", args.n, "grid_samples")
    if args.nrow < 1:
        raise ConfigError(f"--nrow must be >= 1 (images per grid row), got {args.nrow}")
    if is_packed(args.model) or args.model.endswith(".lowbit"):
        model = load(args.model, kernel_path=args.kernel_path)
    else:
        from lowbit.train.networks import load_generator

        model = load_generator(args.model)
    if args.input is not None:
        images = run_images(model, _input_images(args.input, list(getattr(model, "input_shape", []))))
        what = f"translated {images.shape[0]} images"
    else:
        images = sample(model, args.n, seed=args.seed)
        what = f"wrote {args.n} samples"
    path = save_image_grid(images, args.output, nrow=args.nrow)
    print(f"{what} to {path}")
    return 0
