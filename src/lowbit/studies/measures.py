"""Per-trial measurements registered by a higher layer, run after a trial finishes ``ok``.

Some costs need code the studies layer may not import (the packed file's bytes and latency need the
exporter, which sits above studies). The command layer registers a measure per trial kind
(``register_measure("gan", "packed", fn)``); a study asks for it by name (``measures: [packed]``), and the
``StudyRunner`` calls it in its own process on every ok record that lacks it (new trials, and finished
ones of an earlier run) and adds the returned scalars to the record's metrics, listing the measure under
``record["measured"]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError

#: ``fn(record, trial_dir) -> {metric: number}``
MeasureFn = Callable[[dict[str, Any], Path], dict[str, float]]

_MEASURES: dict[str, dict[str, MeasureFn]] = {}


def register_measure(trial_kind: str, name: str, fn: MeasureFn) -> None:
    """Measure every ok trial of ``trial_kind`` with ``fn`` (registering a name again replaces it)."""
    _MEASURES.setdefault(trial_kind, {})[name] = fn


def unregister_measure(trial_kind: str, name: str) -> None:
    """Stop measuring ``trial_kind`` trials with measure ``name`` (no error when absent)."""
    _MEASURES.get(trial_kind, {}).pop(name, None)


def check_measures(trial_kind: str, names: list[str]) -> None:
    """Every measure a study asks for must be registered for its trial kind (``lowbit study`` registers
    ``packed`` for ``gan``)."""
    known = _MEASURES.get(trial_kind, {})
    for name in names:
        if name not in known:
            raise ConfigError(f"measure '{name}' is not registered for '{trial_kind}' trials (registered: "
                              f"{', '.join(known) or 'none'}); run the study with `lowbit study`, or "
                              "register it with lowbit.studies.measures.register_measure")


def pending_measures(trial_kind: str, names: list[str], record: dict[str, Any]) -> dict[str, MeasureFn]:
    """The measures ``names`` of ``trial_kind`` an ok ``record`` has not been through yet."""
    if record.get("status") != "ok":
        return {}
    done = set(record.get("measured", []))
    return {name: _MEASURES[trial_kind][name] for name in names if name not in done}


def apply_measures(trial_kind: str, names: list[str], record: dict[str, Any], out_dir: Path) -> bool:
    """Run the pending measures on ``record`` in place; True when any ran. A measure that raises fails
    the record (its error names the measure), so the next run of the study tries the trial again."""
    pending = pending_measures(trial_kind, names, record)
    for name, fn in pending.items():
        try:
            values = fn(record, out_dir)
        except Exception as exc:  # noqa: BLE001 - a failed measurement is recorded like a failed trial
            error = f"measure '{name}': {type(exc).__name__}: {exc}"
            record.update(status="failed", error=error.splitlines()[0])
            return True
        for key, value in values.items():
            if not isinstance(value, numbers.Number) or isinstance(value, bool):
                record.update(status="failed", error=f"measure '{name}' returned {key}={value!r}; "
                              "measures return numbers")
                return True
        record["metrics"].update({key: float(value) for key, value in values.items()})
        record["measured"] = [*record.get("measured", []), name]
    return bool(pending)
