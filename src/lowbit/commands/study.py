"""``lowbit study CONFIG``: run every trial of a study (grid or multi-precision search)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lowbit.commands import add_config_args

#: the packed generator's latency is timed at this batch size, on one thread, best of LATENCY_REPEATS calls
LATENCY_BATCH = 64
LATENCY_REPEATS = 5
PACKED_NAME = "generator.lowbit"


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


def best_latency(model: Any, x: Any, repeats: int = LATENCY_REPEATS) -> float:
    """Seconds of the fastest of ``repeats`` calls ``model(x)`` on one torch thread (after one warm-up)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(times)


def measure_packed_generator(record: dict[str, Any], out_dir: Path) -> dict[str, float]:
    """Export a GAN trial's trained generator to the packed format, load it and time it: the file's
    bytes and its latency at batch LATENCY_BATCH (one thread, best of LATENCY_REPEATS; native when built)."""
    import torch

    from lowbit.export import export_packed, load
    from lowbit.train.networks import load_generator

    generator = load_generator(out_dir / record["artifacts"]["model"])
    path = export_packed(generator, out_dir / PACKED_NAME)
    packed = load(path)
    latents = torch.randn(LATENCY_BATCH, *packed.input_shape, generator=torch.Generator().manual_seed(0))
    return {"packed_bytes": path.stat().st_size,
            "latency_b64_ms": 1000 * best_latency(packed, latents)}


def run_study_command(args) -> int:
    """Run the study and print where its table went (failed trials are results, listed, not an error)."""
    from lowbit.studies import load_study, run_study
    from lowbit.studies.measures import register_measure

    register_measure("gan", "packed", measure_packed_generator)
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
