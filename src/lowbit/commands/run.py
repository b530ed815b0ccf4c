"""``lowbit run CONFIG``: the main job (pretrained FP GAN -> QAT -> FID/IS report -> packed export)."""

from __future__ import annotations

from lowbit.commands import add_config_args


def register(sub) -> None:
    """Add ``lowbit run`` to the root parser."""
    parser = sub.add_parser(
        "run",
        help="quantize a pretrained GAN end to end and write report.html",
        description="Load the pretrained full-precision GAN named in CONFIG, convert and "
        "fine-tune it quantization-aware, evaluate FP vs quantized (FID/IS/KID), write "
        "sample grids, weight histograms, compression metrics, the packed export and "
        "report.html.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--out", default=None, help="output directory (default: the config's out_dir or runs/<name>)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_main_job)


def run_main_job(args) -> int:
    """Run the pipeline and print where the report is."""
    from lowbit.config import load_config
    from lowbit.pipeline import RunConfig, run_pipeline

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    cfg = load_config(RunConfig, args.config, overrides)
    result = run_pipeline(cfg, progress=not args.quiet)
    for row in result.summary():
        print(row)
    print(f"report: {result.report.resolve()}")
    return 0
