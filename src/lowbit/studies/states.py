"""Training-state classifier of seed 001 §3.2: a score curve is convergent, unstable or failed.

The rule (thresholds in ``StateRule``, written out in docs/studies.md):

* failed     - the score never leaves its starting level: the best value improves on the first by
               less than ``min_gain`` (relative), or the curve holds a non-finite value;
* unstable   - it left the start but does not settle: over the tail (last ``tail`` fraction, at
               least 3 points) the back-and-forth movement beyond the net trend, per step, exceeds
               ``oscillation`` of the tail's median level, or the tail fell back to within
               ``min_gain`` of the start;
* convergent - otherwise.

A curve that is already good at its start (within ``good_factor`` of a reference score, e.g.
the full-precision model's, when one is given) is judged by oscillation only: a fine-tuned model
that stays good has not failed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from lowbit.errors import ConfigError

STATES = ("convergent", "unstable", "failed")
HIGHER_IS_BETTER = {"fid": False, "kid": False, "is": True, "accuracy": True, "loss": False}


@dataclasses.dataclass(frozen=True)
class StateRule:
    """Thresholds of the state rule (relative to the curve's own scale)."""

    min_gain: float = 0.10
    oscillation: float = 0.15
    tail: float = 0.5
    good_factor: float = 2.0


def _gain(start: float, value: float, higher_is_better: bool) -> float:
    """Relative improvement from ``start`` to ``value`` (positive = better)."""
    change = value - start if higher_is_better else start - value
    return change / max(abs(start), 1e-12)


def _is_good(value: float, reference: float | None, higher_is_better: bool, factor: float) -> bool:
    """Whether ``value`` is within ``factor`` of the reference score (never, without a reference)."""
    if reference is None:
        return False
    return value >= reference / factor if higher_is_better else value <= reference * factor


def oscillation(tail: np.ndarray) -> float:
    """Back-and-forth movement beyond the net trend, per step, relative to the median level."""
    if len(tail) < 2:
        return 0.0
    travel = float(np.abs(np.diff(tail)).sum())
    net = abs(float(tail[-1] - tail[0]))
    level = max(float(np.median(np.abs(tail))), 1e-12)
    return (travel - net) / ((len(tail) - 1) * level)


def classify_curve(values: Sequence[float], higher_is_better: bool = False, reference: float | None = None,
                   rule: StateRule = StateRule()) -> str:
    """Classify a score curve (one value per evaluation, in step order) as convergent/unstable/failed."""
    curve = np.asarray([float(v) for v in values], dtype=np.float64)
    if curve.size == 0:
        raise ConfigError("cannot classify an empty curve; evaluate the trial at least once")
    if not np.isfinite(curve).all():
        return "failed"
    best = curve.max() if higher_is_better else curve.min()
    start_good = _is_good(curve[0], reference, higher_is_better, rule.good_factor)
    if not start_good and _gain(curve[0], best, higher_is_better) < rule.min_gain:
        return "failed"
    tail = curve[-max(3, math.ceil(rule.tail * curve.size)):]
    tail_level = float(np.median(tail))
    fell_back = (_gain(curve[0], tail_level, higher_is_better) < rule.min_gain
                 and not _is_good(tail_level, reference, higher_is_better, rule.good_factor))
    if fell_back or oscillation(tail) > rule.oscillation:
        return "unstable"
    return "convergent"


def classify_history(history: Sequence[dict], metric: str, reference: float | None = None,
                     rule: StateRule = StateRule()) -> str | None:
    """The state of a trial's history (list of dicts) on ``metric``; None when it was never measured."""
    values = [row[metric] for row in history if row.get(metric) is not None]
    if not values:
        return None
    return classify_curve(values, HIGHER_IS_BETTER.get(metric, False), reference, rule)
