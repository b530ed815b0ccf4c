"""Running one trial inside a worker: resolve the trial function, call it, record the outcome.

A trial function has the signature ``fn(config: dict, out_dir: Path) -> dict``: it returns flat
scalar metrics, plus optionally ``history`` (list of dicts, one per evaluation: step, fid, is, ...),
``reference`` (scores of the full-precision model, e.g. ``{"fid": 12.3}``) and ``artifacts``
(name -> file path relative to ``out_dir``: sample grids, histograms, checkpoints).
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbit.config import from_dict, unknown_name_error
from lowbit.errors import ConfigError
from lowbit.studies.spec import Trial
from lowbit.studies.states import classify_history
from lowbit.studies.store import trial_dir, write_record

TrialFn = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class TrialKind:
    """A registered trial kind: its function and config dataclass (``module:name`` each, imported when
    needed), where its trained model lands inside the trial directory (for ``@trial`` references), the
    config section holding the run's ``name`` / ``seed`` ("" = the top level, "train" for a gan trial)
    and the keys of that section that may name another trial's model as ``@trial``."""

    function: str
    config: str
    model: str = "run/model.safetensors"
    section: str = ""
    model_refs: tuple[str, ...] = ("init_from",)


TRIALS: dict[str, TrialKind] = {}


def register_trial(name: str, kind: TrialKind) -> None:
    """Make ``name`` a trial kind study configs may use (``trial: NAME``)."""
    TRIALS[name] = kind


register_trial("gan", TrialKind("lowbit.studies.trials:gan_trial", "lowbit.studies.trials:GanTrialConfig",
                                section="train", model_refs=("init_from", "teacher")))
register_trial("classifier", TrialKind("lowbit.studies.trials:classifier_trial",
                                       "lowbit.train.classifier:ClassifierConfig"))
EXTRA_KEYS = ("history", "reference", "artifacts")


def _function_path(ref: str) -> str:
    return TRIALS[ref].function if ref in TRIALS else ref


def trial_module(ref: str) -> str:
    """The module that defines trial ``ref`` (imported ahead of time by pool workers)."""
    return _function_path(ref).split(":", 1)[0]


def registered_kind(ref: str) -> TrialKind:
    """The registered kind ``ref`` (features such as ``@trial`` references need one)."""
    if ref not in TRIALS:
        raise unknown_name_error("registered trial kind", ref, list(TRIALS))
    return TRIALS[ref]


def check_trial_config(ref: str, config: dict[str, Any], where: str) -> None:
    """Validate ``config`` against the config dataclass of trial kind ``ref`` (errors name the key)."""
    module_name, class_name = registered_kind(ref).config.split(":", 1)
    from_dict(getattr(importlib.import_module(module_name), class_name), config, where=where)


def check_trial_ref(ref: str, allow_imports: bool = False) -> None:
    """A study config may name a registered trial kind; an import path only with ``allow_imports``
    (``lowbit study --allow-import-trials``), since importing and calling it runs arbitrary code."""
    if ref in TRIALS:
        return
    if ":" not in ref:
        raise unknown_name_error("trial", ref, list(TRIALS) + ["<module>:<function>"])
    if not allow_imports:
        raise ConfigError(f"trial '{ref}' is an import path, which would run code named by the config; "
                          f"use a registered trial ({', '.join(TRIALS)}), or pass --allow-import-trials "
                          "(Python: allow_imports=True) if you trust this config")


def resolve_trial(ref: str, allow_imports: bool = False) -> TrialFn:
    """A trial function by registered name (``gan``, ``classifier``) or, with ``allow_imports``, by import
    path ``module:function``."""
    check_trial_ref(ref, allow_imports)
    module_name, func_name = _function_path(ref).split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"trial '{ref}': cannot import module '{module_name}' ({exc}); "
                          "put it on PYTHONPATH or fix the name") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"trial '{ref}': module '{module_name}' has no function '{func_name}'")
    return func


def _check_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics go into a flat table: each must be a number, string, bool or None."""
    for key, value in metrics.items():
        if value is not None and not isinstance(value, (numbers.Number, str, bool)):
            raise ConfigError(f"trial returned metric '{key}' of type {type(value).__name__}; "
                              "return scalars (put curves under 'history', files under 'artifacts')")
        if hasattr(value, "item"):
            metrics[key] = value.item()
    return metrics


def execute_trial(trial_ref: str, trial: Trial, results_dir: str | Path, threads: int,
                  state_metric: str) -> dict[str, Any]:
    """Run one trial with ``threads`` torch threads; return (and store) its record, never raising.

    ``trial_ref`` was checked by the StudyRunner (``check_trial_ref``) before any worker started."""
    import torch

    torch.set_num_threads(max(1, threads))
    out_dir = trial_dir(results_dir, trial.id)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _base_record(trial)
    start = time.perf_counter()
    try:
        result = dict(resolve_trial(trial_ref, allow_imports=True)(trial.config, out_dir))
        extras = {key: result.pop(key) for key in EXTRA_KEYS if key in result}
        history = list(extras.get("history", []))
        reference = extras.get("reference", {}).get(state_metric)
        record.update(status="ok", metrics=_check_metrics(result), history=history,
                      reference=extras.get("reference", {}), artifacts=extras.get("artifacts", {}),
                      state=classify_history(history, state_metric, reference))
    except Exception as exc:  # noqa: BLE001 - a crashed trial is recorded, the study goes on
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                      traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - start, 3)
    write_record(results_dir, record)
    return record


def _base_record(trial: Trial) -> dict[str, Any]:
    return {"id": trial.id, "name": trial.name, "params": trial.params, "config": trial.config}


def failed_record(trial: Trial, error: str, seconds: float = 0.0) -> dict[str, Any]:
    """The record of a trial whose worker died before it could write its own."""
    return {**_base_record(trial), "status": "failed", "error": error, "seconds": round(seconds, 3)}
