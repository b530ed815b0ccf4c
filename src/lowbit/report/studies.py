"""``lowbit report RESULTS_DIR``: one self-contained HTML page per study.

A page holds the results table, score-against-bits plots, training curves coloured by training
state, the search summary (for search studies) and each trial's sample grids and weight
histograms (the PNG artifacts the trial wrote). RESULTS_DIR is one study's directory (it holds
``study.json``) or a directory of such; the latter also gets an ``index.html``.
"""

from __future__ import annotations

import collections
import numbers
from pathlib import Path
from typing import Any

from lowbit.errors import DataError
from lowbit.report import plots
from lowbit.report.html import HtmlReport
from lowbit.studies.store import read_json, table_columns, table_rows, trial_dir

SCORE_METRICS = ("fid", "is", "kid", "accuracy")
#: cost metrics a trial or a registered measure may report, drawn as score-vs-cost Pareto fronts
COST_METRICS = {"bops": "bit operations (BOPs)", "bytes": "stored bytes (compression report)",
                "packed_bytes": "packed file bytes",
                "latency_b64_ms": "packed latency, batch 64, 1 thread (ms)"}
PAGE = "report.html"
SAMPLE_WIDTH = 280  # sample grids of small images (8x8 digits, 28x28 MNIST) are scaled up to this width


def study_dirs(root: str | Path) -> list[Path]:
    """The study directories under ``root`` (``root`` itself when it is one)."""
    root = Path(root)
    if (root / "study.json").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/study.json"))
    if not found:
        raise DataError(f"{root} holds no study results (no study.json); pass the directory a "
                        "`lowbit study` run wrote, or its parent")
    return found


def _label(metric: str) -> str:
    """FID, IS, KID in capitals; longer names (accuracy, loss) as they are."""
    return metric.upper() if len(metric) <= 3 else metric


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def _metrics_present(records: list[dict[str, Any]]) -> list[str]:
    return [m for m in SCORE_METRICS if any(_is_number(r.get("metrics", {}).get(m)) for r in records)]


