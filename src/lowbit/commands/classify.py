"""``lowbit train-classifier CONFIG``: train a CNN classifier (full precision or quantization-aware).

``lowbit classifier-study STUDY``: run the named trials x seeds of a classifier study (seed 002 Tables 1,
3, 4) through ``lowbit.studies`` (trial kind ``classifier``; ``lowbit study`` runs the same config) and
write ``<name>.csv``/``<name>.json`` (accuracy, loss vs the reference trial, time and peak training
memory relative to it, the multiplication-free flag), ``<name>-summary.csv`` (average and best over
seeds) and ``<name>.png``, named after the study so that studies can share one output directory (and
its runs, ``trials/<trial>-s<seed>/``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.commands import add_config_args, add_run_dir_args
from lowbit.commands.train import add_nproc_arg, in_process_group, launch_workers

if TYPE_CHECKING:
    from lowbit.studies import StudyConfig


def register(sub) -> None:
    """Add ``lowbit train-classifier`` and ``lowbit classifier-study`` to the root parser."""
    parser = sub.add_parser(
        "train-classifier",
        help="train a CNN classifier (FP or quantization-aware) or a domain feature extractor",
        description="Train the classifier of a config (SGD/Adam, step decay, optional QuantSpec); writes "
        "checkpoints, model.safetensors, metrics.json and log.csv under --out.",
    )
    add_config_args(parser)
    add_run_dir_args(parser)
    add_nproc_arg(parser)
    parser.set_defaults(func=run_train_classifier)

    study = sub.add_parser(
        "classifier-study",
        help="run a classifier quantization study (methods, randomness mu, RDHS vs SGT)",
        description="Run every trial x seed of a classifier study config; finished runs are reused, so a "
        "killed study continues where it stopped. Writes NAME.csv/json, NAME-summary.csv, NAME.png.",
    )
    add_config_args(study)
    study.add_argument("--out", default=None, help="output directory (default: runs/<study file stem>)")
    study.add_argument("--quiet", action="store_true", help="no progress bars")
    study.set_defaults(func=run_classifier_study)


def run_train_classifier(args) -> int:
    """Validate the config, train, print the final accuracy."""
    from lowbit.config import load_config
    from lowbit.train.classifier import ClassifierConfig, train_classifier

    cfg = load_config(ClassifierConfig, args.config, args.overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    sets = [part for item in args.overrides for part in ("--set", item)]
    command = shlex.join(["lowbit", "train-classifier", args.config, *sets])
    code = launch_workers(args, out_dir, "train-classifier")
    if code is not None:
        return code
    metrics, main = in_process_group(lambda: train_classifier(
        cfg, out_dir, resume=args.resume, overwrite=args.force, progress=not args.quiet, command=command))
    if main:
        print(f"{cfg.name}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
              f"multiplication-free {metrics['multiplication_free']}; model: {out_dir / 'model.safetensors'}")
    return 0


def _relative_rows(study: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add accuracy loss and time / memory ratios against the reference trial's run of the same
    seed (or its first seed)."""
    refs = {row["seed"]: row for row in rows if row["trial"] == study.reference}
    for row in rows:
        ref = refs[study.seed_of(study.reference, row["seed"])]
        row["delta_top1"] = ref["top1"] - row["top1"]
        row["time_ratio"] = row["seconds_per_epoch"] / ref["seconds_per_epoch"]
        row["memory_ratio"] = row["peak_train_bytes"] / ref["peak_train_bytes"]
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trial: average and best top-1 over seeds, mean accuracy loss and cost ratios."""
    summary = []
    for trial in dict.fromkeys(row["trial"] for row in rows):
        mine = [row for row in rows if row["trial"] == trial]

        def mean(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return sum(row[key] for row in rows) / len(rows)

        summary.append({"trial": trial, "method": mine[0]["method"], "seeds": len(mine),
                        "avg_top1": mean("top1"), "best_top1": max(row["top1"] for row in mine),
                        "avg_top5": mean("top5"), "avg_delta_top1": mean("delta_top1"),
                        "avg_test_loss": mean("test_loss"), "time_ratio": mean("time_ratio"),
                        "memory_ratio": mean("memory_ratio"),
                        "multiplication_free": mine[0]["multiplication_free"]})
    return summary


def _plot(path: Path, summary: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.io import atomic_path

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(summary)), 3.5))
    names = [row["trial"] for row in summary]
    ax.bar(names, [row["avg_top1"] for row in summary], color="tab:blue", label="average")
    ax.scatter(names, [row["best_top1"] for row in summary], color="tab:red", zorder=3, label="best")
    low = min(row["avg_top1"] for row in summary)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_study_tables(study: StudyConfig, records: list[dict[str, Any]], out_dir: Path
                       ) -> list[dict[str, Any]]:
    """The per-run rows of a finished classifier study, with ratios against its reference trial, written
    as NAME.csv / NAME.json, NAME-summary.csv and NAME.png; returns the rows."""
    import json

    from lowbit.errors import DataError
    from lowbit.io import atomic_write_csv, atomic_write_text
    from lowbit.studies.named import rows_by_trial

    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        raise DataError("classifier study trials failed: " + "; ".join(
            f"{r['id']}: {r.get('error')}" for r in failed) + f" (see {out_dir}/trials/<id>/worker.log)")
    rows = _relative_rows(study, rows_by_trial(records))
    summary = summarize(rows)
    atomic_write_csv(out_dir / f"{study.name}.csv", rows, list(rows[0]))
    atomic_write_text(out_dir / f"{study.name}.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_csv(out_dir / f"{study.name}-summary.csv", summary, list(summary[0]))
    _plot(out_dir / f"{study.name}.png", summary, study.name)
    return rows


def run_classifier_study(args) -> int:
    """Load the study, run it with ``lowbit.studies`` (one trial at a time), print the summary table."""
    from lowbit.studies import load_study, run_study

    study = load_study(args.config, ["trial=classifier", *args.overrides])
    out_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    records = run_study(study, results_dir=out_dir, workers=1, progress=not args.quiet)
    rows = write_study_tables(study, records, out_dir)
    for row in summarize(rows):
        print(f"{row['trial']:>14}  {row['method']:<16} avg {row['avg_top1']:6.2f}%  "
              f"best {row['best_top1']:6.2f}%  "
              f"loss vs FP {row['avg_delta_top1']:+6.2f}  time x{row['time_ratio']:.2f}  "
              f"memory x{row['memory_ratio']:.2f}  mult-free {row['multiplication_free']}")
    print(f"results: {out_dir / (study.name + '.csv')}")
    return 0
