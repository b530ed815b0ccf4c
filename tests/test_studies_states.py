"""Training-state classifier on synthetic FID / IS curves with known states."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowbit.errors import ConfigError
from lowbit.studies import StateRule, classify_curve, classify_history
from lowbit.studies.states import oscillation

RNG = np.random.default_rng(0)
STEPS = np.arange(20)


def _noisy(curve: np.ndarray, rel: float = 0.01) -> list[float]:
    return list(curve * (1 + rel * RNG.standard_normal(curve.size)))


def test_decaying_fid_is_convergent():
    assert classify_curve(_noisy(300 * np.exp(-STEPS / 3) + 20)) == "convergent"


def test_flat_fid_at_the_start_level_is_failed():
    assert classify_curve(_noisy(np.full(20, 320.0), rel=0.02)) == "failed"


def test_fid_that_improves_then_thrashes_is_unstable():
    curve = np.where(STEPS < 6, 300 - 45 * STEPS, np.where(STEPS % 2 == 0, 50.0, 160.0))
    assert classify_curve(list(curve)) == "unstable"


def test_fid_that_collapses_back_to_the_start_is_unstable():
    assert classify_curve([300, 120, 60, 290, 300, 305, 300, 298]) == "unstable"


def test_is_curves_use_higher_is_better():
    rising = 1 + 6 * (1 - np.exp(-STEPS / 4))
    assert classify_curve(_noisy(rising), higher_is_better=True) == "convergent"
    assert classify_curve(_noisy(np.full(20, 1.1)), higher_is_better=True) == "failed"
    assert classify_curve(list(rising), higher_is_better=False) == "failed"


def test_fine_tuning_that_stays_good_is_not_failed():
    flat_good = _noisy(np.full(12, 12.0), rel=0.01)
    assert classify_curve(flat_good) == "failed"
    assert classify_curve(flat_good, reference=10.0) == "convergent"
    assert classify_curve(flat_good, reference=3.0) == "failed"


def test_non_finite_scores_fail_and_empty_curves_are_errors():
    assert classify_curve([300, 100, math.nan, 50]) == "failed"
    with pytest.raises(ConfigError, match="empty curve"):
        classify_curve([])


def test_oscillation_measures_back_and_forth_beyond_the_trend():
    assert oscillation(np.array([100.0, 80, 60, 40])) == pytest.approx(0.0)
    tail = np.array([50.0, 150, 50, 150])  # travel 300, net 100, median 100, 3 steps
    assert oscillation(tail) == pytest.approx((300 - 100) / (3 * 100))


def test_thresholds_are_configurable_and_history_reads_a_metric():
    spike = [300, 100, 60, 50, 56, 50, 49]  # tail swing (6+6+1-1)/(3*50) = 0.08
    assert classify_curve(spike) == "convergent"
    assert classify_curve(spike, rule=StateRule(oscillation=0.05)) == "unstable"
    history = [{"step": s, "fid": v} for s, v in enumerate(spike)] + [{"step": 9, "loss": 1.0}]
    assert classify_history(history, "fid") == "convergent"
    assert classify_history(history, "is") is None
