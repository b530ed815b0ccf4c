"""Run a whole study from its config: a grid of trials or a multi-precision search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.config import to_dict
from lowbit.errors import ConfigError
from lowbit.studies.named import dependency_waves, expand_named
from lowbit.studies.runner import Backend, StudyRunner
from lowbit.studies.search import PrecisionSearch
from lowbit.studies.spec import StudyConfig, expand
from lowbit.studies.store import dump_json
from lowbit.train.rundir import locks_run_dir


@locks_run_dir(lambda args: args["results_dir"] or args["study"].results_dir())
def run_study(study: StudyConfig, results_dir: str | Path | None = None, workers: int | None = None,
              backend: Backend | None = None, address: str | None = None,
              progress: bool = True, allow_imports: bool = False) -> list[dict[str, Any]]:
    """Run every trial of ``study`` not yet finished; return all records (arguments override the config).
    Trials that start from another trial's model (named ``@`` references) run after it.

    ``allow_imports`` lets the study's ``trial`` be an import path (``module:function``): code the config
    names is then imported and run, so pass it only for configs you trust."""
    if isinstance(study.base, str):
        raise ConfigError(f"study '{study.name}': base '{study.base}' names a file, which only load_study "
                          "reads (relative to the study file); load the study with load_study(path)")
    results_dir = Path(results_dir or study.results_dir())
    runner = StudyRunner(results_dir, study.trial, workers=workers or study.workers,
                         backend=backend or study.backend, address=address or study.address,
                         state_metric=study.state_metric, progress=progress, desc=study.name,
                         allow_imports=allow_imports, measures=study.measures)
    kind = "search" if study.search else "named" if study.trials else "grid"
    dump_json(results_dir / "study.json", {"name": study.name, "kind": kind, "config": to_dict(study)})
    if study.search is not None:
        PrecisionSearch(study, runner).run()
        return runner.finished()
    trials = expand_named(study, results_dir) if study.trials else expand(study)
    for wave in dependency_waves(trials):
        runner.run(wave)
    return [runner.records[trial.id] for trial in trials]
