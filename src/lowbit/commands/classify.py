"""``lowbit train-classifier CONFIG``: train a CNN classifier (full precision or quantization-aware).

``lowbit classifier-study STUDY``: run the trials x seeds of a classifier study (seed 002 Tables 1,
3, 4) one after another and write ``<name>.csv``/``<name>.json`` (accuracy, loss vs the reference
trial, time and peak training memory relative to it, the multiplication-free flag),
``<name>-summary.csv`` (average and best over seeds) and ``<name>.png``, named after the study so
that studies can share one output directory (and its runs).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.commands import add_config_args, add_run_dir_args
from lowbit.commands.train import add_nproc_arg, in_process_group, launch_workers

#: an ``init_from`` value "@TRIAL" means "the model of TRIAL with the same seed" (or of TRIAL's
#: first seed when TRIAL does not run this one).
TRIAL_REF = "@"
#: a trial key (not a ClassifierConfig field) restricting the seeds that trial runs.
TRIAL_SEEDS = "seeds"


@dataclass
class ClassifierStudy:
    """A base ``ClassifierConfig`` YAML (path relative to the study file), named trials (nested
    overrides merged into the base, run in order; an optional ``seeds`` list inside a trial
    restricts it to those seeds) and seeds; ratios are against ``reference``."""

    name: str
    base: str
    trials: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0])
    reference: str = "fp"

    def __post_init__(self) -> None:
        from lowbit.errors import ConfigError

        if self.reference not in self.trials:
            raise ConfigError(f"study reference '{self.reference}' is not a trial; "
                              f"trials: {', '.join(self.trials)}")
        if not self.seeds:
            raise ConfigError("study seeds must list at least one seed, e.g. [0, 1, 2]")
        for trial in self.trials:
            if not self.trial_seeds(trial):
                raise ConfigError(f"trial '{trial}' runs none of the study seeds {self.seeds}; fix its seeds")

    def trial_seeds(self, trial: str) -> list[int]:
        """The study seeds that ``trial`` runs."""
        only = (self.trials[trial] or {}).get(TRIAL_SEEDS)
        return [seed for seed in self.seeds if only is None or seed in only]

    def seed_of(self, trial: str, seed: int) -> int:
        """The seed of ``trial``'s run that stands for ``seed`` (itself, or the trial's first seed)."""
        seeds = self.trial_seeds(trial)
        return seed if seed in seeds else seeds[0]


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


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in recursively (mappings merge, other values replace)."""
    merged = dict(base)
    for key, value in changes.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_maps else value
    return merged


def trial_config(study: ClassifierStudy, base: dict[str, Any], trial: str, seed: int, out_dir: Path):
    """The ``ClassifierConfig`` of one trial and seed (``init_from: "@fp"`` -> that trial's model)."""
    from lowbit.config import from_dict
    from lowbit.errors import ConfigError
    from lowbit.train.classifier import ClassifierConfig

    changes = {k: v for k, v in (study.trials[trial] or {}).items() if k != TRIAL_SEEDS}
    data = _merge(base, changes)
    data.update(name=f"{trial}-s{seed}", seed=seed)
    source = data.get("init_from")
    if isinstance(source, str) and source.startswith(TRIAL_REF):
        parent = source[len(TRIAL_REF):]
        if parent not in study.trials:
            raise ConfigError(f"trial '{trial}': init_from '{source}' names no trial; "
                              f"trials: {', '.join(study.trials)}")
        data["init_from"] = str(out_dir / f"{parent}-s{study.seed_of(parent, seed)}" / "model.safetensors")
    return from_dict(ClassifierConfig, data, where=f"trials.{trial}")


def _relative_rows(study: ClassifierStudy, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from lowbit.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


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


def check_same_config(run_dir: Path, cfg) -> None:
    """A finished run is reused only if it was trained with exactly this trial's config."""
    import json

    from lowbit.config import to_dict
    from lowbit.errors import ConfigError
    from lowbit.train.checkpoint import load_checkpoint

    saved = load_checkpoint(run_dir / "model.safetensors")["config"]
    if saved != json.loads(json.dumps(to_dict(cfg))):
        raise ConfigError(f"{run_dir} holds a finished run of another config; use another --out or delete it")


def run_study(study: ClassifierStudy, base: dict[str, Any], out_dir: Path, progress: bool = True
              ) -> list[dict[str, Any]]:
    """Run (or reuse) every trial x seed; write the tables and the plot; return the per-run rows."""
    import json

    from lowbit.io import atomic_write_text
    from lowbit.train.classifier import train_classifier

    rows = []
    for seed in study.seeds:
        for trial in (t for t in study.trials if seed in study.trial_seeds(t)):
            run_dir = out_dir / f"{trial}-s{seed}"
            cfg = trial_config(study, base, trial, seed, out_dir)
            finished = run_dir / "metrics.json"
            if finished.is_file():
                check_same_config(run_dir, cfg)
                metrics = json.loads(finished.read_text(encoding="utf-8"))
            else:
                resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
                metrics = train_classifier(cfg, run_dir, resume=resume, progress=progress)
            rows.append({"trial": trial, **{k: v for k, v in metrics.items() if k != "name"}})
    rows = _relative_rows(study, rows)
    summary = summarize(rows)
    _write_table(out_dir / f"{study.name}.csv", rows)
    atomic_write_text(out_dir / f"{study.name}.json", json.dumps(rows, indent=1) + "\n")
    _write_table(out_dir / f"{study.name}-summary.csv", summary)
    _plot(out_dir / f"{study.name}.png", summary, study.name)
    return rows


def run_classifier_study(args) -> int:
    """Load the study and its base config, run it, print the summary table."""
    from lowbit.config import load_config, read_yaml

    study = load_config(ClassifierStudy, args.config, args.overrides)
    base = read_yaml(Path(args.config).parent / study.base)
    out_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    rows = run_study(study, base, out_dir, progress=not args.quiet)
    for row in summarize(rows):
        print(f"{row['trial']:>14}  {row['method']:<16} avg {row['avg_top1']:6.2f}%  "
              f"best {row['best_top1']:6.2f}%  "
              f"loss vs FP {row['avg_delta_top1']:+6.2f}  time x{row['time_ratio']:.2f}  "
              f"memory x{row['memory_ratio']:.2f}  mult-free {row['multiplication_free']}")
    print(f"results: {out_dir / (study.name + '.csv')}")
    return 0
