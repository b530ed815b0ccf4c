"""Per-trial measures registered above the studies layer: run once per ok record (new or finished),
failures recorded, and the packed-generator measure of ``lowbit study``; Pareto fronts of the report."""

from __future__ import annotations

import pytest
import torch

import lowbit.metrics
from lowbit.commands.study import measure_packed_generator
from lowbit.config import to_dict
from lowbit.errors import ConfigError
from lowbit.export import load
from lowbit.report.plots import pareto_front
from lowbit.report.studies import build_study_page
from lowbit.studies.measures import register_measure, unregister_measure
from lowbit.studies.runner import StudyRunner
from lowbit.studies.spec import Axis, StudyConfig, expand
from lowbit.studies.store import dump_json
from lowbit.studies.trials import gan_trial
from lowbit.train.networks import load_generator
from test_studies_trials import TRAIN, fake_evaluate

TRIAL = "test_studies:digits_trial"


def _png_bytes(record, out_dir):
    return {"bops": (out_dir / record["artifacts"]["samples"]).stat().st_size}


def _broken(record, out_dir):
    raise OSError("disk on fire")


@pytest.fixture
def measures():
    registered = []

    def register(name, fn):
        register_measure(TRIAL, name, fn)
        registered.append(name)

    yield register
    for name in registered:
        unregister_measure(TRIAL, name)


def test_measures_run_in_the_runner_on_new_and_finished_trials(tmp_path, measures):
    study = StudyConfig(name="m", trial=TRIAL, base={"lr": 0.5, "steps": 5, "bits": 32},
                        axes=[Axis("bits", [1, 32], keys=["bits"])])
    trials = expand(study)
    measures("png", _png_bytes)
    with pytest.raises(ConfigError, match="measure 'latency' is not registered for .*registered: png"):
        StudyRunner(tmp_path, TRIAL, progress=False, allow_imports=True, measures=["latency"])
    runner = StudyRunner(tmp_path, TRIAL, progress=False, allow_imports=True, measures=["png"])
    records = runner.run(trials)
    for record in records:
        png = tmp_path / "trials" / record["id"] / "templates.png"
        assert record["metrics"]["bops"] == png.stat().st_size and record["measured"] == ["png"]
    dump_json(tmp_path / "study.json", {"name": "m", "config": to_dict(study)})
    page = build_study_page(tmp_path).read_text()
    assert "accuracy against bit operations (BOPs): Pareto front in red" in page
    measures("broken", _broken)  # a later measure reaches finished records without re-running them
    again = StudyRunner(tmp_path, TRIAL, progress=False, allow_imports=True,
                        measures=["png", "broken"]).run(trials)
    assert all(r["status"] == "failed" and r["error"] == "measure 'broken': OSError: disk on fire"
               for r in again)
    assert all((tmp_path / "trials" / r["id"] / "calls.txt").read_text().count("call") == 1 for r in again)


def test_packed_generator_measure_exports_the_trained_generator(tmp_path, monkeypatch):
    monkeypatch.setattr(lowbit.metrics, "evaluate", fake_evaluate, raising=False)
    torch.set_num_threads(1)
    pruned = {**TRAIN, "steps": 2, "eval_every": 0, "generator": {
        **TRAIN["generator"], "transforms": [{"type": "prune", "kind": "channels", "ratio": 0.5}]}}
    record = {"artifacts": gan_trial({"train": pruned, "eval": {"dataset": "digits", "n": 8, "batch": 8},
                                      "histograms": False}, tmp_path)["artifacts"]}
    measured = measure_packed_generator(record, tmp_path)
    packed_file = tmp_path / "generator.lowbit"
    assert measured["packed_bytes"] == packed_file.stat().st_size and measured["latency_b64_ms"] > 0
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the file is the trained (pruned, quantized) generator: same outputs
        expected = load_generator(tmp_path / record["artifacts"]["model"])(z)
        torch.testing.assert_close(load(packed_file, kernel_path="torch")(z), expected, atol=1e-5, rtol=1e-5)


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(4.0, 10.0, "a"), (1.0, 30.0, "b"), (2.0, 12.0, "c"), (2.0, 25.0, "d"), (8.0, 11.0, "e"),
              (3.0, float("nan"), "nan")]
    assert [p[2] for p in pareto_front(points)] == ["b", "c", "a"]
    assert [p[2] for p in pareto_front(points, higher_is_better=True)] == ["b"]