def _x_axis(study: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """The x-axis parameter: the config's ``plot_x``, else the first numeric axis, else the last axis;
    an axis the (selected) trials do not vary along gives way to the first one they do vary along."""
    config = study.get("config", {})
    names = [axis["name"] for axis in config.get("axes", [])]
    varying = [n for n in names if len({str(r["params"].get(n)) for r in records}) > 1]
    numeric = [n for n in names if records and all(_is_number(r["params"].get(n)) for r in records)]
    for choice in [config.get("plot_x"), *numeric, *names[-1:]]:
        if choice and choice in varying:
            return choice
    return (varying or [None])[0]


def _grid_series(records: list[dict[str, Any]], metric: str, x: str) -> dict[str, list[tuple[Any, float]]]:
    """Points (x, score) grouped by the other parameters."""
    series: dict[str, list[tuple[Any, float]]] = collections.defaultdict(list)
    for record in records:
        value = record["metrics"].get(metric)
        if _is_number(value) and x in record["params"]:
            label = ", ".join(f"{k}={v}" for k, v in record["params"].items() if k != x) or metric
            series[label].append((record["params"][x], float(value)))
    return dict(series)


def _search_series(records: list[dict[str, Any]], metric: str,
                   summary: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Points of the two search steps: D bits (G full precision) and G bits (at the D found)."""
    series: dict[str, list[tuple[float, float]]] = {}
    labels = {"d": "D bits (G full precision)", "g": f"G bits (D at {summary.get('d_bits') or 32} bits)"}
    for phase, label in labels.items():
        points = [(float(r["params"][f"{phase}_bits"]), float(r["metrics"][metric])) for r in records
                  if r["params"].get("phase") == phase and _is_number(r["metrics"].get(metric))]
        if points:
            series[label] = points
    return series


def _add_score_plots(page: HtmlReport, study: dict[str, Any], records: list[dict[str, Any]],
                     summary: dict[str, Any] | None) -> None:
    ok = _ok(records)
    x = None if summary is not None else _x_axis(study, ok)
    for metric in _metrics_present(ok):
        series = _search_series(ok, metric, summary) if summary is not None else (
            _grid_series(ok, metric, x) if x else {})
        if series:
            page.image(plots.score_vs_bits(series, metric, x or "bits"),
                       caption=f"{_label(metric)} against {x or 'bits'}")


def _add_pareto(page: HtmlReport, records: list[dict[str, Any]]) -> None:
    """One score-vs-cost plot per (score, cost) pair the ok trials report, with its Pareto front."""
    ok = _ok(records)
    for metric in _metrics_present(ok)[:1]:
        for cost, label in COST_METRICS.items():
            points = [(float(r["metrics"][cost]), float(r["metrics"][metric]), r["name"]) for r in ok
                      if _is_number(r["metrics"].get(cost)) and _is_number(r["metrics"].get(metric))]
            if len(points) > 1:
                page.image(plots.score_vs_cost(points, metric, label),
                           caption=f"{_label(metric)} against {label}: Pareto front in red")


def _add_curves(page: HtmlReport, records: list[dict[str, Any]], state_metric: str) -> None:
    for metric in dict.fromkeys([state_metric, *SCORE_METRICS]):
        curves = [(r["name"], r.get("state"), [(row["step"], row[metric]) for row in r.get("history", [])
                                               if _is_number(row.get(metric))]) for r in _ok(records)]
        curves = [c for c in curves if c[2]]
        if curves:
            page.image(plots.curves_by_state(curves, metric),
                       caption=f"{_label(metric)} during training, coloured by training state")


def _add_search(page: HtmlReport, summary: dict[str, Any]) -> None:
    page.heading("Multi-precision search")
    direction = "at most" if summary["metric"] == "fid" else "at least"
    page.paragraph(f"Target: {summary['metric'].upper()} {direction} {summary['target']}. "
                   f"Lowest D bits with G at full precision: {summary['d_bits'] or 'none (D kept at 32)'}; "
                   f"lowest G bits with that D: {summary['g_bits'] or 'none'}.")
    page.table(summary["steps"], columns=["phase", "layer", "bits", "score", "meets", "trial"])
    mixed = summary.get("mixed")
    if mixed:
        page.heading("Per-layer mixed precision", level=3)
        page.paragraph(f"Layers lowered least-sensitive first: {', '.join(mixed['order']) or '-'}; "
                       f"score {mixed['score']}. Weight storage (codes, without scales/biases) and bit "
                       "operations (FLOPs x weight bits x input-activation bits):")
        page.table([{"config": name, "bytes": mixed[f"bytes{suffix}"], "BOPs": mixed[f"bops{suffix}"]}
                    for name, suffix in (("mixed", ""), ("uniform G bits", "_uniform"), ("FP32", "_fp32"))])
        page.table([{**layer, "bits": mixed["layer_bits"][layer["name"]]} for layer in mixed["layers"]])


def _add_artifacts(page: HtmlReport, results_dir: Path, records: list[dict[str, Any]]) -> None:
    page.heading("Samples and weight histograms per trial")
    shown = 0
    for record in _ok(records):
        pngs = [(name, trial_dir(results_dir, record["id"]) / rel)
                for name, rel in record.get("artifacts", {}).items() if str(rel).endswith(".png")]
        pngs = [(name, path) for name, path in pngs if path.is_file()]
        if pngs:
            page.heading(f"{record['name']} ({record.get('state') or 'no curve'})", level=3)
            for name, path in pngs:
                width = SAMPLE_WIDTH if name == "samples" else None
                page.image(path, caption=f"{record['name']}: {name}", width=width)
                shown += 1
    if not shown:
        page.paragraph("(no trial wrote images)")


def build_study_page(results_dir: str | Path) -> Path:
    """Write ``results_dir/report.html`` for one study; returns its path."""
    results_dir = Path(results_dir)
    study = read_json(results_dir / "study.json")
    records = read_json(results_dir / "results.json") if (results_dir / "results.json").is_file() else []
    summary = read_json(results_dir / "search.json") if (results_dir / "search.json").is_file() else None
    config = study.get("config", {})
    page = HtmlReport(f"Study: {study['name']}")
    states = collections.Counter(r.get("state") or "not classified" for r in _ok(records))
    page.paragraph(f"{len(records)} trials of '{config.get('trial')}' ({study.get('kind', 'grid')} study): "
                   f"{len(_ok(records))} ok, {len(records) - len(_ok(records))} failed. Training states on "
                   f"{config.get('state_metric', 'fid')}: "
                   + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none") + ".")
    page.heading("Results")
    rows = table_rows(records)
    page.table(rows, columns=[c for c in table_columns(rows) if c != "id"])
    page.heading("Scores against the study axes")
    _add_score_plots(page, study, records, summary)
    _add_pareto(page, records)
    page.heading("Training curves")
    _add_curves(page, records, config.get("state_metric", "fid"))
    if summary is not None:
        _add_search(page, summary)
    _add_artifacts(page, results_dir, records)
    return page.save(results_dir / PAGE)


def build_report(root: str | Path) -> list[Path]:
    """One page per study under ``root``; with several studies also ``root/index.html``."""
    root = Path(root)
    pages = [build_study_page(d) for d in study_dirs(root)]
    if len(pages) > 1:
        index = HtmlReport("lowbit studies")
        for page in pages:
            index.link(page.parent.name, page.relative_to(root).as_posix())
        pages.append(index.save(root / "index.html"))
    return pages
