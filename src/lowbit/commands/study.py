"""``lowbit study CONFIG``: run every trial of a study (grid or multi-precision search)."""

from __future__ import annotations

from lowbit.commands import add_config_args


def register(sub) -> None:
    """Add ``lowbit study`` to the root parser."""
    parser = sub.add_parser(
        "study", help="run a study (sensitivity grid, method comparison, precision search)",
        description="Expand a study config into trials and run them on a local process pool or Ray; "
        "results stream into RESULTS_DIR/results.csv and results.json, and a re-run skips finished trials.")
    add_config_args(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="trials run at once (default: the config's)")
    parser.add_argument("--backend", choices=("pool", "ray"), default=None,
                        help="local process pool (default) or Ray")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: start a local runtime)")
    parser.add_argument("--out", default=None, help="results directory (default: the config's out_dir, "
                        "else results/<name>)")
    parser.add_argument("--report", action="store_true", help="write the HTML report when the study ends")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-import-trials", action="store_true",
                        help="let the config's 'trial' be an import path module:function (runs that code; "
                        "only for configs you trust); default: registered trials (gan, classifier) only")
    parser.set_defaults(func=run_study_command)


def run_study_command(args) -> int:
    """Run the study and print where its table went (failed trials are results, listed, not an error)."""
    from lowbit.studies import load_study, run_study

    study = load_study(args.config, args.overrides)
    records = run_study(study, results_dir=args.out, workers=args.workers, backend=args.backend,
                        address=args.address, progress=not args.quiet,
                        allow_imports=args.allow_import_trials)
    results_dir = args.out or study.results_dir()
    failed = [r for r in records if r["status"] != "ok"]
    print(f"{study.name}: {len(records) - len(failed)} trials ok, {len(failed)} failed; "
          f"table: {results_dir}/results.csv")
    for record in failed:
        print(f"  failed {record['name']}: {record.get('error')}")
    if args.report:
        from lowbit.report.studies import build_report

        print(f"report: {build_report(results_dir)[0]}")
    return 0
