"""On-disk layout of a study's results; every file is written atomically.

    RESULTS_DIR/study.json              the study config and its trial list
    RESULTS_DIR/trials/<id>/result.json one record per finished trial (ok or failed)
    RESULTS_DIR/trials/<id>/...         the trial's own artifacts (samples, checkpoints, plots)
    RESULTS_DIR/results.json|.csv       the table of finished trials, rewritten as each one ends
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.errors import DataError
from lowbit.io import atomic_write_csv, atomic_write_text

TABLE_FRONT = ("id", "name")
TABLE_BACK = ("status", "state", "seconds", "error")


def trial_dir(results_dir: str | Path, trial_id: str) -> Path:
    """The directory that holds one trial's artifacts and its result.json."""
    return Path(results_dir) / "trials" / trial_id


def _json_safe(node: Any) -> Any:
    """Non-finite floats become None so the JSON stays standard (a NaN score reads as missing)."""
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {str(k): _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    return node


def stored_form(data: Any) -> Any:
    """``data`` as it reads back from ``dump_json`` (tuples as lists, NaN as None, other types as str)."""
    return json.loads(json.dumps(_json_safe(data), default=str))


def dump_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented standard JSON, atomically."""
    atomic_write_text(path, json.dumps(_json_safe(data), indent=1, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by the study runner, with a clear error when it is unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); re-run the study to rewrite it") from None


def write_record(results_dir: str | Path, record: dict[str, Any]) -> None:
    """Store one trial's record as trials/<id>/result.json."""
    dump_json(trial_dir(results_dir, record["id"]) / "result.json", record)


def read_record(results_dir: str | Path, trial_id: str) -> dict[str, Any] | None:
    """The stored record of a trial, or None when it has not finished (or its file is torn)."""
    path = trial_dir(results_dir, trial_id) / "result.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except DataError:
        return None


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat table rows: id, name, the axis parameters, status, state, metrics, seconds, error."""
    rows = []
    for record in records:
        row = {"id": record["id"], "name": record["name"], **record.get("params", {})}
        row.update(status=record["status"], state=record.get("state") or "")
        row.update(record.get("metrics", {}))
        row.update(seconds=record.get("seconds"), error=record.get("error") or "")
        rows.append(row)
    return rows


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Column order: id, name, parameters and metrics in first-seen order, then status/state/seconds/error."""
    middle: list[str] = []
    for row in rows:
        middle.extend(key for key in row if key not in TABLE_FRONT + TABLE_BACK and key not in middle)
    return [*TABLE_FRONT, *middle, *TABLE_BACK]


def write_table(results_dir: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite results.json (full records) and results.csv (flat rows) atomically."""
    results_dir = Path(results_dir)
    dump_json(results_dir / "results.json", list(records))
    rows = table_rows(records)
    columns = table_columns(rows)
    atomic_write_csv(results_dir / "results.csv", _json_safe(rows), columns, extrasaction="ignore")
