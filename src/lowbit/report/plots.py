"""Study plots as PNG bytes (matplotlib, Agg): scores against bits, training curves coloured by state."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STATE_COLOURS = {"convergent": "tab:green", "unstable": "tab:orange", "failed": "tab:red", None: "tab:gray"}
METRIC_LABELS = {"fid": "FID (lower is better)", "is": "IS (higher is better)",
                 "kid": "KID (lower is better)", "accuracy": "accuracy"}


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


#: scores spanning more than this factor are drawn on a log axis (a collapsed trial's FID of ~1,000
#: would otherwise flatten every other line near the full-precision score)
LOG_SCALE_SPAN = 20.0


def log_y_if_wide(axis: Any, values: Sequence[float]) -> None:
    """Switch the y axis to log scale when all values are positive and span more than LOG_SCALE_SPAN."""
    finite = [v for v in values if v == v]
    if finite and min(finite) > 0 and max(finite) / min(finite) > LOG_SCALE_SPAN:
        axis.set_yscale("log")


def score_vs_bits(series: dict[str, list[tuple[Any, float]]], metric: str, x_label: str) -> bytes:
    """One line per series of (bits, score) points: bits on a log2 axis, or labels such as '8/1' in order."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    xs = [p[0] for points in series.values() for p in points]
    numeric = all(isinstance(x, (int, float)) for x in xs)
    ticks = sorted(set(xs)) if numeric else list(dict.fromkeys(xs))
    position = {x: (x if numeric else i) for i, x in enumerate(ticks)}
    for label, points in series.items():
        points = sorted(points, key=lambda p: position[p[0]])
        axis.plot([position[p[0]] for p in points], [p[1] for p in points], marker="o", label=label)
    if numeric:
        axis.set_xscale("log", base=2)
    axis.set_xticks([position[t] for t in ticks], [f"{t:g}" if numeric else str(t) for t in ticks])
    axis.set_xlabel(x_label)
    log_y_if_wide(axis, [p[1] for points in series.values() for p in points])
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize=8)
    return _png(figure)


Curve = tuple[str, str | None, list[tuple[float, float]]]


def curves_by_state(curves: Sequence[Curve], metric: str) -> bytes:
    """Training curves (name, state, [(step, score)]) with one colour per training state."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    seen: set[str | None] = set()
    for _, state, points in curves:
        axis.plot([p[0] for p in points], [p[1] for p in points], color=STATE_COLOURS.get(state, "tab:gray"),
                  alpha=0.8, marker=".", label=None if state in seen else (state or "not classified"))
        seen.add(state)
    axis.set_xlabel("training step")
    log_y_if_wide(axis, [p[1] for _, _, points in curves for p in points])
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def pareto_front(points: Sequence[tuple[float, float, str]], higher_is_better: bool = False
                 ) -> list[tuple[float, float, str]]:
    """The (cost, score, label) points no other point beats on both: cheaper-or-equal cost and a better
    score (lower, or higher with ``higher_is_better``), in order of cost."""
    sign = -1.0 if higher_is_better else 1.0
    front: list[tuple[float, float, str]] = []
    for point in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if point[1] == point[1] and (not front or sign * point[1] < sign * front[-1][1]):
            front.append(point)
    return front


def score_vs_cost(points: Sequence[tuple[float, float, str]], metric: str, cost_label: str) -> bytes:
    """Every trial as a (cost, score) dot on a log cost axis, its Pareto front as a labelled step line."""
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    axis.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", s=18, label="trials")
    front = pareto_front(points, higher_is_better=metric == "is")
    axis.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", marker="o",
              label="Pareto front")
    for cost, score, label in front:
        axis.annotate(label, (cost, score), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel(cost_label)
    log_y_if_wide(axis, [p[1] for p in points])
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)
